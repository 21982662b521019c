"""The layers of the tree (docs/architecture.md): arrows run one way, no cycle, no private name crosses a module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lower layers first; a module may import its own layer or a lower one, never a higher one.
LAYERS = (
    ("burnin",),
    ("agents.seeds", "agents.envs", "agents.spaces", "agents.interrupts", "agents.rundir"),
    ("agents.r2d2",),
    ("agents.distributed",),
    ("agents.experiment", "agents.hooks", "agents.history", "agents.cli", "agents.episode_probe"),
    ("agents.train",),
    (
        "agents.cartpole",
        "agents.ablation",
        "agents.delta_q_probe",
        "agents.article",
        "agents.stored_start",
        "agents.tune",
    ),
    ("studies",),
)


def modules() -> dict[str, Path]:
    found = {}
    for package in ("burnin", "agents", "studies"):
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every import statement, at any depth (lazy imports count too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            out.append((node.module, [alias.name for alias in node.names]))
    return out


MODULES = modules()


def layer_of(module: str) -> int:
    if module == "agents":  # the namespace package itself (a docstring)
        return 1
    for i, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS")


def test_every_module_has_a_layer():
    assert len(MODULES) > 30
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_and_take_no_private_name(module):
    for target, names in imports(MODULES[module]):
        top = target.split(".")[0]
        if module.startswith("burnin"):
            assert top not in ("agents", "gymnasium", "ray"), f"{module} imports {target}"
        if top not in ("burnin", "agents", "studies"):
            continue
        assert layer_of(target) <= layer_of(module), f"{module} imports {target}, a higher layer"
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{module} imports private {private} from {target}"


def test_no_import_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, names in imports(path):
            candidates = [target] + [f"{target}.{n}" for n in names]
            for t in candidates:
                # A package's __init__ re-exports its members: that edge is not a cycle of roles.
                if t in MODULES and t != module and not module.startswith(t + "."):
                    graph[module].add(t)
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(t) :], t]))
            if t not in state:
                visit(t, [*stack, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
