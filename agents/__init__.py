"""Agents built on burnin: networks, the R2D2 learner and actor, environments and demos.

They need the ``agent`` extra (``pip install 'burnin[agent]'``: gymnasium, tqdm, matplotlib,
TensorBoard) beside the library's own dependencies; importing ``agents`` without it is one
ImportError that says so.
"""

import importlib.util

_AGENT_EXTRA = ("gymnasium", "tqdm", "matplotlib", "tensorboard")
_missing = [name for name in _AGENT_EXTRA if importlib.util.find_spec(name) is None]
if _missing:
    raise ImportError(
        f"agents needs {', '.join(_missing)} (not installed): install the agent extra, "
        "pip install 'burnin[agent]' (or pip install -e '.[agent]' in a clone)"
    )
