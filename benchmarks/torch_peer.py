"""The demo's R2D2 learner update written in PyTorch: the speed reference `peer_ab` runs beside burnin's.

Not part of the package and not a dependency: run by :mod:`benchmarks.peer_ab` as ``python -m
benchmarks.torch_peer`` with an interpreter that has torch and numpy (``pip install torch numpy``, a CPU
build of torch: see benchmarks/README.md), reading the workload
as JSON from burnin's config so both sides do the same update. It imports only torch, numpy and
:mod:`benchmarks.timing` (the standard library), never burnin or TensorFlow.

The update (as burnin's runner does it): the target network over the whole window without gradient; the
online network's burn-in without gradient, its unroll with gradient and its n-step tail without; dueling
heads on the unroll and tail only; n-step double-Q targets with value rescaling; the importance-weighted
squared TD loss; priorities η·max + (1 − η)·mean; Adam with the global gradient-norm clip; the target copied
every ``target_update_period`` updates. Less than burnin's: no checks of the batch, no step masks (every
step of the synthetic batch is valid, and ``nn.LSTM`` has no per-step mask), no ΔQ probes, no all-or-nothing
commit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import numpy as np
import torch
from torch import nn

from benchmarks.timing import rates

SPEC_FIELDS = frozenset({
    "obs_dim", "num_actions", "torso_units", "core_units", "head_units", "burn_in", "unroll", "n_step",
    "batch_size", "gamma", "learning_rate", "adam_epsilon", "max_grad_norm", "target_update_period",
    "priority_eta", "rescale_eps",
})  # fmt: skip
"""The workload's fields this module reads (``peer_ab.peer_spec`` writes them)."""


