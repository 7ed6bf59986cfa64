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


def test_backbones_name_no_task_attribute():
    """The networks' package knows nothing of the tasks, not even where they keep a backbone, as strings."""
    for path in (ROOT / "backbones").glob("*.py"):
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(getattr(node, "body", None), list) and node.body and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                text = node.value
                assert not text.startswith(("backbone.", "model.", "detector.")), f"{path.name}: {text!r}"
                assert "roi_heads" not in text and "box_head" not in text, f"{path.name}: {text!r}"


@pytest.mark.parametrize("package", ["tasks", "datamodules"])
def test_modules_stay_readable(package):
    long = {p.name: n for p in (ROOT / package).glob("*.py") if (n := len(p.read_text().splitlines())) > 460}
    assert not long, long


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
    tasks = [ROOT / "tasks" / f"{name}.py" for name in ("classify", "detect", "segment", "localize")]
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
