"""What a run prints on a terminal: Lightning's rich progress bar and model summary, without the two lines
they get wrong for this project's runs.

* :class:`StepProgressBar` -- ``Epoch 3`` for a run limited by ``max_steps`` (Lightning's bar says
  ``Epoch 3/-2``: it prints ``max_epochs - 1``, and a step-limited run has ``max_epochs == -1``);
* :class:`ParameterSummary` -- the model summary with its FLOPs column and total only when they were counted:
  Lightning counts FLOPs only for a model with an ``example_input_array`` (none of the tasks has one: their
  inputs are lists of images of any size), and prints ``Total FLOPs: 0`` otherwise.

:func:`console_callbacks` gives them to the trainer where Lightning would have used its own (rich installed,
the bar or summary enabled, none given by the user).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count


class StepProgressBar(RichProgressBar):
    def _get_train_description(self, current_epoch: int) -> str:
        # (private in RichProgressBar, the one place its description is made; Lightning's minor version is
        # bounded in pyproject)
        if self.trainer.max_epochs is not None and self.trainer.max_epochs >= 0:
            return super()._get_train_description(current_epoch)
        description = f"Epoch {current_epoch}"
        return f"{description:{len(self.validation_description)}}"  # padded as Lightning pads it


class ParameterSummary(RichModelSummary):
    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        if total_flops:
            return RichModelSummary.summarize(summary_data, total_parameters, trainable_parameters, model_size,
                                              total_training_modes, total_flops, **summarize_kwargs)  # fmt: skip
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:  # (the first is the row number, named " ")
            justify = "right" if name in ("Params", "Params per Device", "In sizes", "Out sizes") else "left"
            table.add_column(name, justify=justify, style="dim" if name == " " else None)
        for row in zip(*(values for _, values in columns)):
            table.add_row(*map(str, row))
        console = get_console()
        console.print(table)
        grid = Table.grid(expand=True)
        grid.add_column()
        for label, value in [
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", total_training_modes["train"]),
            ("Modules in eval mode", total_training_modes["eval"]),
        ]:
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)
        return None


def console_callbacks(config: dict[str, Any], callbacks: list) -> list:
    """Ours where Lightning would add its own rich bar and summary (a callback of the kind given by the user, or
    the bar or the summary switched off, leaves Lightning's choice alone)."""
    if importlib.util.find_spec("rich") is None:
        return []
    given = [*callbacks, *(config.get("callbacks") or [])]
    out = []
    if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in given):
        out.append(StepProgressBar())
    if config.get("enable_model_summary") is not False and not any(isinstance(c, ModelSummary) for c in given):
        out.append(ParameterSummary())
    return out
