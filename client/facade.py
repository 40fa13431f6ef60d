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

import contextlib
import json
import logging
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lepton.common.errors import FailedPrecondition, InvalidArgument, NotFound
from lepton.common.validation import check_dataset_name

from .client import Client
from .jobs import JobInfo
from .models import get_model
from .types import TaskInfo

ALGORITHMS = ("logreg", "mlp", "cnn")
# The file name a trained model is stored from (the dataset's `source`). What tells a model
# from a dataset is the dataset's kind ("model"), set when the training job stores it.
MODEL_FILE = "model.safetensors"

log = logging.getLogger("lepton")


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

    def start_training(self, dataset: Any, *, name: str | None = None,
                       fit_nodes: bool = True) -> tuple[JobInfo, str]:
        """Check and submit the training job without waiting: (the job, the model's name).
        Refuses at once (one line) an unknown dataset, a model given as the dataset, and a
        model name that is taken. With fewer shards than ranks (each rank needs a shard) it
        trains on as many nodes as the shards allow and says so on the `lepton` logger, or
        with `fit_nodes=False` refuses (FailedPrecondition)."""
        if not self.algorithm:
            raise FailedPrecondition("select_algorithm() first")
        ds_name = getattr(dataset, "name", dataset)
        if name is not None:  # given empty is a mistake, not a request for a made-up name
            check_dataset_name(name, "model name")
        ds = self.client.dataset(ds_name)  # NotFound: 'dataset "x" not found'
        if ds.kind != "data":
            raise InvalidArgument(f'"{ds_name}" is a {ds.kind}, not a dataset to train on')
        name = check_dataset_name(name or f"{ds_name}-{self.algorithm}-{uuid.uuid4().hex[:6]}", "model name")
        with contextlib.suppress(NotFound):
            self.client.dataset(name)
            raise FailedPrecondition(f'"{name}" already exists: choose another model name')
        p = self.params
        nodes, nproc = int(p["nodes"]), int(p["nproc_per_node"])
        if fit_nodes and nproc <= len(ds.shards) < nodes * nproc:
            fit = len(ds.shards) // nproc
            log.warning("dataset %s has %d shard(s): training on %d node(s) instead of %d",
                        ds_name, len(ds.shards), fit, nodes)
            nodes = fit
        argv = [sys.executable, "-m", "lepton.workloads.recipes.cluster", "train", "--model-name", name,
                "--source-dataset", ds_name,
                "--algorithm", self.algorithm, "--epochs", str(p["epochs"]),
                "--batch-size", str(p["batch_size"]), "--lr", str(p["learning_rate"]),
                "--hidden", str(p["hidden"]), "--seed", str(p["seed"])]
        job = self.client.submit_job(argv, nodes=nodes, nproc_per_node=nproc, dataset=ds_name,
                                     max_restarts=int(p.get("max_restarts", 1)),
                                     name=f"train-{self.algorithm}")
        return job, name

    def train_model(self, dataset: Any, *, name: str | None = None, timeout: float | None = None) -> Model:
        """Train on `dataset` (a name or DatasetInfo) as a torch job; returns the Model."""
        job, name = self.start_training(dataset, name=name)
        return self.finish_training(job.id, name, timeout=timeout)

    def finish_training(self, job_id: str, name: str, *, timeout: float | None = None) -> Model:
        """Wait for a job `start_training` submitted; the Model, or FailedPrecondition saying
        in one line why it failed (the job's logs have the rest)."""
        done = self.client.wait_job(job_id, timeout=timeout)
        if done.state != "succeeded":
            text = b"".join(self.client.job_logs(job_id)).decode(errors="replace")
            log.debug("training job %s output:\n%s", job_id, text)  # lepton-ctl --debug shows it
            raise FailedPrecondition(f"training job {job_id} {done.state}: {done.reason}"
                                     + _last_line(text, f"lepton-ctl logs {job_id}"))
        return Model(name=name, algorithm=self.algorithm, job_id=job_id)

    def evaluate_model(self, model: Model | str, dataset: Any, *, timeout: float | None = None) -> dict:
        """Metrics on `dataset`: accuracy and loss (classification) or mse (regression)."""
        out = self._run("evaluate", model, dataset, [], timeout)
        return json.loads(out.strip().splitlines()[-1])

    def predict(self, model: Model | str, dataset: Any, out: str, *, timeout: float | None = None) -> str:
        """Batch inference on `dataset`; the predictions become dataset `out`."""
        check_dataset_name(out, "output dataset name")  # before the task runs, not in it
        self._run("predict", model, dataset, ["--out", out], timeout)
        return out

    def _run(self, what: str, model: Model | str, dataset: Any, extra: list[str],
             timeout: float | None) -> str:
        model_name, ds_name = getattr(model, "name", model), getattr(dataset, "name", dataset)
        self._check_model_and_dataset(model_name, ds_name)
        argv = [sys.executable, "-m", "lepton.workloads.recipes.cluster", what,
                "--model", model_name, "--dataset", ds_name, *extra]
        task = self.client.submit(argv, name=what, cpu=1)
        done = self.client.wait(task.id, timeout=timeout)
        text = b"".join(self.client.logs(task.id)).decode(errors="replace")
        if done.state != "succeeded":
            log.debug("%s task %s output:\n%s", what, task.id, text)  # lepton-ctl --debug shows it
            raise FailedPrecondition(f"{what} task {task.id} {done.state}: {done.reason}"
                                     + _last_line(text, f"lepton-ctl logs {task.id}"))
        return text

    def _check_model_and_dataset(self, model: str, dataset: str) -> None:
        """One-line refusals before anything runs: what is missing, or which is which."""
        get_model(self.client, model)
        ds = self.client.dataset(dataset)  # NotFound: 'dataset "x" not found'
        if ds.kind != "data":
            raise InvalidArgument(f'"{dataset}" is a {ds.kind}, not a dataset')


def _last_line(output: str, more: str) -> str:
    """`: <the output's last telling line> (more: <more>)`, never a traceback's frames."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    frames = ("File ", "Traceback", "During handling", "^", "~")
    last = next((ln for ln in reversed(lines) if not ln.startswith(frames)), "")
    return (f" ({last[:300]})" if last else "") + f" (more: {more})"
