"""Distributed R2D2 on Ray: ``config`` (DistributedConfig), ``server`` (the rate-limited replay server),
``worker`` (actor workers), ``loop`` (DistributedLoop, the learner's side), ``cluster`` (starting Ray on
loopback or joining a cluster). No CLI code here: the cartpole CLI's ``--actors N`` drives it."""

from agents.distributed.cluster import JoinError, init_ray
from agents.distributed.config import DistributedConfig
from agents.distributed.loop import DistributedLoop, RemoteReplay, spawn_server
from agents.distributed.server import PushReply, Registration, ReplayServer, SampleReply
from agents.distributed.worker import ActorWorker, ServerWriter, spawn_workers

__all__ = [
    "ActorWorker",
    "DistributedConfig",
    "DistributedLoop",
    "JoinError",
    "PushReply",
    "Registration",
    "RemoteReplay",
    "ReplayServer",
    "SampleReply",
    "ServerWriter",
    "init_ray",
    "spawn_server",
    "spawn_workers",
]
