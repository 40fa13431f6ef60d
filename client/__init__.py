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

from lepton.common.version import VERSION as __version__

# Not `from typing import TYPE_CHECKING`: importing typing alone costs more than this whole
# module; type checkers treat a constant of this name as true all the same.
TYPE_CHECKING = False

# Where each public name lives. They load on first use (PEP 562), so `import lepton.client`
# (and with it the start of `lepton-ctl`) stays light: grpc, protobuf and rich load only
# when a name that needs them is asked for.
_ERRORS = "lepton.common.errors"
_EXPORTS = {
    **dict.fromkeys(
        ("AlreadyExists", "Cancelled", "DeadlineExceeded", "FailedPrecondition", "Internal",
         "InvalidArgument", "LeptonError", "NotFound", "NotLeader", "Overloaded",
         "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable"),
        _ERRORS,
    ),
    **dict.fromkeys(
        ("DEFAULT_SERVER", "DEFAULT_TIMEOUT", "Client", "NodeWatch", "Stream", "parse_servers"),
        ".client",
    ),
    "DatasetInfo": ".data",
    **dict.fromkeys(("Algorithm", "Model", "Scheduler"), ".facade"),
    "JobInfo": ".jobs",
    "parse_size": ".tasks",
    "DataProcessor": ".processor",  # imports numpy
    **dict.fromkeys(
        ("NODE_STATES", "TASK_STATES", "AttemptInfo", "Capacity", "ClusterStatusInfo", "GpuInfo",
         "NodeEvent", "NodeInfo", "TaskInfo", "TaskResources", "Usage", "VoterInfo"),
        ".types",
    ),
}

if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
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

    from .client import DEFAULT_SERVER, DEFAULT_TIMEOUT, Client, NodeWatch, Stream, parse_servers
    from .data import DatasetInfo
    from .facade import Algorithm, Model, Scheduler
    from .jobs import JobInfo
    from .processor import DataProcessor
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
    where = _EXPORTS.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(where, __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


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
