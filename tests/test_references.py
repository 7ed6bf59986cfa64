"""What the prose names exists: every dotted name of the project's code in the README, the docs, the configs,
the scripts and the docstrings imports, and every option a command's docstring names is one of its options.
(A moved class left ``scripts/slurm/train.sbatch`` naming ``tasks.reliability.SlurmRequeue``; a docstring
named ``--no-decode`` for ``--no_decode``.)"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tasks", "datamodules", "backbones", "studies", "benchmarks", "zoo_common")
DOTTED = re.compile(r"\b(?:" + "|".join(PACKAGES) + r")(?:\.[A-Za-z_][A-Za-z_0-9]*)+")
#: where the names are read: prose and configs, and every module (docstrings and comments included)
SOURCES = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "configs").glob("*.yaml"),
           *(ROOT / "scripts").rglob("*.s*"), *(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))]  # fmt: skip


def resolves(name: str) -> bool:
    """Whether ``name`` is a module, or an attribute (a class, a function, a method) reached from one."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def dotted_names(text: str) -> set[str]:
    names = set()
    for match in DOTTED.finditer(text):
        name = match.group(0).rstrip(".")
        if re.search(r"\.(py|md|yaml|txt|json|sh|sbatch|jsonl|png|csv|ckpt|onnx|pt2)$", name):
            continue  # a file name, not a code name
        names.add(name)
    return names


def test_every_named_class_function_and_module_exists():
    missing = {}
    for path in SOURCES:
        for name in dotted_names(path.read_text()):
            if not resolves(name):
                missing.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not missing, missing


#: each command and the ``--help`` calls that list all its options (its subcommands')
COMMANDS = {
    "datamodules.check": [[]],
    "tasks.export": [[]],
    "backbones.export": [[]],
    "studies.__main__": [["list"], ["run"], ["report"]],
}


@pytest.mark.parametrize("module", list(COMMANDS))
def test_the_options_a_command_docstring_names_are_its_options(module, capsys):
    mod = importlib.import_module(module)
    named = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", mod.__doc__ or ""))
    help_text = ""
    for prefix in COMMANDS[module]:
        with pytest.raises(SystemExit):
            mod.main([*prefix, "--help"])
        help_text += capsys.readouterr().out
    known = set(re.findall(r"(--[a-z][a-z0-9_-]*)", help_text))
    stray = {option for option in named - known if not option.startswith(("--data", "--model", "--trainer"))}
    assert not stray, (module, stray)
