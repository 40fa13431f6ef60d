"""`lepton-ctl train | evaluate | predict | models`: the algorithm library from the command line.

    lepton-ctl train --algorithm mlp --dataset D --epochs 10 --batch-size 64 --lr 0.05 --nodes 2 --out M
    lepton-ctl evaluate M --dataset D          # {"accuracy": ..., "loss": ...} or {"mse": ...}
    lepton-ctl predict M --dataset D --out P   # predictions become dataset P
    lepton-ctl models list | show M | rm M     # recipe, metrics, source dataset

A thin layer over `lepton.client.facade.Algorithm`: training is a torch.distributed job
across agents (DDP, gloo on CPU, nccl on GPUs); models are stored in the cluster as datasets
of kind "model" (safetensors and a JSON config; `lepton.client.models`), apart from data.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from lepton.common.errors import LeptonError

from ._cli_common import (
    PROG,
    _client,
    _positive_int,
    command,
    command_group,
    print_result,
    wants_json,
)
from .facade import ALGORITHMS, Algorithm
from .models import ModelInfo, delete_model, get_model, list_models
from .render import age, human_bytes
from .tables import FitTable


def register(top: Any, common: argparse.ArgumentParser) -> None:
    """Add train/evaluate/predict to lepton-ctl's subcommands `top`."""
    p = command(top, "train", cmd_train, "train a built-in model with DDP across agents", [common],
                description=False)
    p.add_argument("--algorithm", required=True, choices=ALGORITHMS)
    p.add_argument("--dataset", required=True, metavar="NAME")
    p.add_argument("--epochs", type=_positive_int, default=10)
    p.add_argument("--batch-size", type=_positive_int, default=32, help="per rank (default 32)")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--hidden", type=_positive_int, default=64, help="hidden width (mlp)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nodes", type=_positive_int, default=1)
    p.add_argument("--nproc-per-node", type=_positive_int, default=1)
    p.add_argument("--max-restarts", type=int, default=1)
    p.add_argument("--out", required=True, metavar="MODEL", help="the model's name in the cluster")

    for name, func, text in (("evaluate", cmd_evaluate, "accuracy and loss (or mse) of a model"),
                             ("predict", cmd_predict, "batch inference into a new dataset")):
        p = command(top, name, func, text, [common], description=False)
        p.add_argument("model", metavar="MODEL")
        p.add_argument("--dataset", required=True, metavar="NAME")
        if name == "predict":
            p.add_argument("--out", required=True, metavar="NAME", help="the predictions dataset")

    models = command_group(top, "models", "trained models: list, show, remove")
    command(models, "list", cmd_models_list, "list models: algorithm, source dataset, metrics", [common])
    p = command(models, "show", cmd_models_show, "a model's recipe, metrics and source dataset", [common])
    p.add_argument("name", metavar="MODEL")
    p = command(models, "rm", cmd_models_rm, "remove a model", [common])
    p.add_argument("name", metavar="MODEL")


def cmd_train(args: argparse.Namespace) -> int:
    """Says the job id at once, streams the ranks' output (epochs, losses) as `run` does,
    then prints the model's name. Ctrl-C cancels the job."""
    with _client(args) as c:
        algo = Algorithm(c)
        algo.select_algorithm(args.algorithm)
        algo.configure_parameters(batch_size=args.batch_size, learning_rate=args.lr,
                                  epochs=args.epochs, nodes=args.nodes, hidden=args.hidden,
                                  nproc_per_node=args.nproc_per_node, seed=args.seed,
                                  max_restarts=args.max_restarts)
        # Nodes as asked, or a one-line refusal: the command line says what it wants.
        job, name = algo.start_training(args.dataset, name=args.out, fit_nodes=False)
        sys.stderr.write(f"{PROG}: job {job.id}: training {args.algorithm} model {name} on "
                         f"{job.nodes} node(s) ('{PROG} jobs show {job.id}')\n")
        sys.stderr.flush()
        # The output goes to stderr when stdout is for JSON, so stdout stays parseable.
        out = sys.stderr if wants_json(args) else sys.stdout
        try:
            for line in c.job_logs(job.id, follow=True):
                out.write(line.decode(errors="replace"))
                out.flush()
            model = algo.finish_training(job.id, name)
        except KeyboardInterrupt:
            with contextlib.suppress(LeptonError):
                c.cancel_job(job.id)
            sys.stderr.write(f"{PROG}: interrupted: cancelled job {job.id}\n")
            return 130
    return print_result(args, {"model": model.name, "algorithm": model.algorithm, "job": model.job_id},
                        f"{model.name}\n")


def cmd_evaluate(args: argparse.Namespace) -> int:
    with _client(args) as c:
        metrics = Algorithm(c).evaluate_model(args.model, args.dataset)
    return print_result(args, metrics, " ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}"
                                                for k, v in sorted(metrics.items())) + "\n")


def cmd_predict(args: argparse.Namespace) -> int:
    with _client(args) as c:
        out = Algorithm(c).predict(args.model, args.dataset, args.out)
    return print_result(args, {"predictions": out}, f"{out}\n", line=True)


def _pairs(doc: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(doc.items())) or "-"


def cmd_models_list(args: argparse.Namespace) -> int:
    with _client(args) as c:
        items = list_models(c)

    def table() -> FitTable:
        t = FitTable(("NAME", "OWNER", "ALGORITHM", "DATASET", "METRICS", "SIZE", "AGE"),
                     keep=("NAME",), optional=("AGE", "SIZE", "METRICS"))
        for m in items:
            t.add_row(m.name, m.owner or "-", m.algorithm or "-", m.dataset or "-", _pairs(m.metrics),
                      human_bytes(m.size), age(m.created_at_ms))
        return t

    return print_result(args, [m.to_dict() for m in items], table, empty="no models")


def cmd_models_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        m = get_model(c, args.name)
    return print_result(args, m.to_dict(), _model_detail(m))


def _model_detail(m: ModelInfo) -> str:
    recipe = {k: v for k, v in m.recipe.items() if k != "algorithm"}
    return (f"model {m.name} v{m.version}: {m.algorithm or '-'} {m.task or ''}".rstrip()
            + f", {human_bytes(m.size)}, owner {m.owner or '-'}\n"
            f"trained on dataset {m.dataset or '-'} by job {m.job or '-'}\n"
            f"recipe: {_pairs(recipe)}\n"
            f"metrics: {_pairs(m.metrics)}\n"
            f"input shape {m.input_shape or '-'}; classes {m.classes or '-'}\n")


def cmd_models_rm(args: argparse.Namespace) -> int:
    with _client(args) as c:
        m = delete_model(c, args.name)
    return print_result(args, m.to_dict(), f"removed model {m.name} v{m.version}\n")
