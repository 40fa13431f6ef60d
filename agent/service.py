"""The Agent gRPC service: what clients ask of this node directly (task output)."""

from __future__ import annotations

from lepton.agent.tasks.runner import TaskRunner
from lepton.common import validation as v
from lepton.common.errors import InvalidArgument
from lepton.common.grpc_util import register_service, rpc_boundary
from lepton.v1 import agent_pb2, agent_pb2_grpc


class AgentService(agent_pb2_grpc.AgentServicer):
    def __init__(self, runner: TaskRunner):
        self._runner = runner

    @rpc_boundary
    async def StreamLogs(self, request, context):
        v.require_id(request.task_id, "task_id")
        if request.offset > 1 << 50:
            raise InvalidArgument("offset is out of range")
        attempt = request.attempt or latest_attempt(self._runner, request.task_id)
        # Offsets are the runner's stream offsets: exact across output rotations (see
        # agent/tasks/task_logs.py); a note chunk's offset is where the output resumes.
        async for chunk in self._runner.output(
            request.task_id, attempt, offset=request.offset, follow=request.follow
        ):
            yield agent_pb2.LogChunk(data=chunk.data, offset=chunk.offset, note=chunk.note)


def latest_attempt(runner: TaskRunner, task_id: str) -> int:
    """The highest attempt of `task_id` this node has a directory for; 1 if none."""
    attempts_dir = runner.log_path(task_id, 1).parent.parent
    numbers = [int(p.name) for p in attempts_dir.glob("*") if p.name.isdigit()] if attempts_dir.exists() else []
    return max(numbers, default=1)


def add_to_server(service: AgentService, server) -> None:
    register_service(server, service, agent_pb2.DESCRIPTOR.services_by_name["Agent"])
