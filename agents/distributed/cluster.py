"""Starting or joining Ray for a distributed run: a local cluster on loopback only, a cluster with token authentication."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import ray

from agents.interrupts import deferred_interrupts
from burnin._checks import check_int

__all__ = ["LOOPBACK", "QUIET_WORKER_SETUP", "JoinError", "init_ray", "loopback_node", "token_auth_on"]

log = logging.getLogger(__name__)

QUIET_WORKER_SETUP = "agents.cli.import_tensorflow_quietly"
"""Ray's ``worker_process_setup_hook`` for every worker of a run: TensorFlow imported with stderr muted."""
LOOPBACK = "127.0.0.1"
AUTH_MODE = "RAY_AUTH_MODE"  # Ray 2.52+: "token" turns on its token authentication
UNAUTHENTICATED = (
    "Ray cluster at %s runs without token authentication: anyone who can reach its ports can run code "
    "in it (set RAY_AUTH_MODE=token on every node and here; README, 'Running on a cluster')"
)

REFUSALS = ("Unauthenticated", "InvalidAuthToken", "AuthenticationError")
"""What Ray's errors say when a cluster's GCS refuses the token (Ray 2.60: in the text of the cause)."""


class JoinError(ConnectionError):
    """:func:`init_ray` could not join the cluster at an address; the message is one line naming it, why, and
    what to do. The error Ray raised is ``__cause__``."""


def init_ray(address: str = "", *, num_cpus: int | None = None) -> bool:
    """Join the cluster at ``address``, or start a local one; True when this call started Ray (so we shut it down).

    A local cluster listens on loopback only (:func:`loopback_node`) and gets
    ``num_cpus`` logical CPUs and no dashboard. Joining a cluster without sending
    a token logs a one-line warning (the cluster took us, so it checks none; see
    :func:`token_auth_on` for what a run that sends one is not told). Worker
    output is forwarded to this terminal (errors and tracebacks matter), with
    TensorFlow's C++ logging quietened the same way as here. A cluster that
    refuses this run's token, or cannot be joined, is a :class:`JoinError`.
    Ctrl-C while a local Ray starts is held until it is up, then stops it
    and raises KeyboardInterrupt (while joining, it is Ray's to handle: a
    join can wait minutes for a cluster that does not answer).
    """
    if ray.is_initialized():
        return False
    if num_cpus is not None:
        check_int("num_cpus", num_cpus, minimum=1)
    env_vars = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}
    # Each worker imports TensorFlow first with its C++ start-up logs muted (they ignore TF_CPP_MIN_LOG_LEVEL),
    # else every worker's lines flood this terminal through log_to_driver.
    runtime_env = {"env_vars": env_vars, "worker_process_setup_hook": QUIET_WORKER_SETUP}
    common = dict(log_to_driver=True, logging_level=logging.WARNING, runtime_env=runtime_env)
    if address:
        try:
            ray.init(address=address, **common)
        except (ConnectionError, ValueError) as err:  # ValueError: an address Ray cannot parse
            raise JoinError(join_failure(address, err)) from err
        if not token_auth_on():
            log.warning(UNAUTHENTICATED, address)
        return True
    # Token authentication is Ray's call here: 2.60 turns it on for a new local cluster (2.52 did not).
    # RAY_AUTH_MODE set here would come too late: Ray has read it into this process's config already.
    with loopback_node():
        try:
            # Ctrl-C held until Ray is up: one inside its start-up (the C++ core worker's) crashed the
            # process with a segmentation fault, and was sometimes lost (the run went on).
            with deferred_interrupts():
                ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address=LOOPBACK, **common)
        except KeyboardInterrupt:
            ray.shutdown()  # the caller never learns that Ray started: stop it here
            raise
    node = ray.util.get_node_ip_address()
    if node != LOOPBACK:
        log.warning(
            "Ray %s put this run on %s, not on loopback: it may listen on every interface",
            ray.__version__,
            node,
        )
    return True


def join_failure(address: str, err: BaseException) -> str:
    """One line on why ``ray.init(address=address)`` raised ``err``: a refused token, else Ray's error."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    # Ray 2.60 wraps the GCS's answer as text (a formatted traceback) in the cause of its ConnectionError.
    if any(mark in str(e) or mark == type(e).__name__ for e in chain for mark in REFUSALS):
        sent = (
            "a token it does not take" if token_auth_on() else "no token (RAY_AUTH_MODE is not 'token' here)"
        )
        return (
            f"the Ray cluster at {address} refused this run's token: it checks tokens, and this run sent {sent}; "
            "set RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file RAY_AUTH_TOKEN_PATH "
            "names, else ~/.ray/auth_token) (README, 'Running on a cluster')"
        )
    reason = " ".join(str(err).split()) or "no reason given"
    return f"cannot join a Ray cluster at {address}: {type(err).__name__}: {reason}"


def token_auth_on() -> bool:
    """Whether this process talks to Ray with token authentication (Ray 2.52+ with ``RAY_AUTH_MODE=token``).

    False after joining a cluster means the cluster checks no tokens (one that does refuses a process
    without one). True says nothing of the cluster: Ray 2.60 lets a process that sends a token join a
    cluster that checks none, and has no public way to ask a cluster whether it does.
    """
    has_token_auth = hasattr(ray.exceptions, "AuthenticationError")  # Ray < 2.52 ignores RAY_AUTH_MODE
    return has_token_auth and os.environ.get(AUTH_MODE, "").lower() == "token"


@contextlib.contextmanager
def loopback_node() -> Iterator[None]:
    """Let a ``ray.init`` that starts a node keep 127.0.0.1 as the node's address, so its processes listen on loopback.

    Ray 2.60's GCS, raylet (node manager and object manager) and core workers
    (the driver's too) listen on loopback when the node address is exactly
    127.0.0.1, and on every interface for any other address, 127.0.0.2 included;
    its runtime-env agent listens on the node address. On Linux ``ray.init``
    swaps 127.0.0.1 for the machine's routable address unless Ray's multi-node
    switch is off, as it is on macOS and Windows. The switch is read from
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, when Ray is imported, so it is set
    on Ray's constant for the call and restored after;
    :func:`init_ray` checks the node address that came out.
    """
    # A private module of Ray's: no public setting keeps a loopback node address on Linux in Ray 2.60.
    from ray._private import ray_constants

    missing = object()
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", missing)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved is missing:
            del ray_constants.ENABLE_RAY_CLUSTER
        else:
            ray_constants.ENABLE_RAY_CLUSTER = saved
