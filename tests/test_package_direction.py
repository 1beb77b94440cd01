"""Package direction (issue 15): each layer imports only layers below it, read from the source with
ast (every import, function-level ones included), so a violation fails here rather than as an
import cycle or a surprise dependency later.

Layers, lowest first:

1. core: ``fluxshard`` (motion, models, sparse, tiles, graph, wire, receive, protocol, endpoint,
   accuracy, synth, tau, truncation, uplink_h264, ...) -- imports no other layer;
2. server: ``fluxshard.serving``, and trainer: ``fluxshard.train`` -- the core only;
3. SDK: ``fluxshard_client`` -- the core only (the wire protocol both ends share is core);
4. edge runtime: ``edge_runtime`` -- the core, the server's sessions and tritonserver, the SDK;
5. tools: ``fluxshard.tools`` (one module per verb), ``fluxshard.cli``, ``fluxshard.cli_common``
   -- anything; nothing below imports them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fluxshard", "fluxshard_client", "edge_runtime")

TOOLS = ("fluxshard.tools", "fluxshard.cli", "fluxshard.cli_common")
SERVER, TRAINER, SDK, EDGE = "fluxshard.serving", "fluxshard.train", "fluxshard_client", \
    "edge_runtime"

# layer -> (the module prefixes in it, the prefixes it must not import). A module belongs to the
# layer with its longest matching prefix; whatever is left of `fluxshard` is core.
LAYERS = {
    "tools": (TOOLS, ()),
    "edge runtime": ((EDGE,), TOOLS + (TRAINER,)),
    "SDK": ((SDK,), TOOLS + (EDGE, SERVER, TRAINER)),
    "server": ((SERVER,), TOOLS + (EDGE, SDK, TRAINER)),
    "trainer": ((TRAINER,), TOOLS + (EDGE, SDK, SERVER)),
    "core": (("fluxshard",), TOOLS + (EDGE, SDK, SERVER, TRAINER)),
}

# (importing module, imported prefix) -> why it stays for now. Each must still be needed: a stale
# entry fails, so the list shrinks as the code does.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved), with ``from X import
    y`` counted as X and X.y (y may be a submodule)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str) -> str:
    best, length = None, -1
    for layer, (prefixes, _) in LAYERS.items():
        for prefix in prefixes:
            if within(module, prefix) and len(prefix) > length:
                best, length = layer, len(prefix)
    return best


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = modules()


def test_every_module_belongs_to_a_layer():
    assert MODULES, "no sources found"
    unplaced = [m for m in MODULES if layer_of(m) is None]
    assert not unplaced, unplaced
    # the core named in issue 15 is there and is core
    for module in ("fluxshard.motion", "fluxshard.models", "fluxshard.sparse", "fluxshard.tiles",
                   "fluxshard.graph", "fluxshard.wire", "fluxshard.receive", "fluxshard.protocol",
                   "fluxshard.accuracy", "fluxshard.synth", "fluxshard.tau",
                   "fluxshard.uplink_h264"):
        assert module in MODULES and layer_of(module) == "core", module


@pytest.mark.parametrize("layer", list(LAYERS))
def test_layer_imports_nothing_above_it(layer):
    forbidden = LAYERS[layer][1]
    wrong = []
    for module, path in MODULES.items():
        if layer_of(module) != layer:
            continue
        for name in sorted(imported_names(path)):
            for prefix in forbidden:
                if within(name, prefix) and not any(
                        module == m and within(name, p) for m, p in EXCEPTIONS):
                    wrong.append(f"{path.relative_to(ROOT)} imports {name} ({layer} must not "
                                 f"import {prefix})")
    assert not wrong, "\n".join(wrong)


def test_every_exception_is_still_needed():
    stale = [f"{module} no longer imports {prefix}: drop it from EXCEPTIONS"
             for module, prefix in EXCEPTIONS
             if not any(within(name, prefix) for name in imported_names(MODULES[module]))]
    assert not stale, "\n".join(stale)


def test_every_verb_lives_in_the_tools_package():
    """`fluxshard VERB` is a module of fluxshard.tools; no library module registers a verb."""
    from fluxshard import cli

    for verb, (module, _help) in cli.VERBS.items():
        assert within(module, "fluxshard.tools"), f"{verb}: {module}"
    registering = []
    for module, path in MODULES.items():
        if layer_of(module) == "tools":
            continue
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.FunctionDef) and node.name == "register"
               and [a.arg for a in node.args.args][:1] in (["subparsers"], ["sub"])
               for node in tree.body):  # fluxshard.cli's `register(subparsers)` protocol
            registering.append(module)
    assert not registering, f"verb code outside fluxshard.tools: {registering}"


def test_no_import_cycles():
    """Modules import each other in one direction (function-level and type-only imports count):
    what two modules share lives a level below both. Package ``__init__`` files only re-export
    and are left out."""
    import networkx as nx

    graph = nx.DiGraph()
    for module, path in MODULES.items():
        if path.name == "__init__.py":
            continue
        graph.add_node(module)
        for name in imported_names(path):
            if name != module and name in MODULES and MODULES[name].name != "__init__.py":
                graph.add_edge(module, name)
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"
