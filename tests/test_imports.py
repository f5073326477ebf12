"""No underscore-private name of this project is used from another module.

Read from the source with `ast`, over every .py file in framepack/, bench/ and tests/. A use is:
- `from M import _name` (absolute or relative), where M is a module of this project;
- `M._name`, where `M` is bound to a project module by `import` or `from ... import module`;
- `setattr(M, "_name", ...)` / `monkeypatch.setattr(M, "_name", ...)` / `getattr(M, "_name")`,
  and the string targets `monkeypatch.setattr("framepack.x._name", ...)` / `patch("...")`.

Project modules are `framepack.*` and the sibling files of bench/ and tests/, which those folders
import by bare name (bench puts its own folder on `sys.path`, pytest does so for tests/).
A module whose own file name starts with an underscore (`bench/_record.py`) is a private helper of
its folder: importing that module is allowed, but the underscore names inside it stay private.
Dunder names (`__version__`, `__file__`) are public. Third-party private names are out of scope.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("framepack", "bench", "tests")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] != "framepack":  # bench/ and tests/ import their siblings by bare name
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _files() -> list[Path]:
    return sorted(p for folder in FOLDERS for p in (ROOT / folder).rglob("*.py"))


def _modules(path: Path) -> dict[str, Path]:
    """The project modules `path` can import: the package, and its own folder's siblings."""
    folder = path.relative_to(ROOT).parts[0]
    return {_module_name(p): p for p in _files() if p.relative_to(ROOT).parts[0] in ("framepack", folder)}


def resolve_from(path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name of a `from ... import` (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _uses(path: Path, modules: dict[str, Path]) -> list[tuple[int, str, str]]:
    """(line, module, name) for each private name of another project module used in `path`."""
    own = _module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    bound: dict[str, str] = {}  # local name -> project module it is bound to
    found: list[tuple[int, str, str]] = []

    def other(module: str) -> bool:
        return module in modules and module != own

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in modules:
                    bound[alias.asname] = alias.name
                elif not alias.asname:
                    top = alias.name.split(".")[0]
                    if top in modules:
                        bound[top] = top
        elif isinstance(node, ast.ImportFrom):
            module = resolve_from(path, node)
            for alias in node.names:
                submodule = f"{module}.{alias.name}" if module else alias.name
                if submodule in modules:
                    bound[alias.asname or alias.name] = submodule
                elif other(module) and _is_private(alias.name):
                    found.append((node.lineno, module, alias.name))

    def resolve(expr: ast.expr) -> str | None:
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = resolve(expr.value)
            if base is not None and f"{base}.{expr.attr}" in modules:
                return f"{base}.{expr.attr}"
        return None

    def check(line: int, module: str | None, name: str) -> None:
        if module is not None and other(module) and _is_private(name):
            found.append((line, module, name))

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            check(node.lineno, resolve(node.value), node.attr)
        elif isinstance(node, ast.Call) and node.args:
            first = node.args[0]
            second = node.args[1] if len(node.args) > 1 else None
            if isinstance(second, ast.Constant) and isinstance(second.value, str):
                check(node.lineno, resolve(first), second.value)
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                module, _, name = first.value.rpartition(".")
                check(node.lineno, module, name)
    return found


def test_resolves_relative_imports() -> None:
    path = ROOT / "framepack" / "pipeline" / "extend.py"
    node = ast.parse("from .settings import x").body[0]
    assert resolve_from(path, node) == "framepack.pipeline.settings"
    init = ROOT / "framepack" / "pipeline" / "__init__.py"
    assert resolve_from(init, ast.parse("from ..io import x").body[0]) == "framepack.io"


def test_no_private_name_used_across_modules() -> None:
    offences = sorted(
        {
            f"{path.relative_to(ROOT)}:{line}: {name} (from {module})"
            for path in _files()
            for line, module, name in _uses(path, _modules(path))
        },
        key=lambda offence: (offence.split(":")[0], int(offence.split(":")[1])),
    )
    assert not offences, "private names used across modules:\n" + "\n".join(offences)
