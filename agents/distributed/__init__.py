"""Distributed R2D2 on Ray: ``config`` (DistributedConfig), ``server`` (the rate-limited replay server, one
per shard), ``remote`` (the servers as the learner sees them), ``learner_host`` (the learner's side, in the
driver or a Ray actor), ``worker`` (actor workers), ``loop`` (DistributedLoop), ``cluster`` (starting Ray on
loopback or joining a cluster). No CLI code here: the train CLI's ``--actors N`` drives it."""

from agents.distributed.cluster import JoinError, init_ray
from agents.distributed.config import DistributedConfig, parse_resources
from agents.distributed.learner_host import LearnerHost, spawn_learner
from agents.distributed.loop import DistributedLoop, RemoteLearner, SummaryReport, spawn_server, spawn_servers
from agents.distributed.remote import RemoteReplay
from agents.distributed.server import PushReply, Registration, ReplayServer, SampleReply
from agents.distributed.worker import ActorWorker, ServerWriter, spawn_workers

__all__ = [
    "ActorWorker",
    "DistributedConfig",
    "DistributedLoop",
    "JoinError",
    "LearnerHost",
    "PushReply",
    "Registration",
    "RemoteLearner",
    "RemoteReplay",
    "ReplayServer",
    "SampleReply",
    "ServerWriter",
    "SummaryReport",
    "init_ray",
    "parse_resources",
    "spawn_learner",
    "spawn_server",
    "spawn_servers",
    "spawn_workers",
]
