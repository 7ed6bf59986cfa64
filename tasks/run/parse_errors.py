"""Command-line mistakes in one line: what is missing or wrong, and what it must be.

jsonargparse reports a missing ``data.root`` as a nest of union subtypes with the datamodule's whole
namespace dumped, after the full usage text. :class:`OneLineErrors` is the parser ``TaskCLI`` uses; its
``error`` prints ``error: <one line>`` (and where ``--help`` is) instead. :func:`one_line` does the
translation; a message it does not recognize keeps its first lines, without the value dumps.
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
from typing import NoReturn

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser

#: datamodules to suggest when ``--data`` is missing
DATAMODULES = (
    "ImageFolderDataModule", "CIFARDataModule", "COCODetectionDataModule", "COCOSegmentationDataModule",
)  # fmt: skip
_SUGGESTED = [f"datamodules.{n}" for n in DATAMODULES]


def _datamodule(class_path: str):
    import importlib

    module, _, name = (class_path if "." in class_path else f"datamodules.{class_path}").rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):  # an unknown path: nothing to read from it
        return None


def did_you_mean(word: str, options) -> str:
    """``; did you mean ...?`` with the options ``word`` begins (``resnext50`` -> ``resnext50_32x4d``), then the
    closest spellings, three at most."""
    options = list(options)
    starting = [o for o in options if o.startswith(word) and o != word]
    found = list(dict.fromkeys([*starting, *difflib.get_close_matches(word, options, n=3, cutoff=0.6)]))[:3]
    return f"; did you mean {', '.join(found)}?" if found else ""


def _layout(class_path: str) -> str:
    cls = _datamodule(class_path)
    return f" {cls.layout}" if cls is not None and getattr(cls, "layout", "") else ""


def one_line(message: str, options: list[str] = ()) -> str:
    """The parser's ``message`` as one line naming the key and what it must be."""
    if re.search(r"the following arguments are required: (?:\w+\.)?data\b", message):
        return (
            f"--data is required: the datamodule class and its data.root, e.g. --data {_SUGGESTED[0]} --data.root "
            f"/path/to/data (one of {', '.join(_SUGGESTED)}, or any LightningDataModule)"
        )
    url = re.search(r"Parser key \"config\": Path does not exist: '((?:https?|ftp)://[^']+)'", message)
    if url:
        return (
            f"--config {url[1]}: configs are read from files only, never fetched from a URL (a file from the network "
            f"would decide what the run builds). Download it, read it, and pass its path"
        )
    key = re.search(r'Parser key "([\w.]+)"', message)
    prefix = key[1] if key else ""
    class_path = re.search(r"Problem with given class_path '([\w.]+)'", message)
    if class_path:
        path = class_path[1]
        if required := re.search(r"the following arguments are required: ([\w, .]+)", message):
            names = [n.strip() for n in required[1].split(",")]
            keys = ", ".join(f"{prefix}.{n}" for n in names)
            what = " (the dataset folder)" if names == ["root"] else ""
            return f"{keys} {'is' if len(names) == 1 else 'are'} required for {path}{what}.{_layout(path)}"
        if unknown := re.search(r"Option '(\w+)' is not accepted", message):
            cls = _datamodule(path)
            if cls is LightningDataModule:  # --data.<name> with no --data <class> before it
                return (
                    f"--{prefix}.{unknown[1]} needs the datamodule's class first: --data <class> (one of "
                    f"{', '.join(_SUGGESTED)}, or any LightningDataModule), then its arguments"
                )
            accepted = list(inspect.signature(cls).parameters) if cls is not None else []
            close = did_you_mean(unknown[1], accepted).replace("mean ", f"mean {prefix}.").replace(", ", f", {prefix}.")
            return f"{prefix}.{unknown[1]} is not an option of {path}{close}"
        if re.search(r"has no attribute '(\w+)'|No module named", message):
            known = [*_SUGGESTED, "datamodules.ShapesDetectionDataModule"]
            return f"{prefix}: {path} does not exist{did_you_mean(path, known)}"
        inner = re.search(r'Parser key "([\w.]+)":\s*Expected a (.+?)\. Got value: (.+)', message)
        if inner:
            return f"{prefix}.{inner[1]} must be {_type_text(inner[2])}, not {inner[3].strip()!r}"
    if key and (expected := re.search(r"Expected a (.+?)\. Got value: (.+)", message)):
        kind, value = expected[1], expected[2].strip()
        literal = re.fullmatch(r"typing\.Literal\[(.*)\]", kind)
        if literal:
            values = [v.strip(" '\"") for v in literal[1].split(",")]
            listed = f"; one of {', '.join(values[:12])}{' ...' if len(values) > 12 else ''}"
            hint = did_you_mean(value, values) or listed
            extra = " (python -m backbones lists them)" if prefix.endswith("backbone") else ""
            return f"{prefix}={value!r} is not an allowed value{hint}{extra}"
        return f"{prefix} must be {_type_text(kind)}, not {value!r}"
    if unknown := re.search(r"unrecognized arguments: (--[\w.]+)", message, re.IGNORECASE):
        return f"{unknown[1]} is not an option{did_you_mean(unknown[1], options)}"
    kept = [line for line in message.splitlines() if line.strip() and not line.strip().startswith("Given value")]
    return " ".join(line.strip() for line in kept[:6])


