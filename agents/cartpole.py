"""Masked-CartPole R2D2 demo: ``python -m agents.cartpole [FLAGS]`` is ``python -m agents.train --env
MaskedCartPole-v1 --preset masked-cartpole [FLAGS]`` (``make demo`` runs it); every flag of
:mod:`agents.train` works, --seed, --resume, --eval and --actors among them."""

from __future__ import annotations

import functools
import sys

from agents.cli import script_imports

PROG = "python -m agents.cartpole"

with script_imports(PROG, __name__):  # TensorFlow first, quietly; Ctrl-C meanwhile: one line
    from agents import train
    from agents.envs import MASKED_CARTPOLE_ID, make_vector_env

__all__ = ["DEFAULTS", "PROG", "main", "make_env", "parse_args"]

make_env = functools.partial(make_vector_env, env_id=MASKED_CARTPOLE_ID)
"""``make_env(num_envs, seed=...)``: a vector env of masked CartPole."""

DEFAULTS = ("--env", MASKED_CARTPOLE_ID, "--preset", "masked-cartpole")
"""The train CLI's flags this demo sets; flags given after them win."""


def parse_args(argv: list[str] | None = None):
    """(Args, R2D2Config) of ``agents.train`` for masked CartPole."""
    return train.parse_args([*DEFAULTS, *(sys.argv[1:] if argv is None else argv)], prog=PROG)


def main(argv: list[str] | None = None) -> int:
    return train.main([*DEFAULTS, *(sys.argv[1:] if argv is None else argv)], prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
