"""Distributed processing of datasets: each shard is processed on an agent that holds it.

    with Client("127.0.0.1:7070") as c:
        p = DataProcessor(c)
        raw = p.load_data("train.csv", name="train")
        ready = p.enhance_data(p.clean_data(p.preprocess_data(raw)))

Each step that needs dataset-wide statistics (mean/std, min/max, median, duplicates) gets
a map-reduce pass first: every holder computes its shard's partial (`Shards.ShardStats`,
after the earlier steps), this process merges them exactly (`lepton.dataplane.process`), and
the next pass carries the result. Then every holder transforms its shard into a new one
stored where it is (`Shards.TransformShard`), and the new dataset is committed; the
replication loop brings it to the replication factor. Why an agent RPC and not a task:
the work is short numpy over a memory-mapped local shard, so a process per shard and the
scheduler's round trip would cost more than the work.
"""

from __future__ import annotations

import copy
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

from lepton.common.errors import AlreadyExists, InvalidArgument, LeptonError, NotFound, Unavailable
from lepton.common.validation import check_dataset_name
from lepton.dataplane import process as proc
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1.datasets_pb2_grpc import ShardsStub

from .data import DatasetInfo, _agent_error

__all__ = ["DataProcessor", "parse_steps"]

log = logging.getLogger(__name__)
CALL_TIMEOUT_S = 600.0


def parse_steps(text: str) -> list[dict]:
    """`normalize,fillna=mean,clean,augment=noise:0.1` -> step dicts. Raises InvalidArgument.

    normalize[=zscore|minmax]  fillna=mean|median|constant:V  clip=K  smooth=W
    clean[=labels:LOW-HIGH]    augment=noise:S|flip|shift:P|mixup:A
    """
    steps: list[dict] = []
    for raw in (p.strip() for p in text.split(",")):
        if not raw:
            continue
        op, _, arg = raw.partition("=")
        kind, _, val = arg.partition(":")
        try:
            if op == "normalize":
                if arg not in ("", "zscore", "minmax"):
                    raise ValueError(arg)
                steps.append({"op": op, "method": arg or "zscore"})
            elif op == "fillna":
                if kind in ("mean", "median"):
                    steps.append({"op": op, "method": kind})
                elif kind == "constant":
                    steps.append({"op": op, "method": "constant", "value": float(val or 0)})
                else:
                    steps.append({"op": op, "method": "constant", "value": float(arg)})
            elif op == "clip":
                steps.append({"op": op, "k": float(arg or 3)})
            elif op == "smooth":
                steps.append({"op": op, "window": int(arg or 3)})
            elif op == "clean":
                step: dict[str, Any] = {"op": op}
                if kind == "labels":
                    low, _, high = val.partition("-")
                    step.update(low=float(low), high=float(high))
                elif arg:
                    raise ValueError(arg)
                steps.append(step)
            elif op == "augment":
                if kind == "flip":
                    steps.append({"op": op, "flip": True})
                elif kind in ("noise", "shift", "mixup"):
                    steps.append({"op": op, kind: float(val) if kind != "shift" else int(val)})
                else:
                    raise ValueError(arg)
            else:
                raise InvalidArgument(f"unknown step {op!r}; known: {', '.join(proc.OPS)}")
        except ValueError:
            raise InvalidArgument(f"bad step {raw!r} (see docs/data.md)") from None
    return proc.check_steps(steps)


def check_outputs(name: str, outs: list[str]) -> None:
    """Processing and split make new datasets: valid names, none repeated, none the input's
    (a new version of the input would replace it). InvalidArgument naming --out."""
    for out in outs:
        check_dataset_name(out, "output name (--out)")
    if name in outs:
        raise InvalidArgument(f"the output name (--out) must differ from the input's: {name}")
    if len(set(outs)) != len(outs):
        raise InvalidArgument(f"output names (--out) must differ from each other: {','.join(outs)}")


