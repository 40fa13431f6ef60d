"""`lepton-ctl train | evaluate | predict`: the algorithm library from the command line.

    lepton-ctl train --algorithm mlp --dataset D --epochs 10 --batch-size 64 --lr 0.05 --nodes 2 --out M
    lepton-ctl evaluate M --dataset D          # {"accuracy": ..., "loss": ...} or {"mse": ...}
    lepton-ctl predict M --dataset D --out P   # predictions become dataset P

A thin layer over `lepton.client.facade.Algorithm`: training is a torch.distributed job
across agents (DDP, gloo on CPU, nccl on GPUs); models are stored in the cluster as datasets.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

from lepton.common.errors import LeptonError

from ._cli_common import PROG, _client, _positive_int, command, print_result, wants_json
from .facade import ALGORITHMS, Algorithm


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
