"""Client.find_job: which job a reference names (the job RPCs stubbed: the fake
coordinator of client.testing has none)."""

from __future__ import annotations

from typing import Any

import pytest

from lepton.client.jobs import JobInfo, JobMethods
from lepton.common.errors import NotFound

JOBS = ["j-829612345678", "j-abc123def456"]


class StubJobs(JobMethods):
    def job(self, job_id: str, *, timeout: float | None = None) -> JobInfo:
        if job_id not in JOBS:
            raise NotFound(f'job "{job_id}" not found')
        return JobInfo(id=job_id, state="running", reason="", restart_count=0)

    def jobs(self, *args: Any, **kwargs: Any) -> list[JobInfo]:
        return [self.job(j) for j in JOBS]


@pytest.mark.parametrize(("ref", "found"), [
    ("j-8296", "j-829612345678"),  # an all-digit prefix: once read as member 8296 of job "j"
    ("8296", "j-829612345678"),
    ("j-abc", "j-abc123def456"),
    ("t-829612345678-1", "j-829612345678"),  # a member names its job
    ("j-abc123def456", "j-abc123def456"),
])
def test_find_job(ref: str, found: str) -> None:
    assert StubJobs().find_job(ref).id == found


def test_find_job_not_found() -> None:
    with pytest.raises(NotFound):
        StubJobs().find_job("j-0000")
