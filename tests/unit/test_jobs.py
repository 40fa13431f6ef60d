"""Gangs in the state machine: placed, failed, restarted and cancelled together."""

from __future__ import annotations

from lepton.coordinator.state.state_machine import ClusterStateMachine, NodeState
from lepton.v1 import common_pb2, state_pb2, tasks_pb2


class World:
    def __init__(self, nodes=("a", "b", "c")):
        self.sm = ClusterStateMachine()
        self.index = 0
        for n in nodes:
            self.apply(register_node=state_pb2.RegisterNodeCmd(
                node_id=n, name=n, address=f"10.0.0.{len(n)}:7070",
                capacity=common_pb2.Capacity(cpu_logical=4, memory_bytes=1 << 30)))

    def apply(self, **op):
        self.index += 1
        return self.sm.apply(self.index, state_pb2.Command(at_ms=self.index, **op).SerializeToString())

    def submit(self, nodes=2, max_restarts=0, rid=""):
        spec = tasks_pb2.TaskSpec(argv=["train"], max_restarts=max_restarts, request_id=rid,
                                  torch=tasks_pb2.TorchSpec(nproc_per_node=1))
        return self.apply(submit_job=state_pb2.SubmitJobCmd(job_id="j1", spec=spec, nodes=nodes))

    def place(self, on=("a", "b")):
        return self.apply(apply_plan=state_pb2.ApplyPlanCmd(term=1, placements=[
            state_pb2.PlacementCmd(task_id=f"j1-{r}", attempt=self.task(f"j1-{r}").attempt, node_id=n,
                                   master_addr="10.0.0.1", master_port=29500)
            for r, n in enumerate(on)]))

    def event(self, rank, kind, code=0, node=None):
        t = self.task(f"j1-{rank}")
        return self.apply(task_event=state_pb2.TaskEventCmd(node_id=node or t.node_id, event=tasks_pb2.TaskEvent(
            task_id=t.id, attempt=t.attempt, kind=kind, exit_code=code)))

    def task(self, task_id):
        return self.sm.tasks.tasks[task_id]

    def job(self):
        return self.sm.tasks.job("j1")


STARTED, EXITED = tasks_pb2.TaskEvent.KIND_STARTED, tasks_pb2.TaskEvent.KIND_EXITED


def test_submission_makes_one_member_per_node_and_is_idempotent():
    w = World()
    job = w.submit(nodes=3, rid="r1")
    assert [t.id for t in job.tasks] == ["j1-0", "j1-1", "j1-2"]
    assert [t.spec.gang_rank for t in job.tasks] == [0, 1, 2]
    again = w.apply(submit_job=state_pb2.SubmitJobCmd(job_id="j2", nodes=3, spec=tasks_pb2.TaskSpec(
        argv=["train"], request_id="r1")))
    assert again.id == "j1" and len(w.sm.tasks.tasks) == 3


def test_a_failed_rank_restarts_every_member_with_a_new_attempt():
    w = World()
    w.submit(max_restarts=1)
    w.place()
    w.event(0, STARTED)
    w.event(1, STARTED)
    w.event(1, EXITED, code=3)
    job = w.job()
    assert job.state == tasks_pb2.TASK_STATE_PENDING and job.restart_count == 1
    assert all(t.attempt == 2 and not t.node_id and not t.master_port for t in job.tasks)
    assert "node 1" in w.task("j1-0").history[0].reason
    assert w.sm.tasks.by_node.get("a", set()) == set()  # rank 0 leaves node a's desired set
    # A late exit report about the old attempt changes nothing.
    w.apply(task_event=state_pb2.TaskEventCmd(node_id="a", event=tasks_pb2.TaskEvent(
        task_id="j1-0", attempt=1, kind=EXITED, exit_code=-15)))
    assert w.job().state == tasks_pb2.TASK_STATE_PENDING


