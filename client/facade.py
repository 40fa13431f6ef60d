"""Task-level objects for scripts that think in tasks, models and datasets rather than
RPCs, each a thin layer over `Client` and the real cluster:

    sched = Scheduler(c); sched.submit_task("prep", ["python", "prep.py"], priority=1)
    results = sched.execute_tasks()

    algo = Algorithm(c); algo.select_algorithm("mlp")
    algo.configure_parameters(batch_size=64, learning_rate=0.001, epochs=10, nodes=2)
    model = algo.train_model("digits"); algo.evaluate_model(model, "digits-test")

`DataProcessor` lives in `lepton.client.processor`.
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lepton.common.errors import FailedPrecondition, InvalidArgument

from .client import Client
from .types import TaskInfo

ALGORITHMS = ("logreg", "mlp", "cnn")


class Scheduler:
    """Submit named tasks, then wait for all of them."""

    def __init__(self, client: Client):
        self.client = client
        self._submitted: dict[str, str] = {}  # name -> task id

    def submit_task(self, name: str, command: Sequence[str] | str, *, priority: int = 0,
                    **resources: Any) -> TaskInfo:
        """`command` as argv, or a string for the shell. Resources as keywords of
        `Client.submit` (cpu=, memory=, gpus=, ...)."""
        if name in self._submitted:
            raise InvalidArgument(f"a task named {name!r} was already submitted")
        kw = {"shell": command} if isinstance(command, str) else {"argv": list(command)}
        task = self.client.submit(name=name, priority=priority, **kw, **resources)
        self._submitted[name] = task.id
        return task

    def execute_tasks(self, timeout: float | None = None) -> dict[str, TaskInfo]:
        """Wait until every submitted task has finished; {name: final TaskInfo}."""
        return {name: self.client.wait(task_id, timeout=timeout)
                for name, task_id in self._submitted.items()}


@dataclass(frozen=True)
class Model:
    """A trained model, stored in the cluster as dataset `name`."""

    name: str
    algorithm: str
    job_id: str


class Algorithm:
    """The built-in recipes (logreg, mlp, cnn) trained with DDP across agents."""

    def __init__(self, client: Client):
        self.client = client
        self.algorithm = ""
        self.params: dict[str, Any] = {"batch_size": 32, "learning_rate": 0.05, "epochs": 10,
                                       "nodes": 1, "nproc_per_node": 1, "hidden": 64, "seed": 0}

    def select_algorithm(self, name: str) -> None:
        if name not in ALGORITHMS:
            raise InvalidArgument(f"unknown algorithm {name!r}; choose from {', '.join(ALGORITHMS)}")
        self.algorithm = name

    def configure_parameters(self, **params: Any) -> None:
        unknown = set(params) - set(self.params) - {"max_restarts"}
        if unknown:
            raise InvalidArgument(f"unknown parameters: {', '.join(sorted(unknown))}")
        self.params.update(params)

    def train_model(self, dataset: Any, *, name: str | None = None, timeout: float | None = None) -> Model:
        """Train on `dataset` (a name or DatasetInfo) as a torch job; returns the Model."""
        if not self.algorithm:
            raise FailedPrecondition("select_algorithm() first")
        ds = getattr(dataset, "name", dataset)
        name = name or f"{ds}-{self.algorithm}-{uuid.uuid4().hex[:6]}"
        p = self.params
        argv = [sys.executable, "-m", "lepton.workloads.recipes.cluster", "train", "--model-name", name,
                "--algorithm", self.algorithm, "--epochs", str(p["epochs"]),
                "--batch-size", str(p["batch_size"]), "--lr", str(p["learning_rate"]),
                "--hidden", str(p["hidden"]), "--seed", str(p["seed"])]
        job = self.client.submit_job(argv, nodes=int(p["nodes"]), nproc_per_node=int(p["nproc_per_node"]),
                                     dataset=ds, max_restarts=int(p.get("max_restarts", 1)),
                                     name=f"train-{self.algorithm}")
        done = self.client.wait_job(job.id, timeout=timeout)
        if done.state != "succeeded":
            lines = b"".join(self.client.job_logs(job.id)).decode(errors="replace").splitlines()
            last = next((ln for ln in reversed(lines) if ln.strip() and "Traceback" not in ln), "")
            raise FailedPrecondition(f"training job {job.id} {done.state}: {done.reason}"
                                     + (f" ({last.strip()[:300]})" if last else ""))
        return Model(name=name, algorithm=self.algorithm, job_id=job.id)

    def evaluate_model(self, model: Model | str, dataset: Any, *, timeout: float | None = None) -> dict:
        """Metrics on `dataset`: accuracy and loss (classification) or mse (regression)."""
        out = self._run("evaluate", model, dataset, [], timeout)
        return json.loads(out.strip().splitlines()[-1])

    def predict(self, model: Model | str, dataset: Any, out: str, *, timeout: float | None = None) -> str:
        """Batch inference on `dataset`; the predictions become dataset `out`."""
        self._run("predict", model, dataset, ["--out", out], timeout)
        return out

    def _run(self, what: str, model: Model | str, dataset: Any, extra: list[str],
             timeout: float | None) -> str:
        argv = [sys.executable, "-m", "lepton.workloads.recipes.cluster", what,
                "--model", getattr(model, "name", model), "--dataset", getattr(dataset, "name", dataset),
                *extra]
        task = self.client.submit(argv, name=what, cpu=1)
        done = self.client.wait(task.id, timeout=timeout)
        text = b"".join(self.client.logs(task.id)).decode(errors="replace")
        if done.state != "succeeded":
            raise FailedPrecondition(f"{what} task {task.id} {done.state}: {done.reason}: {text[-500:]}")
        return text
