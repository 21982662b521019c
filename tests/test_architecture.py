"""The layers of the tree (docs/architecture.md): arrows run one way, no cycle, no private name crosses a module."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
from helpers import run_python

ROOT = Path(__file__).resolve().parents[1]

# Lower layers first; a module may import its own layer or a lower one, never a higher one.
LAYERS = (
    ("burnin",),
    ("agents.seeds", "agents.envs", "agents.spaces", "agents.interrupts", "agents.rundir"),
    ("agents.r2d2",),
    ("agents.distributed",),
    ("agents.experiment", "agents.hooks", "agents.history", "agents.cli"),
    ("agents.train",),
    ("agents.cartpole", "agents.article", "agents.tune"),
    ("studies.sweep", "studies.episode_probe", "studies.popgym_tasks"),  # what the studies build on
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
    assert state.keys() == graph.keys() and set(state.values()) == {2}  # every module visited, none open


def _imported_by(statement: str) -> dict:
    """What a fresh interpreter has after ``statement``: the top-level packages it imported, its environment
    and TensorFlow's thread pools (when TensorFlow was imported)."""
    code = (
        "import json, os, sys\n"
        "before = dict(os.environ)\n"
        f"{statement}\n"
        "tops = sorted({m.split('.')[0] for m in sys.modules})\n"
        "pools = None\n"
        "if 'tensorflow' in sys.modules:\n"
        "    import tensorflow as tf\n"
        "    pools = [tf.config.threading.get_intra_op_parallelism_threads(),\n"
        "             tf.config.threading.get_inter_op_parallelism_threads()]\n"
        "env = {k: v for k, v in os.environ.items() if before.get(k) != v}\n"
        "print(json.dumps({'modules': tops, 'env': env, 'pools': pools}))\n"
    )
    run = run_python(code)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.splitlines()[-1])


def test_importing_burnin_imports_no_agent_package_and_sets_nothing_process_wide():
    """Issue 25: the library imports its own dependencies only, and sets no environment variable and no
    TensorFlow thread pool (a script asks for those: agents.cli.run_script(tf_threads=True))."""
    seen = _imported_by("import burnin")
    assert "tensorflow" in seen["modules"] and "burnin" in seen["modules"]
    assert not {"gymnasium", "ray", "popgym", "agents", "tqdm", "optuna"} & set(seen["modules"])
    assert seen["env"] == {}
    assert seen["pools"] == [0, 0]  # TensorFlow's defaults


def test_importing_agents_cli_imports_no_tensorflow():
    seen = _imported_by("import agents.cli")
    assert not {"tensorflow", "keras", "burnin", "gymnasium"} & set(seen["modules"])
    assert seen["env"] == {}


def test_the_library_depends_on_its_own_packages_only():
    """``pip install burnin`` brings TensorFlow, Keras, NumPy and Numba; the agent, POPGym, Ray, Atari and
    the tuner are extras (which ``make venv`` installs)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}
    assert names == {"tensorflow", "keras", "numpy", "numba"}
    extras = project["optional-dependencies"]
    assert {"agent", "popgym", "dist", "atari", "tune", "test", "dev"} <= set(extras)
    assert any(d.startswith("popgym") for d in extras["popgym"])
    assert any(d.startswith("ray") for d in extras["dist"])
    makefile = (ROOT / "Makefile").read_text()
    installed = re.search(r"^EXTRAS := (.+)$", makefile, re.MULTILINE).group(1).split(",")
    assert {"agent", "popgym", "dist", "tune", "test", "dev"} <= set(installed)
