"""The import graph, drawn from the code (every import: at the top, inside functions, and for
type checking only): the codec's modules import each other one way, and the engine talks to
the decode scheduler only through its public handle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "miotts_stream"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(module: str) -> list[tuple[str, str | None]]:
    """(module imported, name imported from it or None) for every import in `module`."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.append((submodule, None) if submodule in MODULES else (base, alias.name))
    return found


def project_edges(module: str) -> set[str]:
    targets = set()
    for target, _ in imports_of(module):
        while target not in MODULES and "." in target:  # a name inside a module
            target = target.rpartition(".")[0]
        if target in MODULES and target != module:
            targets.add(target)
    return targets


def cycle_among(modules: set[str]) -> list[str] | None:
    """A circle of imports among `modules`, or None."""
    edges = {m: project_edges(m) & modules for m in modules}
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state and (circle := visit(target)):
                return circle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(modules):
        if module not in state and (circle := visit(module)):
            return circle
    return None


def test_no_circle_of_imports_inside_the_codec():
    codec = {m for m in MODULES if m.startswith("miotts_stream.codec.")}
    assert {"miotts_stream.codec.batcher", "miotts_stream.codec.streaming"} <= codec
    assert cycle_among(codec) is None, " -> ".join(cycle_among(codec))


def test_the_decoder_holds_no_stream_state():
    """The model does not reach into the streaming modules' device side; it hands out
    batchers, which do."""
    decoder_imports = {target for target, _ in imports_of("miotts_stream.codec.decoder")}
    streaming_imports = project_edges("miotts_stream.codec.streaming")
    assert "miotts_stream.codec.decoder" not in streaming_imports
    assert "miotts_stream.codec.batcher" not in streaming_imports
    assert "miotts_stream.codec.decoder" not in project_edges("miotts_stream.codec.batcher")
    assert "miotts_stream.codec.batcher" in decoder_imports


def test_the_engine_uses_only_the_schedulers_public_handle():
    from miotts_stream.service import scheduler

    engine = imports_of("miotts_stream.service.engine")
    from_scheduler = {name for target, name in engine if target.endswith("service.scheduler")}
    assert from_scheduler and from_scheduler <= set(scheduler.__all__), from_scheduler
    codec_internals = {"miotts_stream.codec.batcher", "miotts_stream.codec.streaming"}
    codec_names = {name for target, name in engine if target in codec_internals}
    assert codec_names <= {"StreamingOptions"}, codec_names  # a session's configuration