def _type_text(kind: str) -> str:
    return re.sub(r"<class '(\w+)'>", r"\1", kind).replace("typing.", "")


class TaskHelp:
    """``fit --help`` as a user reads it: a short usage line, then the task's own arguments (``--model.*``), the
    data's (the arguments of the datamodule class ``--config`` or ``--data`` names: ``data_class``), then the
    run's, the checkpoint's and the Trainer's -- not Lightning's 900 lines with the model at line 500 and no
    ``--data.*`` at all. Mixed into :class:`OneLineErrors`."""

    #: the datamodule class the command line names (``TaskCLI`` sets it from ``--config`` or ``--data``)
    data_class: type | None = None

    def format_help(self) -> str:
        groups = self._action_groups
        model = [g for g in groups if getattr(g, "dest", None) == "model"]
        if not model:  # the top parser (subcommands) or a parser of another kind: as it was
            return super().format_help()
        data = [g for g in groups if any(a.dest == "data" for a in g._group_actions)]
        rest = [g for g in groups if g not in model and g not in data]
        head = self._get_formatter()
        head.add_usage(f"{self.prog.replace(' [options]', '')} [options]", [], [])
        head.add_text(self.description)
        parts = [head.format_help()]
        parts += [self._section("The data: --data <class> and its arguments", g.description, g._group_actions)
                  for g in data]  # fmt: skip
        if self.data_class is not None:
            parts.append(self._data_arguments())
        parts += [self._section(g.title, g.description, g._group_actions) for g in [*model, *rest]]
        return "\n".join(part.rstrip("\n") + "\n" for part in parts if part.strip())

    def _section(self, title, description, actions) -> str:
        formatter = self._get_formatter()
        formatter.start_section(title)
        formatter.add_text(description)
        formatter.add_arguments(actions)
        formatter.end_section()
        return formatter.format_help()

    def _data_arguments(self) -> str:
        """The help of ``data_class``'s own arguments, as ``--data.<name>``."""
        from jsonargparse import ArgumentParser

        parser = ArgumentParser(prog="", add_help=False)
        parser.add_class_arguments(self.data_class, "data", fail_untyped=False)
        text = parser.format_help()
        body = text.split("\n\n", 1)[1] if "\n\n" in text else text  # without its usage line
        return f"{self.data_class.__module__.split('.')[0]}.{self.data_class.__name__}'s arguments:\n{body}"


class OneLineErrors(TaskHelp, LightningArgumentParser):
    """LightningCLI's parser, whose errors are one line (:func:`one_line`) instead of the usage and dumps."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        # argparse lists its actions only in _actions (unchanged since Python 2.7): the options for "did you mean"
        options = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"error: {one_line(message, options)}\n(run {prog} --help for every option)\n")
        self.exit(2)
