"""The code's layout holds: floors without import circles, one task layer, files that stay readable.

These read the source, as a reviewer would: the import graph (module-level and function-level imports
alike), each module's length, and runs of lines two task modules share.
"""

from __future__ import annotations

import ast
import io
import keyword
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo_common", "backbones", "datamodules", "tasks", "studies")
#: what each package may import from the others: the floors, from the ground up
ALLOWED = {
    "zoo_common": set(),
    "backbones": {"zoo_common"},
    "datamodules": {"zoo_common"},
    "tasks": {"zoo_common", "backbones", "datamodules"},
    "studies": {"zoo_common", "backbones", "datamodules", "tasks"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(imported module, names, line)`` for every import in the file, resolved to absolute names."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((module, [alias.name for alias in node.names], node.lineno))
    return found


def _sources() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _graph() -> dict[str, set[str]]:
    modules = _sources()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for module, names, _ in _imports(path):
            targets = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules] or [module]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def test_the_import_graph_has_floors_and_no_cycle():
    graph = _graph()
    crossings = [
        f"{source} imports {target}"
        for source, targets in graph.items()
        for target in targets
        if target.split(".")[0] != source.split(".")[0] and target.split(".")[0] not in ALLOWED[source.split(".")[0]]
    ]
    assert not crossings, crossings
    # Cycles, module-level and function-level imports alike (a package's __init__ re-exporting its own
    # modules is not a cycle of the code: the modules never import the package back through it).
    edges = {s: {t for t in ts if not (t == s.split(".")[0] and "." in s)} for s, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(nxt) :] + [nxt])}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_no_private_name_crosses_a_package_boundary():
    found = []
    for name, path in _sources().items():
        for module, names, line in _imports(path):
            other = module.split(".")[0]
            if other in PACKAGES and other != name.split(".")[0]:
                found += [f"{path.relative_to(ROOT)}:{line} {module}.{n}" for n in names if n.startswith("_")]
    assert not found, found


def _strings(path: Path) -> list[ast.Constant]:
    """The string constants of a module's code, its docstrings left out."""
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(getattr(node, "body", None), list) and node.body and isinstance(node.body[0], ast.Expr)
    }
    strings = [node for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]
    return [node for node in strings if id(node) not in docstrings]


def test_backbones_name_no_task_attribute():
    """The networks' package knows nothing of the tasks, not even where they keep a backbone, as strings."""
    for path in (ROOT / "backbones").glob("*.py"):
        for node in _strings(path):
            text = node.value
            assert not text.startswith(("backbone.", "model.", "detector.")), f"{path.name}: {text!r}"
            assert "roi_heads" not in text and "box_head" not in text, f"{path.name}: {text!r}"


@pytest.mark.parametrize("package", ["tasks", "datamodules"])
def test_modules_stay_readable(package):
    lengths = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in (ROOT / package).rglob("*.py")}
    long = {name: n for name, n in lengths.items() if n > 450}
    assert not long, long


# -- the wings of tasks/ --------------------------------------------------------------------------------
#: what each wing of ``tasks`` may import from ``tasks`` (module prefixes), and whether it may import Lightning
WINGS: dict[str, tuple[set[str], bool]] = {
    "tasks.heads": ({"tasks.heads"}, False),  # plain nn.Modules
    "tasks.metrics": ({"tasks.metrics"}, False),  # benchmarks' definitions
    "tasks.outputs": ({"tasks.outputs"}, True),  # writers, drawings, W&B media
    "tasks.core": ({"tasks.core", "tasks.outputs", "tasks.registry"}, True),  # the base task, no task module
    "tasks.run": ({"tasks.run", "tasks.core", "tasks.registry"}, True),  # the CLI and what a run needs
    "tasks.inference": ({"tasks.inference", "tasks.core", "tasks.registry"}, True),  # no task by name
    "tasks.registry": (set(), False),  # strings only
}
#: what may sit directly in tasks/: the commands and the registry
TOP_LEVEL = {
    "__init__", "registry", "classify", "detect", "segment", "localize", "instance_segment", "export", "plot", "demo"
}  # fmt: skip
#: where code must not branch on which task it holds
NO_TASK_NAMES = ("tasks/inference", "tasks/outputs", "tasks/export.py")


def _wing_of(module: str) -> str | None:
    return next((w for w in WINGS if module == w or module.startswith(f"{w}.")), None)


