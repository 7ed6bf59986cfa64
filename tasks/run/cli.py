"""``TaskCLI``: the ``LightningCLI`` every task runs under, with the project's defaults.

On top of Lightning's CLI it

* gives each run its own directory, ``<trainer.default_root_dir or runs>/<run_name>/<run_version>``
  (``run_name`` defaults to the config file's name; ``run_version`` to ``version_<n>``, the SLURM job
  id under SLURM), holding ``config.yaml``, ``checkpoints/{best,last}.ckpt`` and the W&B run;
* adds a ``ModelCheckpoint`` (``--checkpoint.*``, ``tasks.run.checkpointing.RunCheckpoint``) that keeps
  ``best.ckpt`` by the task's metric (``val/acc1``, ``val/mAP``, ``val/mIoU``) and writes ``last.ckpt``
  after every validation;
* logs to Weights & Biases by default, offline when no W&B credentials are configured (``wandb sync``
  uploads later), and logs the full resolved config as the run's hyperparameters; beside any logger, the
  metrics also go to ``metrics.csv`` in the run directory (``ResumableCSVLogger``, kept across resumes), a
  file meant to be read back (``studies report`` does);
* under SLURM, handles the time-limit warning at a step every rank has finished and requeues the job
  (``tasks.run.slurm``), and resumes a restarted job from the newest checkpoint in its run directory;
* reads every checkpoint with ``weights_only=True``;
* on CUDA, trains in ``bf16-mixed`` unless ``--trainer.precision`` says otherwise;
* sets ``--trainer.benchmark`` (cuDNN's algorithm search), unless given or ``--trainer.deterministic``
  is on, from the task: on for classification, whose batches all have one shape (as torchvision's
  reference script does), off for detection and segmentation, whose shapes vary.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

import datamodules
from datamodules.images import CorruptImageError
from zoo_common.checkpoints import WeightsError, describe, is_task_checkpoint, refuse_class_specs, torch_load_safe
from zoo_common.command import run_command

from .. import registry
from ..core.guards import NonFiniteLossError
from . import slurm
from .arguments import checkpoint_conflicts, named_data_class
from .checkpointing import AtomicCheckpointIO, InterruptCheckpoint, RunCheckpoint, ValidateAtEnd
from .console import console_callbacks
from .loggers import PROJECT, ResumableCSVLogger, ValidationLine, generate_run_id, wandb_credentials_available
from .parse_errors import OneLineErrors
from .run_dirs import RunDirectory, RunDirectoryBusy, agree_on_run_dir, next_version, writes_run_directory

log = logging.getLogger(__name__)

RUN_DIR_ENV = "RESIDUAL_ZOO_RUN_DIR"


class LoggedSaveConfigCallback(SaveConfigCallback):
    """Writes ``config.yaml`` into the run directory and logs the resolved config as hyperparameters."""

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": config})


class TaskCLI(LightningCLI):
    """``LightningCLI(task_class, any LightningDataModule)`` with the defaults described above."""

    def __init__(self, model_class: type[pl.LightningModule], args: Any = None, **kwargs: Any) -> None:
        self._run_directory: RunDirectory | None = None
        kwargs.setdefault("save_config_callback", LoggedSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_class", OneLineErrors)  # a missing data.root is one line, not a namespace dump
        kind = getattr(model_class, "kind", "")
        parser_kwargs = {"allow_abbrev": False}  # --trainer.max_step is a typo ("did you mean"), not max_steps
        if kind:  # the hints name the command as users type it, not the file (python -m runs it as __main__)
            parser_kwargs["prog"] = f"python -m tasks.{kind}"
        kwargs.setdefault("parser_kwargs", parser_kwargs)
        if slurm.under_slurm():
            slurm.install_warning_handler()  # before anything slow: an early time-limit warning is kept
        else:  # Lightning's hint that srun is installed but not used says nothing to a run outside SLURM
            warnings.filterwarnings("ignore", message="The `srun` command is available on your system")
        # the project chooses where checkpoints go (the run directory): Lightning's note that a checkpoint from
        # another folder was given says nothing to act on
        warnings.filterwarnings("ignore", message="The dirpath has changed from")
        datamodules.load_all()  # --data by its short name: every datamodule class known to the parser
        argv = list(args) if isinstance(args, (list, tuple)) else sys.argv[1:]
        if "--help" in argv or "-h" in argv:
            OneLineErrors.data_class = named_data_class(argv)  # its arguments are listed right after the model's
        super().__init__(
            model_class,
            pl.LightningDataModule,
            subclass_mode_data=True,
            auto_configure_optimizers=False,
            args=args,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--run_name", type=str | None, default=None, help="run directory and W&B run name (default: config name)"
        )
        parser.add_argument(
            "--run_version", type=str | None, default=None, help="run sub-directory (default: version_<n>)"
        )
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        model_class = self.model_class
        parser.set_defaults(
            {
                "checkpoint.monitor": getattr(model_class, "monitor", None),
                "checkpoint.mode": getattr(model_class, "mode", "min"),
                "checkpoint.filename": "best",
                "checkpoint.save_last": True,
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
                # the run directory is the run's own: a resumed run writes last.ckpt again, not last-v1.ckpt
                "checkpoint.enable_version_counter": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.WandbLogger",
                    "init_args": {"project": PROJECT},
                },
            }
        )

    # -- resuming --------------------------------------------------------------------------------
    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last`` and refuse unreadable or unsafe checkpoints before anything runs.

        ``last`` is the newest ``last.ckpt`` of this run name (``runs/<run_name>/*/checkpoints``); the
        resumed run continues in that run's directory, with its W&B run. A missing or unreadable
        checkpoint is an error, never a silent fresh start.
        """
        self._resume_dir = None
        if self.config.get("subcommand"):
            cfg = self.config[self.config.subcommand]
            path = cfg.get("ckpt_path")
            if path == "last":
                root = Path(cfg.trainer.get("default_root_dir") or "runs") / self._run_name(cfg)
                found = sorted(root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
                if not found:
                    raise FileNotFoundError(
                        f"--ckpt_path last: no {root}/*/checkpoints/last.ckpt to resume from. Pass a checkpoint path, "
                        f"or the --run_name / --trainer.default_root_dir of the run to resume."
                    )
                cfg.ckpt_path = str(found[-1])
                self._resume_dir = found[-1].parent.parent
            elif path:
                if not Path(path).is_file():
                    raise FileNotFoundError(f"--ckpt_path {path}: no such checkpoint file")
                if self.config.subcommand == "fit" and Path(path).parent.name == "checkpoints":
                    self._resume_dir = Path(path).parent.parent
                elif self.config.subcommand == "fit" and Path(path).name.startswith("hpc_ckpt_"):
                    self._resume_dir = Path(path).parent  # a SLURM job's checkpoint, written in its run directory
            if cfg.get("ckpt_path"):
                self._apply_checkpoint_hparams(Path(cfg.ckpt_path))

    def _apply_checkpoint_hparams(self, path: Path) -> None:
        """Lightning's own step, which this replaces (``LightningCLI._parse_ckpt_path``, a private hook with no
        public equivalent): the checkpoint's hyperparameters become the model's configuration, so that
        ``validate``/``predict`` build the network it holds. Here the file is read ``weights_only``, must be a
        checkpoint of this task (another task's says which wrote it), may not ask to build a class (jsonargparse
        would build it), and a resumed run may not change what it trains (:func:`checkpoint_conflicts`)."""
        if path.suffix == ".safetensors":
            raise WeightsError(
                f"--ckpt_path {path} is a .safetensors weight file, not a checkpoint of a run: start a run from it "
                f"with --model.weights {path} (a whole model) or --model.weights_backbone {path} (its backbone)"
            )
        raw = torch_load_safe(path, f"checkpoint {path}")  # refuses pickled code, clearly
        if not is_task_checkpoint(raw):
            raise WeightsError(f"--ckpt_path {path}: {describe(raw)}; --ckpt_path takes a checkpoint of this task")
        refuse_class_specs(raw["hyper_parameters"] or {}, path)
        recorded = raw.get("task")
        kind = getattr(self.model_class, "kind", "")
        if recorded and kind and registry.kind_of(recorded) != kind:
            other = registry.kind_of(recorded)
            raise WeightsError(
                f"--ckpt_path {path} is a checkpoint of {recorded}: run python -m tasks.{other} "
                f"{self.config.subcommand} with it"
            )
        hparams = {k: v for k, v in dict(raw["hyper_parameters"] or {}).items() if not str(k).startswith("_")}
        if not hparams:
            return
        cfg = self.config[self.config.subcommand]
        conflicts = checkpoint_conflicts(cfg, hparams, raw.get("datamodule_hyper_parameters") or {})
        if conflicts and self.config.subcommand == "fit":
            raise ValueError(
                f"--ckpt_path {path}: resuming with {', '.join(conflicts)} would not resume the same run (the "
                f"checkpoint's weights, learning rate and data position are for its own values); drop these flags, "
                f"or start a new run from its weights with --model.weights {path}"
            )
        model_conflicts = [c for c in conflicts if c.startswith("model.")]
        if model_conflicts:
            rank_zero_warn(
                f"--ckpt_path {path}: the checkpoint's architecture is used ({', '.join(model_conflicts)}): its "
                f"weights are for its own"
            )
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    # -- run directory, logger and safety defaults ------------------------------------------------
    def _run_name(self, cfg: Namespace) -> str:
        if cfg.get("run_name"):
            return cfg.run_name
        configs = cfg.get("config") or []
        if configs:
            return Path(str(configs[0])).stem
        return self.model_class.__name__.lower().replace("task", "")

    def _run_dir(self, cfg: Namespace, name: str) -> Path:
        inherited = os.environ.get(RUN_DIR_ENV)
        if inherited and os.environ.get("LOCAL_RANK", "0") != "0":
            return Path(inherited)  # a process started by Lightning's DDP launcher for the parent's run
        if getattr(self, "_resume_dir", None) is not None and self.subcommand == "fit":
            os.environ[RUN_DIR_ENV] = str(self._resume_dir)
            return self._resume_dir  # resuming: same directory, same W&B run
        if self._evaluates_a_checkpoint(cfg):
            ckpt = Path(cfg.ckpt_path)
            home = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
            run_dir = home / self.subcommand  # beside the checkpoint's run, not a new version_<n>
            os.environ[RUN_DIR_ENV] = str(run_dir)
            return run_dir
        root = Path(cfg.trainer.get("default_root_dir") or "runs") / name
        version = cfg.get("run_version")
        if not version and os.environ.get("SLURM_JOB_ID"):
            version = f"job_{os.environ['SLURM_JOB_ID']}"  # the same across requeues and ranks
        elif not version and os.environ.get("TORCHELASTIC_RUN_ID", "none") != "none":
            version = f"torchrun_{os.environ['TORCHELASTIC_RUN_ID']}"  # torchrun --rdzv-id: shared by all ranks
        if version:
            run_dir = root / version
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ:
            run_dir = agree_on_run_dir(root)  # ranks started together by an external launcher
        else:
            run_dir = root / next_version(root)
        os.environ[RUN_DIR_ENV] = str(run_dir)  # children of Lightning's launcher inherit it
        return run_dir

    def _evaluates_a_checkpoint(self, cfg: Namespace) -> bool:
        """``validate``, ``test`` or ``predict`` of a checkpoint without a ``--run_name`` or ``--run_version`` of
        its own: it writes into ``<the checkpoint's run>/<subcommand>/`` and starts no W&B run (its metrics go to
        that folder's ``metrics.csv``)."""
        return (
            self.subcommand in ("validate", "test", "predict") and bool(cfg.get("ckpt_path"))
            and not cfg.get("run_name") and not cfg.get("run_version")
        )  # fmt: skip

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        if self.subcommand and hasattr(self.model_class, "refuse_arguments"):  # before anything is made
            self.model_class.refuse_arguments(self.subcommand, cfg.model.as_dict(), cfg.get("ckpt_path"))
        name = self._run_name(cfg)
        run_dir = self._run_dir(cfg, name)
        cfg.trainer.default_root_dir = str(run_dir)
        if writes_run_directory():  # one run, one directory: locked while it runs (tasks.run.run_dirs)
            self._run_directory = RunDirectory(run_dir)
            self._run_directory.claim()
        if self.subcommand == "fit" and not cfg.get("ckpt_path") and slurm.restarted_job():
            resume = slurm.resume_point(run_dir)  # a requeued job: its own run directory has checkpoints
            if resume is not None:
                # the step for the log line, from a mapped file: Lightning reads the checkpoint itself next
                step = torch_load_safe(resume, f"checkpoint {resume}", mmap=True).get("global_step")
                cfg.ckpt_path = str(resume)
                rank_zero_info(
                    f"SLURM job {os.environ['SLURM_JOB_ID']} restarted: resuming from {resume} at step {step}"
                )
        if cfg.get("checkpoint") is not None and cfg.checkpoint.get("dirpath") is None:
            cfg.checkpoint.dirpath = str(run_dir / "checkpoints")
        if self.subcommand and cfg.get("ckpt_path"):
            # The checkpoint holds every weight: do not fetch the initialization sources it started from.
            for key in ("weights", "weights_backbone"):
                if cfg.model.get(key) is not None:
                    cfg.model[key] = None
        if self.subcommand and cfg.get("weights_only") is None:
            cfg.weights_only = True  # checkpoints never run code when loaded
        if (
            cfg.trainer.get("precision") is None
            and torch.cuda.is_available()
            and cfg.trainer.get("accelerator", "auto") in ("auto", "gpu", "cuda")
        ):
            cfg.trainer.precision = "bf16-mixed"
        devices = cfg.trainer.get("devices")
        if (
            str(devices).isdigit() and int(devices) > 1 and not torch.cuda.is_available()
            and cfg.trainer.get("accelerator", "auto") in ("auto", "cpu")
        ):  # fmt: skip
            rank_zero_info(
                f"--trainer.devices {devices} on a machine without GPUs: {devices} CPU processes (DDP over gloo), "
                f"each with its share of the data and data.batch_size images a step"
            )
        if cfg.trainer.get("benchmark") is None and not cfg.trainer.get("deterministic"):
            # (with --trainer.deterministic, cuDNN's search would make the run non-deterministic)
            cfg.trainer.benchmark = getattr(self.model_class, "cudnn_benchmark", None)
        self._configure_wandb(cfg, name, run_dir)

    def _configure_wandb(self, cfg: Namespace, name: str, run_dir: Path) -> None:
        logger = cfg.trainer.get("logger")
        if not isinstance(logger, Namespace) or not str(logger.get("class_path", "")).endswith("WandbLogger"):
            return
        if self._evaluates_a_checkpoint(cfg):  # no W&B run for evaluating a checkpoint: metrics.csv beside it
            cfg.trainer.logger = Namespace(
                class_path="tasks.run.loggers.ResumableCSVLogger",
                init_args=Namespace(save_dir=str(run_dir), name="", version=""),
            )
            return
        init = logger.init_args
        if init.get("save_dir") in (None, "."):
            init.save_dir = str(run_dir)
        if not init.get("name"):
            init.name = name
        if not init.get("offline") and "WANDB_MODE" not in os.environ and not wandb_credentials_available():
            init.offline = True
            rank_zero_info(
                f"W&B: no credentials found (WANDB_API_KEY, a netrc entry for the W&B host, "
                f"WANDB_IDENTITY_TOKEN_FILE), logging offline to {run_dir}/wandb. Upload later with "
                f"`wandb sync {run_dir}/wandb/offline-run-*`, or run `wandb login` to log online."
            )
        # The run id lives next to the checkpoints, so a resumed run logs into the same W&B run.
        id_file = run_dir / "wandb_id"
        if not init.get("id"):
            if id_file.is_file():
                init.id = id_file.read_text().strip()
                init.resume = "allow"
            else:
                init.id = generate_run_id()
        if rank_zero_only.rank == 0 and not id_file.is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(init.id)

    def _finish_wandb(self) -> None:
        """Close the W&B run this run's WandbLogger started (it creates its run on first use), on rank 0."""
        if self.trainer.is_global_zero and any(isinstance(lg, WandbLogger) for lg in self.trainer.loggers):
            import wandb

            if wandb.run is not None:
                wandb.finish()

    def instantiate_classes(self) -> None:
        """LightningCLI's, releasing the run directory (and removing what this run made there) when building the
        model, the data or the trainer fails: a run that fails before writing anything leaves nothing behind."""
        try:
            super().instantiate_classes()
        except BaseException:
            if self._run_directory is not None:
                self._run_directory.remove_if_unused()
                self._run_directory.release()
            raise

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> pl.Trainer:
        # (private in LightningCLI; the public instantiate_trainer does not see the parsed config's plugins and
        # loggers before the Trainer is built. Lightning's minor version is bounded in pyproject.)
        """Add the reliability defaults (atomic, weights-only checkpoints and a checkpoint on interruption) and,
        beside any logger, a ``metrics.csv`` in the run directory (what ``studies report`` reads)."""
        loggers = config.get("logger")
        if loggers not in (None, False, True):
            loggers = list(loggers) if isinstance(loggers, (list, tuple)) else [loggers]
            if not any(isinstance(lg, CSVLogger) for lg in loggers):
                csv_logger = ResumableCSVLogger(save_dir=config["default_root_dir"], name="", version="")
                config["logger"] = [*loggers, csv_logger]
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(hasattr(p, "save_checkpoint") for p in plugins):
            plugins = [*plugins, AtomicCheckpointIO()]
        extra = [InterruptCheckpoint(), ValidateAtEnd(), ValidationLine(), *console_callbacks(config, callbacks)]
        if slurm.under_slurm() and not any(hasattr(p, "main_address") for p in plugins):
            # SLURM's time-limit warning is handled at a step all ranks agree on (tasks.run.slurm), not in
            # Lightning's signal handler
            plugins = [*plugins, SLURMEnvironment(auto_requeue=False)]
            extra.append(slurm.SlurmRequeue())
        config["plugins"] = plugins
        return super()._instantiate_trainer(config, [*callbacks, *extra])

    # -- after each subcommand, even a failed one: close the W&B run, so in-process runs start fresh ----
    def _run_subcommand(self, subcommand: str) -> None:
        # LightningCLI's private step that runs the subcommand: the only place to clean up after a failed one
        # (the before_/after_ hooks do not run on errors); Lightning's minor version is bounded in pyproject
        try:
            super()._run_subcommand(subcommand)
        except slurm.StoppedForRequeue:
            pass  # saved; the job is requeued below, once the loggers are closed
        except BaseException:
            if self._run_directory is not None:
                self._run_directory.release()  # (closes the W&B run's files too: below)
                self._finish_wandb()
                self._run_directory.remove_if_unused(self.trainer.global_step)
            raise
        finally:
            if self._run_directory is not None:
                self._run_directory.release()
            if os.environ.get("LOCAL_RANK", "0") == "0":
                os.environ.pop(RUN_DIR_ENV, None)
            self._finish_wandb()
            for callback in self.trainer.callbacks:
                if isinstance(callback, slurm.SlurmRequeue):
                    callback.requeue(self.trainer)  # last: SLURM ends this run of the job when it is requeued


def entry_point(task_class: type[pl.LightningModule]) -> Callable[[ArgsType], TaskCLI]:
    """A task module's ``main``: ``main([...])`` runs the CLI in-process (the tests use it), ``main()`` reads
    ``sys.argv``."""

    def main(args: ArgsType = None) -> TaskCLI:
        """Entry point; ``main([...])`` runs the CLI in-process."""
        return TaskCLI(task_class, args=args)

    return main


def script(main) -> None:
    """Run a task's ``main`` as a command: user errors print one clear message instead of a traceback
    (``zoo_common.command.run_command``; unreadable images and a non-finite loss count as user errors too);
    a run stopped by SIGTERM exits with 143, without a traceback.
    """
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    try:
        run_command(main, (CorruptImageError, NonFiniteLossError, RunDirectoryBusy, OSError, MisconfigurationException))
    except SIGTERMException:
        sys.exit(128 + signal.SIGTERM)  # stopped by SIGTERM; InterruptCheckpoint has logged what it saved
