"""The package's layering, held by tests: the analysis core imports without torch, and no
module imports a layer above its own (docs/design.md, "Layers")."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "entrain"

# Lower rank = lower layer; a module may import its own layer and those below. `plan` and
# `sim` share a rank but must not import each other (the planner takes a simulate function).
RANK = {
    "workload": 0,
    "models": 1,
    "cost": 2,
    "schedule": 3,
    "config": 4,
    "program": 4,
    "runlog": 4,
    "plan": 5,
    "sim": 5,
    "data": 6,
    "runtime": 7,
    "report": 8,
    "analyze": 9,
    "planning": 9,
    "cli": 10,
}
PEERS_APART = {("plan", "sim"), ("sim", "plan"), ("analyze", "planning"), ("planning", "analyze")}

# What needs torch by nature: the training runtime, and the sampler (a torch Sampler).
TORCH_MODULES = ("entrain.runtime", "entrain.data.sampler")


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) < 2:
        return "entrain"
    name = parts[1]
    return "cli" if name.startswith("cli") or name == "__main__" else name


def _modules() -> dict[str, Path]:
    out = {}
    for f in SRC.rglob("*.py"):
        rel = f.relative_to(SRC.parent).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = f
    return out


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every entrain module `path` imports, at module level or inside a function."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("entrain"):
            out.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("entrain")]
    return out


def test_every_package_has_a_layer():
    layers = {_layer(m) for m in _modules()} - {"entrain"}
    assert layers <= set(RANK), f"give these a rank in RANK: {sorted(layers - set(RANK))}"


def test_no_import_against_the_layers():
    wrong = []
    for module, path in _modules().items():
        src = _layer(module)
        for target, line in _imports(path):
            dst = _layer(target)
            if src == "entrain" or dst in ("entrain", src):
                continue
            if RANK[dst] > RANK[src] or (src, dst) in PEERS_APART:
                wrong.append(f"{path.relative_to(SRC.parent)}:{line}: {src} imports {dst}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_check_catches_an_upward_import(tmp_path):
    """The graph check itself: a planner module importing the simulator is flagged."""
    f = tmp_path / "planner.py"
    f.write_text("def f():\n    from entrain.sim.simulator import simulate\n")
    assert _imports(f) == [("entrain.sim.simulator", 2)]
    assert ("plan", _layer("entrain.sim.simulator")) in PEERS_APART


def test_the_core_imports_without_torch():
    """Every module but the training runtime imports with torch made unimportable: the
    analyzer, planner, simulator, replay and the CLI run on a laptop without it."""
    core = sorted(m for m in _modules() if not m.startswith(TORCH_MODULES))
    code = (
        "import importlib, sys\n"
        "sys.modules['torch'] = None\n"
        f"for m in {core!r}:\n"
        "    importlib.import_module(m)\n"
        "assert sys.modules['torch'] is None\n"
        "print(len(" + repr(core) + "))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.strip()) > 40


@pytest.mark.parametrize("module", ["entrain.runtime.comm", "entrain.runtime.train"])
def test_the_runtime_does_need_torch(module):
    """The torch-free check is not vacuous: a torch module fails under it."""
    code = f"import sys; sys.modules['torch'] = None; import {module}"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "torch" in r.stderr


def test_each_cli_module_defines_its_subcommands_in_short_functions():
    """Every subcommand's parser lives in its own cli_*.py, none longer than ~60 lines (the
    single 300-line parser function was where defaults drifted apart)."""
    long = []
    for f in sorted(SRC.glob("cli*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef) and "parser" in node.name:
                n = node.end_lineno - node.lineno + 1
                if n > 65:
                    long.append(f"{f.name}:{node.lineno} {node.name} is {n} lines")
    assert not long, "\n".join(long)
    from entrain.cli import SUBCOMMANDS, build_parser

    assert len(SUBCOMMANDS) == 11
    assert all(a.__module__ != "entrain.cli" for a in SUBCOMMANDS)
    build_parser()