def wing_violations(root: Path) -> list[str]:
    """Each import from a wing of ``tasks`` that its rule forbids, and any file directly in ``tasks/`` that is
    neither a command nor the registry."""
    found = []
    for path in sorted((root / "tasks").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        if path.parent == root / "tasks" and path.stem not in TOP_LEVEL:
            found.append(f"{path.relative_to(root)}: only commands and the registry sit directly in tasks/")
        wing = _wing_of(module)
        if wing is None:
            continue
        allowed, lightning = WINGS[wing]
        tree = ast.parse(path.read_text())
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                target = ".".join([*base, node.module] if node.module else base)
                targets = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                if target.split(".")[0] in ("lightning", "pytorch_lightning", "torchmetrics") and not lightning:
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {target} (no Lightning in {wing})")
                if (
                    target.startswith("tasks")
                    and target != "tasks"
                    and not any(target == a or target.startswith(f"{a}.") for a in allowed)
                ):
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {target} ({wing} may not)")
    return found


def task_name_branches(root: Path) -> list[str]:
    """String constants naming a task kind (``"detect"``, ...) in code that must not know which task it holds
    (docstrings aside)."""
    kinds = {"classify", "detect", "segment", "localize", "instance_segment"}
    found = []
    for where in NO_TASK_NAMES:
        base = root / where
        for path in sorted([base] if base.is_file() else base.rglob("*.py")):
            for node in _strings(path):
                if node.value in kinds:
                    found.append(f"{path.relative_to(root)}:{node.lineno} names the task {node.value!r}")
    return found


def test_each_wing_imports_only_what_its_rule_allows():
    assert not wing_violations(ROOT), wing_violations(ROOT)


def test_inference_export_and_outputs_never_branch_on_a_task_name():
    assert not task_name_branches(ROOT), task_name_branches(ROOT)


@pytest.mark.parametrize(
    ("where", "planted", "caught"),
    [
        ("tasks/heads/faster_rcnn.py", "import lightning.pytorch as pl\n", "no Lightning in tasks.heads"),
        ("tasks/metrics/devkits.py", "from ..core.base import BaseTask\n", "tasks.metrics may not"),
        ("tasks/core/optim.py", "from .. import detect\n", "tasks.core may not"),
        ("tasks/inference/predictor.py", "from ..detect import DetectionTask\n", "tasks.inference may not"),
        ("tasks/outputs/writers.py", "KIND = 'segment'\n", "names the task 'segment'"),
        ("tasks/helpers.py", "X = 1\n", "only commands and the registry"),
    ],
)
def test_a_planted_violation_is_caught(where, planted, caught, tmp_path):
    """The rules above catch what they forbid: a copy of tasks/ with one violation planted fails them."""
    import shutil

    shutil.copytree(ROOT / "tasks", tmp_path / "tasks", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / where
    target.write_text((target.read_text() if target.exists() else "") + planted)
    assert not wing_violations(ROOT) and not task_name_branches(ROOT)
    found = wing_violations(tmp_path) + task_name_branches(tmp_path)
    assert any(caught in line for line in found), found


def _shapes(path: Path) -> list[tuple[int, str]]:
    """``(line, shape)`` of each line of code: names, strings and numbers replaced by placeholders. Prose
    (docstrings, comments) counts as its text, so only identical prose matches; imports and blank lines
    are left out."""
    source = path.read_text()
    lines = source.splitlines()
    rows: dict[int, list[str]] = {}
    skip: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            value = body[0].value
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                for line in range(body[0].lineno, body[0].end_lineno + 1):
                    skip.add(line)
                    rows[line] = [lines[line - 1].strip()]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and tok.start[0] not in skip:
            rows.setdefault(tok.start[0], []).append(tok.string)
            continue
        if tok.type in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            continue
        if tok.start[0] in skip or tok.type == tokenize.ENDMARKER:
            continue
        if tok.type == tokenize.NAME and not keyword.iskeyword(tok.string):
            text = "N"
        elif tok.type == tokenize.STRING or tok.type in (getattr(tokenize, "FSTRING_START", -1),):
            text = "S"
        elif tok.type in (getattr(tokenize, "FSTRING_MIDDLE", -1), getattr(tokenize, "FSTRING_END", -1)):
            continue
        elif tok.type == tokenize.NUMBER:
            text = "0"
        else:
            text = tok.string
        rows.setdefault(tok.start[0], []).append(text)
    return [(line, " ".join(tokens)) for line, tokens in sorted(rows.items()) if line not in skip or tokens]


def test_no_two_task_modules_share_six_lines_of_the_same_shape():
    tasks = [
        ROOT / "tasks" / f"{name}.py" for name in ("classify", "detect", "segment", "localize", "instance_segment")
    ]
    tasks = [p for p in tasks if p.is_file()]
    windows: dict[str, dict[tuple, int]] = {}
    for path in tasks:
        shapes = _shapes(path)
        windows[path.name] = {tuple(s for _, s in shapes[i : i + 6]): shapes[i][0] for i in range(len(shapes) - 5)}
    shared = []
    for i, a in enumerate(tasks):
        for b in tasks[i + 1 :]:
            for run, line in windows[a.name].items():
                if run in windows[b.name]:
                    shared.append(f"{a.name}:{line} ~ {b.name}:{windows[b.name][run]}")
    assert not shared, shared
