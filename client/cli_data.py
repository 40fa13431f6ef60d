"""lepton-ctl's data commands: `data put|get|ls|show|rm|process|split`. Reference: docs/data.md.

Hooked into lepton-ctl with `register(top, common)`. On a terminal, put and get show a
progress bar (bytes, rate, ETA) on stderr; `-o json` or a pipe keeps them quiet.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.table import Table

from lepton.common.errors import InvalidArgument
from lepton.common.validation import MAX_REPLICATION

from ._cli_common import (
    PROG,
    _client,
    _positive_int,
    _positive_int_at_most,
    _size,
    command,
    command_group,
    interrupt_reason,
    print_result,
    wants_json,
)
from .data import DatasetInfo, RecordedDespiteInterrupt
from .render import age, human_bytes, make_console, short_id
from .tables import FitTable

__all__ = ["register"]


def _positive_size(text: str) -> int:
    value = _size(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"name at least one column: {text!r}")
    return names


def register(top: Any, common: argparse.ArgumentParser) -> None:
    """Add `data ...` to lepton-ctl's subcommands `top`; `common` holds the global options."""
    sub = command_group(top, "data", "datasets: put, get, list, show, remove, process, split")

    def cmd(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        return command(sub, name, func, help, [common])

    p = cmd("put", cmd_put, "cut a .parquet/.arrow/.feather/.npy/.npz/.csv file or URL into shards "
            "and store them on the agents")
    p.add_argument("file", metavar="FILE|URL", help="a local path, file://... or any fsspec URL")
    p.add_argument("--name", required=True, help="dataset name (a new version if it exists)")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--shard-size", metavar="SIZE", type=_positive_size, help="bytes per shard (default 64MiB)"
    )
    g.add_argument("--shards", metavar="K", type=_positive_int, help="this many shards of equal rows")
    p.add_argument(
        "--replicas", metavar="R", type=_positive_int_at_most(MAX_REPLICATION), default=2,
        help=f"copies of each shard (default 2, at most {MAX_REPLICATION})"
    )
    p.add_argument("--label", metavar="COL", help="label column of a table (a CSV's may be an index; "
                   "default: one named label/labels/y/target/class)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--features", metavar="A,B,C", type=_names,
                   help="feature columns of a table (default: all but the label)")
    g.add_argument("--features-prefix", metavar="PREFIX", help="feature columns: those starting with PREFIX")

    p = cmd("get", cmd_get, "download a dataset as OUT.parquet|.arrow|.feather|.npz|.npy|.csv "
            "(a path or URL): what was put comes back as it was")
    p.add_argument("name", metavar="NAME")
    p.add_argument("out", metavar="OUT", help="the format is the suffix's; a local path or fsspec URL")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")

    p = cmd("ls", cmd_ls, "list datasets (models: lepton-ctl models list)")
    p.add_argument("--all", action="store_true", help="also models and jobs' internal checkpoints")
    p = cmd("show", cmd_show, "show a dataset and its shards")
    p.add_argument("name", metavar="NAME")
    p = cmd("rm", cmd_rm, "remove a dataset (and blobs no other dataset uses)")
    p.add_argument("name", metavar="NAME")

    p = cmd("process", cmd_process, "run processing steps on the agents holding the shards")
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--steps",
        required=True,
        help="e.g. normalize,fillna=mean,clean,augment=noise:0.1 (see docs/data.md)",
    )
    p.add_argument("--out", required=True, metavar="NAME2", help="name of the new dataset")
    p.add_argument("--seed", type=int, default=0, help="seed for random augmentation")

    p = cmd("split", cmd_split, "split a dataset into new ones by fractions, on the agents holding it")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--fractions", required=True, help="one per output, summing to 1, e.g. 0.8,0.2")
    p.add_argument("--out", required=True, metavar="A,B", help="names of the new datasets, one per fraction")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same split (default 0)")
    p.add_argument("--stratify", action="store_true",
                   help="keep each integer label's share in every output (up to rounding)")