class QNetwork(nn.Module):
    """Dense ReLU torso, [torso, one-hot previous action, previous reward] into an LSTM, dueling heads."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        layers, width = [], spec["obs_dim"]
        for units in spec["torso_units"]:
            layers += [nn.Linear(width, units), nn.ReLU()]
            width = units
        self.torso = nn.Sequential(*layers)
        self.num_actions = spec["num_actions"]
        self.lstm = nn.LSTM(width + self.num_actions + 1, spec["core_units"], batch_first=True)
        head, core = spec["head_units"], spec["core_units"]
        self.value = nn.Sequential(nn.Linear(core, head), nn.ReLU(), nn.Linear(head, 1))
        self.advantage = nn.Sequential(nn.Linear(core, head), nn.ReLU(), nn.Linear(head, self.num_actions))

    def core(self, obs, prev_action, prev_reward, state):
        """LSTM outputs [B, T, H] and the final (h, c) of a window segment."""
        x = torch.cat(
            [
                self.torso(obs),
                nn.functional.one_hot(prev_action, self.num_actions).float(),
                prev_reward[..., None],
            ],
            dim=-1,
        )
        return self.lstm(x, state)

    def q(self, y):
        advantage = self.advantage(y)
        return self.value(y) + advantage - advantage.mean(dim=-1, keepdim=True)


def h(x, eps):
    return torch.sign(x) * (torch.sqrt(x.abs() + 1.0) - 1.0) + eps * x


def h_inv(x, eps):
    root = (torch.sqrt(1.0 + 4.0 * eps * (x.abs() + 1.0 + eps)) - 1.0) / (2.0 * eps)
    return torch.sign(x) * (root.square() - 1.0)


def make_update(spec: dict, seed: int = 0):
    """A closure running one learner update on a fixed synthetic batch (the shapes burnin's benchmark uses)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    b, burn, unroll, n = spec["batch_size"], spec["burn_in"], spec["unroll"], spec["n_step"]
    length, units, a = burn + unroll + n, spec["core_units"], spec["num_actions"]
    online, target = QNetwork(spec), QNetwork(spec)
    target.load_state_dict(online.state_dict())
    optimizer = torch.optim.Adam(online.parameters(), lr=spec["learning_rate"], eps=spec["adam_epsilon"])
    obs = torch.from_numpy(rng.standard_normal((b, length, spec["obs_dim"])).astype(np.float32))
    action = torch.from_numpy(rng.integers(0, a, (b, length)))
    prev_action = torch.from_numpy(rng.integers(0, a, (b, length)))
    reward = torch.from_numpy(rng.random((b, length)).astype(np.float32))
    prev_reward = torch.from_numpy(rng.random((b, length)).astype(np.float32))
    pcont = torch.full((b, length), spec["gamma"])
    weights = torch.ones(b)
    state = tuple(
        torch.from_numpy(rng.standard_normal((1, b, units)).astype(np.float32) * 0.1) for _ in range(2)
    )
    eps, eta, steps = spec["rescale_eps"], spec["priority_eta"], [0]

    def window(lo, hi):
        return obs[:, lo:hi], prev_action[:, lo:hi], prev_reward[:, lo:hi]

    def update() -> np.ndarray:
        with torch.no_grad():
            y_target, _ = target.core(*window(0, length), state)
            q_target = target.q(y_target[:, burn:])  # [B, U+n, A]
            _, start = online.core(*window(0, burn), state)
        y_unroll, end = online.core(*window(burn, burn + unroll), start)
        q_unroll = online.q(y_unroll)  # [B, U, A]
        with torch.no_grad():
            y_tail, _ = online.core(*window(burn + unroll, length), tuple(s.detach() for s in end))
            q_select = torch.cat([q_unroll.detach(), online.q(y_tail)], dim=1)  # [B, U+n, A]
            v = q_target.gather(-1, q_select.argmax(-1, keepdim=True)).squeeze(-1)
            v = h_inv(v, eps) if eps else v  # eps 0: no rescaling, as burnin's config reads it
            r, pc = reward[:, burn:], pcont[:, burn:]
            g, discount = torch.zeros(b, unroll), torch.ones(b, unroll)
            for k in range(n):
                g = g + discount * r[:, k : k + unroll]
                discount = discount * pc[:, k : k + unroll]
            y = g + discount * v[:, n : n + unroll]  # [B, U]
            y = h(y, eps) if eps else y
        q_taken = q_unroll.gather(-1, action[:, burn : burn + unroll, None]).squeeze(-1)
        td = y - q_taken
        loss = (weights * (0.5 * td.square()).mean(dim=1)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(online.parameters(), spec["max_grad_norm"])
        optimizer.step()
        steps[0] += 1
        if steps[0] % spec["target_update_period"] == 0:
            target.load_state_dict(online.state_dict())
        td_abs = td.detach().abs()
        return (eta * td_abs.max(dim=1).values + (1 - eta) * td_abs.mean(dim=1)).numpy()

    return update


def measure(spec: dict, *, rounds: int, updates: int, warmup: int) -> dict:
    """Updates per second: median over ``rounds`` timings of ``updates`` updates each, after ``warmup``."""
    samples = rates(make_update(spec), rounds=rounds, updates=updates, warmup=warmup)
    return {
        "updates_per_s": statistics.median(samples),
        "rounds": samples,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _read_spec(parser: argparse.ArgumentParser, text: str) -> dict:
    """``--spec`` as a dict with every one of :data:`SPEC_FIELDS`; else one line on stderr and exit 2."""
    try:
        spec = json.loads(text)
    except ValueError as err:
        spec, problem = None, f"not JSON ({err})"
    else:
        missing = sorted(SPEC_FIELDS - set(spec)) if isinstance(spec, dict) else None
        problem = "not an object" if missing is None else f"no {', '.join(missing)}" if missing else ""
    if problem:
        parser.exit(2, f"{parser.prog}: error: --spec: expected the workload as a JSON object: {problem}\n")
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.torch_peer", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--spec", required=True, help="the workload as JSON (benchmarks.peer_ab writes it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=100, help="timed updates per round")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = parser.parse_args(argv)
    for flag, value in {
        "--rounds": args.rounds,
        "--updates": args.updates,
        "--threads": args.threads,
    }.items():
        if value < 1:
            parser.exit(2, f"{parser.prog}: error: {flag}: expected an int >= 1, got {value}\n")
    if args.warmup < 0:
        parser.exit(2, f"{parser.prog}: error: --warmup: expected an int >= 0, got {args.warmup}\n")
    spec = _read_spec(parser, args.spec)
    torch.set_num_threads(args.threads)
    print(json.dumps(measure(spec, rounds=args.rounds, updates=args.updates, warmup=args.warmup)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
