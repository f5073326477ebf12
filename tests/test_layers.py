"""The package's imports point down: no import cycle, and each layer imports only the layers below.

Read from the source with `ast`: every `import` and `from ... import` in framepack/, at module level
or inside a function (a lazy import is still a dependency), resolved to the project module it
names (`from .x import name` is an import of `x`, or of `x.name` when that is a module). The
layers, top to bottom, are the ones `docs/ARCHITECTURE.md` describes.
"""

from __future__ import annotations

import ast
from pathlib import Path

from test_imports import resolve_from  # the same resolution of relative imports

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "framepack"

# Top to bottom; a package may import its own modules and any package on a lower line.
LAYERS = [
    ("__main__", "train"),  # the entry points `python -m framepack` and `python -m framepack.train`
    ("cli",),  # the command line
    ("gui",),  # the web GUI
    ("training",),  # training, the demo model, step-cache calibration
    ("testing",),  # tiny bundles for tests and benchmarks
    ("pipeline",),  # bundles, settings, the run, its sections, jobs and outputs
    ("caching", "lora", "parallel"),  # step caches; LoRA formats and application; sequence parallel
    ("memory",),  # weight streaming, offload, estimates
    ("sampling", "model"),  # samplers and sigma schedules; the transformer
    ("packing", "io"),  # packing schedules and layouts; files, images, video
    ("devices", "framepack"),  # device names; the root package (its version, lazy names)
]
RANK = {name: level for level, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _project_module(name: str) -> str | None:
    """The project module `name` is, or is inside of (`framepack.io.files.x` -> `framepack.io.files`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports() -> dict[str, set[str]]:
    """Every project module -> the project modules it imports (itself left out)."""
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = resolve_from(path, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            else:
                continue
            found.update(m for t in targets if (m := _project_module(t)) is not None and m != name)
        graph[name] = found
    return graph


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "framepack"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_package_is_in_a_layer():
    assert {_layer(m) for m in MODULES} <= set(RANK), {_layer(m) for m in MODULES} - set(RANK)


def test_no_import_cycle():
    assert cycles(imports()) == []


def test_imports_point_down():
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in imports().items()
        for target in targets
        if _layer(module) != _layer(target) and RANK[_layer(target)] <= RANK[_layer(module)]
    )
    assert upward == []


def test_the_checks_see_a_cycle_and_an_upward_import():
    """The checks themselves: a made-up cycle is found, and a made-up upward import would be."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert RANK[_layer("framepack.memory.offload")] > RANK[_layer("framepack.caching.step_cache")]
    assert "framepack.pipeline.run" in imports()["framepack.cli.generate"]
