"""The Lepton client library and the `lepton-ctl` command line.

    from lepton.client import Client, NotFound

    with Client() as c:  # as lepton-ctl: $LEPTON_SERVER, else the current context
        print(c.cluster_status().leader)
        task = c.submit(["python", "train.py"], gpus=1, memory="16GiB")
        print(c.wait(task.id).state)

`Client("10.0.0.1:7070,10.0.0.2:7070")` names the servers; `Client(context="prod")` a
context of the client config (`lepton-ctl config`, `lepton.client.contexts`).
Exceptions are the ones of `lepton.common.errors`, re-exported here for convenience.
"""

from __future__ import annotations

import os

# gRPC's C core reads this once, when grpc is first imported. Its absl-based logging now
# prints INFO lines (e.g. "Got goaway" when a server stops) on stderr, which would break
# lepton-ctl's one-line errors; ERROR was gRPC's documented default. An explicit setting wins.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from lepton.common.errors import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LeptonError,
    NotFound,
    NotLeader,
    Overloaded,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from lepton.common.version import VERSION as __version__

from .client import DEFAULT_SERVER, DEFAULT_TIMEOUT, Client, NodeWatch, Stream, parse_servers
from .data import DatasetInfo
from .facade import Algorithm, Model, Scheduler
from .jobs import JobInfo
from .tasks import parse_size
from .types import (
    NODE_STATES,
    TASK_STATES,
    AttemptInfo,
    Capacity,
    ClusterStatusInfo,
    GpuInfo,
    NodeEvent,
    NodeInfo,
    TaskInfo,
    TaskResources,
    Usage,
    VoterInfo,
)


def __getattr__(name: str):
    if name == "DataProcessor":  # imports numpy: only when asked for
        from .processor import DataProcessor

        return DataProcessor
    raise AttributeError(name)


__all__ = [
    "__version__",
    "Algorithm",
    "DataProcessor",
    "Model",
    "Scheduler",
    "JobInfo",
    "DatasetInfo",
    "DEFAULT_SERVER",
    "DEFAULT_TIMEOUT",
    "NODE_STATES",
    "TASK_STATES",
    "AlreadyExists",
    "AttemptInfo",
    "Cancelled",
    "Capacity",
    "Client",
    "ClusterStatusInfo",
    "DeadlineExceeded",
    "FailedPrecondition",
    "GpuInfo",
    "Internal",
    "InvalidArgument",
    "LeptonError",
    "NodeEvent",
    "NodeInfo",
    "NodeWatch",
    "NotFound",
    "NotLeader",
    "Overloaded",
    "PermissionDenied",
    "ResourceExhausted",
    "Stream",
    "TaskInfo",
    "TaskResources",
    "Unauthenticated",
    "Unavailable",
    "Usage",
    "VoterInfo",
    "parse_servers",
    "parse_size",
]