class DataProcessor:
    """Processing on the cluster through a `Client` (with the data methods)."""

    def __init__(self, client: Any, *, seed: int = 0, parallel: int = 8):
        self.client = client
        self.seed = seed
        self.parallel = parallel
        self.last_report: dict[str, int] = {}

    # -- the named operations --------------------------------------------------------------
    def load_data(self, path: str | Path, name: str | None = None, **put: Any) -> DatasetInfo:
        """Put a .npy/.npz/.csv file as a dataset (named after the file by default)."""
        return self.client.put_dataset(path, name or Path(path).stem, **put)

    def preprocess_data(self, ds: DatasetInfo | str, *, fillna: str | None = "mean",
                        clip: float | None = None, smooth: int | None = None,
                        normalize: str | None = "zscore", out: str | None = None) -> DatasetInfo:
        """Fill missing values, clip outliers, smooth sequences, normalise: in that order."""
        steps: list[dict] = []
        if fillna:
            steps += parse_steps(f"fillna={fillna}")
        if clip:
            steps.append({"op": "clip", "k": float(clip)})
        if smooth:
            steps.append({"op": "smooth", "window": int(smooth)})
        if normalize:
            steps.append({"op": "normalize", "method": normalize})
        return self._named(ds, steps, out, "pre")

    def clean_data(self, ds: DatasetInfo | str, *, labels: tuple[float, float] | None = None,
                   out: str | None = None) -> DatasetInfo:
        """Drop rows with NaN/inf, duplicate rows and (given `labels`) out-of-range labels."""
        step: dict[str, Any] = {"op": "clean"}
        if labels is not None:
            step.update(low=float(labels[0]), high=float(labels[1]))
        return self._named(ds, [step], out, "clean")

    def enhance_data(self, ds: DatasetInfo | str, *, noise: float | None = 0.1, flip: bool = False,
                     shift: int = 0, mixup: float = 0.0, out: str | None = None) -> DatasetInfo:
        """Append one augmented copy of each row per augmentation chosen."""
        steps: list[dict] = []
        if noise:
            steps.append({"op": "augment", "noise": float(noise)})
        if flip:
            steps.append({"op": "augment", "flip": True})
        if shift:
            steps.append({"op": "augment", "shift": int(shift)})
        if mixup:
            steps.append({"op": "augment", "mixup": float(mixup)})
        if not steps:
            raise InvalidArgument("choose at least one augmentation")
        return self._named(ds, steps, out, "aug")

    def split_data(self, ds: DatasetInfo | str, fractions: list[float], outs: list[str], *,
                   stratify: bool = False, seed: int | None = None) -> list[DatasetInfo]:
        """Split a dataset into new datasets `outs`, one per fraction (e.g. [0.8, 0.2]): every
        row goes to exactly one, sizes by the fractions up to rounding (per label when
        `stratify`), the same rows for the same seed (default: the processor's) and dataset
        version. Cut on the holders (`TransformShard`); nothing is committed unless every part
        was cut, and the parts committed before a failure are removed. Raises InvalidArgument,
        AlreadyExists (an output name is taken), NotFound, Unavailable."""
        name = ds if isinstance(ds, str) else ds.name
        seed = self.seed if seed is None else seed
        fractions = proc.check_split([float(f) for f in fractions], seed)
        if len(outs) != len(fractions):
            raise InvalidArgument(f"{len(fractions)} fractions but {len(outs)} output names")
        check_outputs(name, outs)
        info = self._data(name, "split")
        for out in outs:  # checked before any work; a put racing the split would still win
            try:
                self.client.dataset(out)
            except NotFound:
                continue
            raise AlreadyExists(f"dataset {out} exists; choose another name or remove it first")
        if stratify:
            parts = self._map(info, "ShardStats", lambda j: dpb.ShardStatsRequest(
                shard_id=info.shards[j].id, spec=json.dumps({"kind": "labels", "index": j})))
            counts = [json.loads(p.stats)["labels"] for p in parts]
        else:
            counts = [{"0": s.rows} for s in info.shards]
        strata, alloc = proc.plan_split(counts, fractions, seed)
        how = f"fractions {','.join(f'{f:g}' for f in fractions)}, seed {seed}{', stratified' if stratify else ''}"
        made: list[dpb.Dataset] = []
        for k, out in enumerate(outs):
            results = self._map(info, "TransformShard", lambda j, k=k: dpb.TransformShardRequest(
                shard_id=info.shards[j].id, spec=json.dumps({"index": j, "split": {
                    "seed": seed, "part": k, "counts": alloc[j].tolist(), "strata": strata if stratify else None}})))
            # The parts keep the records byte for byte: `data get` of a part writes the
            # input's format back, as for the whole (the put's description, Dataset.schema).
            new = dpb.Dataset(name=out, replication=info.replication, schema=info.schema,
                              source=f"split {name} v{info.version}: part {k + 1} of {len(outs)}, {how}"[:1024])
            kept = [r.shard for r in results if r.shard.rows] or [results[0].shard]  # no empty shards
            new.shards.extend(kept)
            made.append(new)
        return self._commit_all(made)

    def _commit_all(self, made: list[dpb.Dataset]) -> list[DatasetInfo]:
        """Commit every dataset or none: the ones committed before a failure are removed."""
        done: list[DatasetInfo] = []
        try:
            for new in made:
                done.append(self.client.commit_dataset(new))
        except BaseException:
            for d in done:
                try:
                    self.client.delete_dataset(d.name)
                except LeptonError as err:
                    log.warning("could not remove %s after a failed split: %s", d.name, err.message)
            nodes = sorted({n for new in made for s in new.shards for n in s.replicas})
            self.client._release([s.id for new in made for s in new.shards], nodes)
            raise
        return done

    def _named(self, ds: DatasetInfo | str, steps: list[dict], out: str | None, tag: str) -> DatasetInfo:
        name = ds if isinstance(ds, str) else ds.name
        result, self.last_report = self.run(name, steps, out=out or f"{name}-{tag}")
        return result

    # -- the engine --------------------------------------------------------------------------
    def run(self, name: str, steps: list[dict], *, out: str) -> tuple[DatasetInfo, dict[str, int]]:
        """Run `steps` over dataset `name` into a new dataset `out`; returns it and the summed
        report (rows dropped, filled...). Raises NotFound, InvalidArgument, Unavailable."""
        steps = copy.deepcopy(proc.check_steps(steps))
        check_outputs(name, [out])
        ds = self._data(name, "process")
        for i, step in enumerate(steps):
            kind = proc.needs(step)
            if kind is None:
                continue
            spec = {"prefix": steps[:i], "kind": kind, "seed": self.seed}
            parts = self._map(ds, "ShardStats", lambda j, s=spec: dpb.ShardStatsRequest(
                shard_id=ds.shards[j].id, spec=json.dumps({**s, "index": j})))
            step["stats"] = proc.merge_stats([json.loads(p.stats) for p in parts], kind)
        results = self._map(ds, "TransformShard", lambda j: dpb.TransformShardRequest(
            shard_id=ds.shards[j].id, spec=json.dumps({"steps": steps, "index": j}), seed=self.seed))
        report: dict[str, int] = {}
        new = dpb.Dataset(name=out, replication=ds.replication,
                          source=f"process {name} v{ds.version}: {_describe(steps)}"[:1024])
        for r in results:
            new.shards.add().CopyFrom(r.shard)
            for k, v in json.loads(r.report).items():
                report[k] = report.get(k, 0) + v
        try:
            return self.client.commit_dataset(new), report
        except BaseException:
            nodes = sorted({n for s in new.shards for n in s.replicas})
            self.client._release([s.id for s in new.shards], nodes)
            raise

    def _data(self, name: str, purpose: str) -> DatasetInfo:
        """Dataset `name`, refused (InvalidArgument) when it is a model or a checkpoint."""
        info = self.client.dataset(name)
        if info.kind != "data":
            raise InvalidArgument(f'"{name}" is a {info.kind}, not a dataset to {purpose}')
        return info

    def _map(self, ds: DatasetInfo, method: str, request) -> list[Any]:
        """Call `method` for every shard on a node holding it (the next holder on failure)."""

        def one(j: int) -> Any:
            errors = []
            for node_id in ds.shards[j].replicas:
                addr = ds.addresses.get(node_id)
                if not addr:
                    continue
                try:
                    stub = self.client._conn(addr).stub(ShardsStub)
                    return getattr(stub, method)(request(j), timeout=CALL_TIMEOUT_S)
                except grpc.RpcError as err:
                    e = _agent_error(addr, err)
                    if isinstance(e, InvalidArgument):
                        raise e from None
                    errors.append(f"{addr}: {e.message}")
            raise Unavailable(f"shard {j} ({ds.shards[j].id[:12]}): no holder could {method}: "
                              f"{'; '.join(errors) or 'no live replica'}")

        with ThreadPoolExecutor(max(1, min(self.parallel, len(ds.shards)))) as pool:
            return list(pool.map(one, range(len(ds.shards))))


def _describe(steps: list[dict]) -> str:
    return ",".join(s["op"] + "".join(f":{k}={v}" for k, v in s.items() if k not in ("op", "stats"))
                    for s in steps)


__all__ += ["LeptonError"]
