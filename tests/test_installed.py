"""What an install must hold: every module imports, and every package the code imports is declared in
pyproject.toml (the core dependencies, or the extra whose feature imports it). CI also runs this module, with a
short fit of each task (tests/test_demo.py), on the declared minimum versions (.ci/minimum_versions.sh)."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import pkgutil
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo_common", "backbones", "datamodules", "tasks", "benchmarks", "studies")
#: the extras a module's imports may come from, by where it sits (everything else: the core dependencies)
EXTRAS_OF = {"tasks/export.py": ("export",), "benchmarks/": ("dev", "export"), "studies/": ()}


def _declared() -> dict[str, set[str]]:
    """``{"core" or an extra: {distribution names, normalized}}`` from pyproject.toml."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project.get("optional-dependencies", {})}
    name = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
    return {g: {_normal(name.match(r).group(1)) for r in reqs} for g, reqs in groups.items()}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _catches_import_error(node: ast.Try) -> bool:
    names = []
    for handler in node.handlers:
        kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
        names += [k.id for k in kinds if isinstance(k, ast.Name)]
    return bool({"ImportError", "ModuleNotFoundError"} & set(names))


def _modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_module_imports():
    failed = {}
    for package in PACKAGES:
        for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
            if info.name.endswith("__main__"):
                continue  # a command: running it is what importing it does
            try:
                importlib.import_module(info.name)
            except ImportError as err:  # the optional extras are installed with the suite (make test)
                failed[info.name] = repr(err)
    assert not failed, failed


def test_every_imported_package_is_declared():
    """Each import of a third-party package, in any module, maps to a declared distribution: the core list,
    or an extra the module's place allows (``EXTRAS_OF``); an import inside ``try: ... except ImportError`` is
    optional (its module names what to install)."""
    declared = _declared()
    owners = importlib.metadata.packages_distributions()
    local = set(PACKAGES) | set(sys.stdlib_module_names) | {"__future__"}
    missing = []
    for path in _modules():
        where = str(path.relative_to(ROOT))
        allowed = set(declared["core"])
        for prefix, extras in EXTRAS_OF.items():
            if where.startswith(prefix):
                allowed |= {d for e in extras for d in declared.get(e, ())}
        tree = ast.parse(path.read_text())
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) and _catches_import_error(t)
                   for b in t.body for n in ast.walk(b)}  # fmt: skip
        for node in ast.walk(tree):
            if id(node) in guarded:
                continue  # optional at run time: the module says what to install when it is missing
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in local:
                    continue
                dists = {_normal(d) for d in owners.get(top, [top])}
                if not dists & allowed:
                    missing.append(f"{where}:{node.lineno} imports {top} ({', '.join(sorted(dists))}): not declared")
    assert not missing, "\n".join(missing)
