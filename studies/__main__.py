"""``python -m studies list|run|report``: re-run the papers' experiments and compare with the papers.

    python -m studies list
    python -m studies run degradation_cifar --data.root /data/cifar [--variants plain20 resnet20] [any fit option]
    python -m studies run degradation_cifar --print-commands      # one `tasks.classify fit` line per variant
    python -m studies run degradation_cifar --index $SLURM_ARRAY_TASK_ID --data.root /data/cifar
    python -m studies report degradation_cifar [--root runs] [--out reports] [--wandb entity/project]

``run`` launches each variant as a normal ``tasks.classify fit`` of the study's config with the variant's
backbone and options, named ``<study>-<variant>`` and tagged with the study's name in W&B (so one GPU,
DDP or a SLURM array job per variant all work: options after the study name go to every fit).
``report`` writes ``<study>.md`` (a table beside the paper's numbers) and ``<study>.png`` (error curves).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from .catalog import STUDIES, Study
from .report import build_report, run_name


def fit_args(study: Study, variant_name: str, extra: list[str]) -> list[str]:
    variant = next(v for v in study.variants if v.name == variant_name)
    return [
        "fit",
        "--config", str(study.config_path),
        "--model.backbone", variant.backbone,
        "--model.backbone_args", json.dumps(variant.backbone_args),
        "--run_name", run_name(study, variant.name),
        "--trainer.logger.init_args.tags", json.dumps([study.name, variant.name]),
        "--trainer.logger.init_args.group", study.name,
        *extra,
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the studies and their variants")
    run = commands.add_parser("run", help="train a study's variants (other options go to every fit)")
    run.add_argument("study", choices=list(STUDIES))
    run.add_argument("--variants", nargs="*", help="only these variants")
    run.add_argument("--index", type=int, help="only the variant at this index (SLURM array jobs)")
    run.add_argument("--print-commands", action="store_true", help="print the fit commands instead of running")
    report = commands.add_parser("report", help="table and plot of a study's runs")
    report.add_argument("study", choices=list(STUDIES))
    report.add_argument("--root", default="runs", help="run directories' root (trainer.default_root_dir)")
    report.add_argument("--out", default="reports")
    report.add_argument("--wandb", help="read the runs from W&B (ENTITY/PROJECT) instead of local directories")
    args, extra = parser.parse_known_args(argv)

    if args.command == "list":
        for study in STUDIES.values():
            print(f"{study.name:22s} {study.where:28s} {', '.join(v.name for v in study.variants)}")
        return 0
    study = STUDIES[args.study]
    if args.command == "report":
        if extra:
            parser.error(f"unknown options for report: {' '.join(extra)}")
        markdown, plot = build_report(study, Path(args.root), Path(args.out), args.wandb)
        print(markdown.read_text())
        print(f"table: {markdown}\nplot:  {plot}")
        return 0
    names = [v.name for v in study.variants]
    unknown = [n for n in args.variants or [] if n not in names]
    if unknown:
        parser.error(f"unknown variants {unknown}; {study.name} has {', '.join(names)}")
    chosen = args.variants or names
    if args.index is not None:
        chosen = [names[args.index]]
    if args.print_commands:
        for name in chosen:
            print("python -m tasks.classify " + shlex.join(fit_args(study, name, extra)))
        return 0
    from tasks import classify

    started = time.perf_counter()
    for done, name in enumerate(chosen, start=1):
        print(f"== {study.name}: {name} ({done} of {len(chosen)})", flush=True)
        start = time.perf_counter()
        cli = classify.main(fit_args(study, name, extra))
        best = cli.trainer.checkpoint_callback.best_model_score if cli.trainer.checkpoint_callback else None
        line = f"== {study.name}: {name} done in {time.perf_counter() - start:.0f} s"
        line += f", best val/acc1 {float(best):.4f}" if best is not None else ""
        if done < len(chosen):  # the variants are the same recipe on networks of a size: the mean is a fair guess
            left = (time.perf_counter() - started) / done * (len(chosen) - done)
            line += f"; {len(chosen) - done} to go, about {left / 60:.0f} min"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    from zoo_common.command import run_command

    run_command(main)
