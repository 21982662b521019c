"""Ray clusters of several nodes on this machine, on loopback: Ray's token authentication refuses a driver without the token."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from helpers import listening_sockets, off_loopback

ray = pytest.importorskip("ray")
if not hasattr(ray.exceptions, "AuthenticationError"):
    pytest.skip(f"Ray {ray.__version__} has no token authentication (2.52+)", allow_module_level=True)

# A head and a worker node on 127.0.0.1, in a process of their own (Ray's settings come from its
# environment), until the test closes its stdin. Cluster takes the node address as given, where
# ray.init and `ray start` would swap 127.0.0.1 for the machine's routable address.
CLUSTER = """
import sys
from ray.cluster_utils import Cluster
node = {"node_ip_address": "127.0.0.1", "num_cpus": 1}
cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
cluster.add_node(**node)
print(cluster.address, flush=True)
sys.stdin.read()
cluster.shutdown()
"""
DRIVER = "import sys, ray; ray.init(address=sys.argv[1]); print(sum(n['Alive'] for n in ray.nodes()))"


@contextlib.contextmanager
def local_cluster(**env: str) -> Iterator[tuple[str, int, dict[str, str]]]:
    """Start :data:`CLUSTER` with ``env``; yields its GCS address, its pid and a clean environment for drivers.

    Every process gets a Ray temp dir and a home of its own: no ``ray.init()``
    elsewhere on this machine finds the cluster, and no ``~/.ray/auth_token``
    hands a driver a token. Ray settings of this process's environment stay out.
    """
    root = tempfile.mkdtemp(prefix="ray")  # short: Ray's socket paths live under it
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    clean |= {"RAY_TMPDIR": root, "HOME": os.path.join(root, "home")}
    errors = open(os.path.join(root, "cluster.err"), "w+")  # closed below, after the cluster
    proc = subprocess.Popen(
        [sys.executable, "-c", CLUSTER], env=clean | env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=errors, text=True,
    )  # fmt: skip
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        address = proc.stdout.readline().strip() if ready else ""
        if not address:
            errors.seek(0)
            pytest.fail(f"the cluster did not start: {errors.read()[-3000:]}")
        yield address, proc.pid, clean
    finally:
        proc.stdin.close()  # the script shuts its nodes down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # its reaper takes the nodes down with it
            proc.wait()
        errors.close()
        shutil.rmtree(root, ignore_errors=True)


DRIVER_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # keep 127.0.0.1 (Linux ray.init swaps it away)
    "RAY_NUM_REDIS_GET_RETRIES": "2",  # a refused driver gives up after 2 tries, not 20 (1 s each)
}
"""The environment of a driver joining :func:`local_cluster`."""


def drive(address: str, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    """A driver joining ``address``: prints the number of live nodes, or fails."""
    env = env | extra | DRIVER_ENV
    return subprocess.run(
        [sys.executable, "-c", DRIVER, address], env=env, capture_output=True, text=True, timeout=180
    )


def test_token_authentication_refuses_a_driver_without_the_token():
    token = secrets.token_hex(32)
    with local_cluster(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token) as (address, pid, env):
        listening = listening_sockets(pid)
        without = drive(address, env)  # no RAY_AUTH_MODE: the driver sends no token
        wrong = drive(address, env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        right = drive(address, env, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    for refused in (without, wrong):
        assert refused.returncode != 0, refused.stdout
        assert "Unauthenticated" in refused.stderr, refused.stderr[-3000:]  # the GCS said no: not a lost line
    assert right.returncode == 0, right.stderr[-3000:]
    assert right.stdout.split()[-1] == "2"  # the same driver with the token sees both nodes
    assert sum(name == "raylet" for name, _ in listening.values()) == 2
    assert not off_loopback(listening), listening


def test_the_train_cli_refused_by_a_cluster_says_so_in_one_line(tmp_path):
    """``--address`` of a cluster that checks tokens, without the token: one line and exit 2, no traceback."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with local_cluster(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32)) as (address, _, env):
        env = env | DRIVER_ENV | {"PYTHONPATH": root}
        argv = ["--env", "CartPole-v1", "--actors", "1", "--address", address, "--run-dir", str(tmp_path)]
        run = subprocess.run(
            [sys.executable, "-m", "agents.train", *argv], env=env, cwd=root, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    ours = [line for line in run.stderr.splitlines() if line.startswith("python -m agents.train")]
    assert len(ours) == 1 and ours[0] == run.stderr.strip().splitlines()[-1], run.stderr[-3000:]
    assert f"--address: the Ray cluster at {address} refused this run's token" in ours[0]
    assert list(tmp_path.iterdir()) == []