def test_without_restarts_every_member_fails():
    w = World()
    w.submit(max_restarts=0)
    w.place()
    w.event(0, EXITED, code=1)
    job = w.job()
    assert job.state == tasks_pb2.TASK_STATE_FAILED
    assert {t.state for t in job.tasks} == {tasks_pb2.TASK_STATE_FAILED}
    assert w.task("j1-1").reason.startswith("stopped: node 0 failed")


def test_a_lost_node_restarts_the_gang():
    w = World()
    w.submit(max_restarts=2)
    w.place(on=("a", "b"))
    w.apply(set_node_state=state_pb2.SetNodeStateCmd(node_id="b", state=NodeState.SUSPECT.proto))
    w.apply(set_node_state=state_pb2.SetNodeStateCmd(node_id="b", state=NodeState.DOWN.proto))
    assert w.job().restart_count == 0  # down: its member may still run until its lease ends
    w.apply(node_lost=state_pb2.NodeLostCmd(node_id="b", reason="node_lost"))
    job = w.job()
    assert job.restart_count == 1 and job.state == tasks_pb2.TASK_STATE_PENDING
    assert "node_lost" in w.task("j1-1").history[0].reason


def test_success_needs_every_member_and_cancel_takes_the_gang():
    w = World()
    w.submit()
    w.place()
    w.event(0, EXITED, code=0)
    assert w.job().state != tasks_pb2.TASK_STATE_SUCCEEDED
    w.event(1, EXITED, code=0)
    assert w.job().state == tasks_pb2.TASK_STATE_SUCCEEDED

    w2 = World()
    w2.submit(nodes=3)
    w2.place(on=("a", "b", "c"))
    w2.apply(cancel_task=state_pb2.CancelTaskCmd(task_id="j1-2"))
    assert {t.state for t in w2.job().tasks} == {tasks_pb2.TASK_STATE_CANCELLED}


def test_plans_place_gangs_whole_and_snapshots_keep_jobs():
    w = World()
    w.submit(nodes=2)
    # A plan naming a node that takes no work is rejected whole: no member is placed.
    w.apply(set_drain=state_pb2.SetDrainCmd(node_id="b", draining=True))
    err = w.place(on=("a", "b"))
    assert "takes no work" in str(err)
    assert {t.state for t in w.job().tasks} == {tasks_pb2.TASK_STATE_PENDING}
    other = ClusterStateMachine()
    other.restore(w.sm.snapshot(), w.index)
    assert other.tasks.job("j1") == w.job()
    assert other.snapshot() == w.sm.snapshot()


def test_members_of_a_j_job_are_t_tasks_so_no_id_names_both():
    w = World()
    job = w.apply(submit_job=state_pb2.SubmitJobCmd(job_id="j-0a1b", nodes=2, spec=tasks_pb2.TaskSpec(
        argv=["train"])))
    assert [t.id for t in job.tasks] == ["t-0a1b-0", "t-0a1b-1"]
    assert w.sm.tasks.job("j-0a1b").id == "j-0a1b" and "j-0a1b" not in w.sm.tasks.tasks


def test_job_summary_is_the_one_rule_for_a_jobs_state():
    from lepton.common.job_ids import job_summary
    from lepton.common.states import TaskState as S

    assert job_summary([(S.RUNNING, "", 0), (S.FAILED, "exit code 3", 1)]) == (S.FAILED, "exit code 3", 1)
    assert job_summary([(S.SUCCEEDED, "", 0), (S.RUNNING, "", 0)]) == (S.RUNNING, "", 0)
    assert job_summary([(S.SUCCEEDED, "", 2)] * 2) == (S.SUCCEEDED, "", 2)
    assert job_summary([(S.PENDING, "waiting", 0), (S.ASSIGNED, "", 0)])[0] == S.ASSIGNED
    assert job_summary([(S.CANCELLED, "cancelled", 0), (S.PENDING, "", 0)])[:2] == (S.CANCELLED, "cancelled")