@contextmanager
def _progress(args: argparse.Namespace, what: str) -> Iterator[Callable[[int, int], None] | None]:
    console = make_console(sys.stderr)
    if wants_json(args) or not console.is_terminal:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn(what),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(what, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _summary(ds: DatasetInfo) -> str:
    return (
        f"dataset {ds.name} v{ds.version}: {len(ds.shards)} shards, {ds.rows} rows, "
        f"{human_bytes(ds.size)}, {ds.replication} replicas each"
    )


def cmd_put(args: argparse.Namespace) -> int:
    from .formats import limit_malloc_arenas

    limit_malloc_arenas()  # bounded RSS whatever the file's size
    ds: DatasetInfo | None = None
    try:
        with _client(args) as c, _progress(args, "put") as progress:
            ds = c.put_dataset(
                args.file,
                args.name,
                shard_size=args.shard_size,
                shards=args.shards,
                replicas=args.replicas,
                label=args.label,
                features=args.features,
                features_prefix=args.features_prefix,
                progress=progress,
            )
        return print_result(args, ds.to_dict(), _summary(ds) + "\n")
    except RecordedDespiteInterrupt as late:
        ds, interrupt = late.dataset, late.interrupt
    except KeyboardInterrupt as after:
        if ds is None:
            raise  # nothing recorded: the put's blobs were released
        interrupt = after
    # Too late to stop: the dataset is recorded whole, so the put succeeded (exit 0).
    sys.stderr.write(f"{PROG}: {interrupt_reason(interrupt)} too late: {_summary(ds)} is recorded\n")
    return 0


def _not_a_model(ds: DatasetInfo, command: str) -> DatasetInfo:
    """`ds`, or InvalidArgument pointing a model's name to `lepton-ctl models COMMAND`."""
    if ds.kind == "model":
        raise InvalidArgument(f'"{ds.name}" is a model, not a dataset (see lepton-ctl models {command} {ds.name})')
    return ds


def cmd_get(args: argparse.Namespace) -> int:
    from .format_out import check_suffix
    from .formats import limit_malloc_arenas, suffix_of

    check_suffix(suffix_of(args.out), args.out)  # before connecting: a usage error
    limit_malloc_arenas()
    with _client(args) as c, _progress(args, "get") as progress:
        _not_a_model(c.dataset(args.name), "show")
        ds = c.get_dataset(args.name, args.out, force=args.force, progress=progress)
    doc = {"name": ds.name, "version": ds.version, "rows": ds.rows, "size": ds.size, "out": args.out}
    return print_result(args, doc, f"wrote {ds.rows} rows of {ds.name} v{ds.version} to {args.out}\n")


def cmd_ls(args: argparse.Namespace) -> int:
    with _client(args) as c:
        items = c.datasets(kind=None if args.all else "data")
    return print_result(args, [d.to_dict() for d in items], lambda: _datasets_table(items, args.all),
                        empty="no datasets")


def _datasets_table(items: list[DatasetInfo], kinds: bool = False) -> FitTable:
    # A dataset's name is its id: never cut; the least needed columns go first.
    headers = ("NAME", "KIND") if kinds else ("NAME",)
    table = FitTable((*headers, "OWNER", "VERSION", "ROWS", "SIZE", "REPLICAS", "AGE", "SOURCE"),
                     keep=("NAME",), optional=("SOURCE", "AGE", "REPLICAS", "ROWS"))
    for d in items:
        table.add_row(
            *((d.name, d.kind) if kinds else (d.name,)),
            d.owner or "-",
            str(d.version),
            str(d.rows),
            human_bytes(d.size),
            str(d.replication),
            age(d.created_at_ms),
            d.source,
        )
    return table


def cmd_show(args: argparse.Namespace) -> int:
    with _client(args) as c:
        ds = _not_a_model(c.dataset(args.name), "show")
    return print_result(args, ds.to_dict(), lambda: _dataset_detail(ds))


def _dataset_detail(ds: DatasetInfo) -> Table:
    """Writes the summary lines, returns the shards table."""
    out = sys.stdout
    out.write(_summary(ds) + "\n")
    shape = "x".join(map(str, ds.shape)) or "scalar"
    labels = ds.shards[0].label_dtype if ds.shards else ""
    out.write(
        f"features {ds.dtype} per row {shape}; labels {labels or 'none'}; source {ds.source or '-'}; "
        f"owner {ds.owner or '-'}\n"
    )
    if ds.under_replicated:
        out.write(f"{ds.under_replicated} shards are under-replicated (being copied)\n")
    table = Table(box=None, pad_edge=False)
    for col in ("#", "SHARD", "ROWS", "SIZE", "REPLICAS"):
        table.add_column(col)
    for i, s in enumerate(ds.shards):
        where = ", ".join(ds.addresses.get(n, short_id(n)) for n in s.replicas) or "-"
        table.add_row(str(i), s.id[:12], str(s.rows), human_bytes(s.size), where)
    return table


def cmd_rm(args: argparse.Namespace) -> int:
    with _client(args) as c:
        _not_a_model(c.dataset(args.name), "rm")
        ds = c.delete_dataset(args.name)
    return print_result(args, ds.to_dict(), f"removed dataset {ds.name} v{ds.version}\n")


def cmd_process(args: argparse.Namespace) -> int:
    from .processor import DataProcessor, check_outputs, parse_steps

    steps = parse_steps(args.steps)
    check_outputs(args.name, [args.out])  # before connecting
    with _client(args) as c:
        _not_a_model(c.dataset(args.name), "show")
        proc = DataProcessor(c, seed=args.seed)
        ds, report = proc.run(args.name, steps, out=args.out)
    return print_result(args, {"dataset": ds.to_dict(), "report": report},
                        _summary(ds) + "\n" + "".join(f"  {k}: {v}\n" for k, v in sorted(report.items())))


def cmd_split(args: argparse.Namespace) -> int:
    from lepton.common.errors import InvalidArgument

    from .processor import DataProcessor, check_outputs

    try:
        fractions = [float(f) for f in args.fractions.split(",")]
    except ValueError:
        raise InvalidArgument(f"--fractions must be numbers separated by commas, not {args.fractions!r}") from None
    outs = [o.strip() for o in args.out.split(",")]
    check_outputs(args.name, outs)  # before connecting
    with _client(args) as c:
        _not_a_model(c.dataset(args.name), "show")
        parts = DataProcessor(c).split_data(args.name, fractions, outs, stratify=args.stratify, seed=args.seed)
    return print_result(args, [d.to_dict() for d in parts], "".join(_summary(d) + "\n" for d in parts))
