"""The data half of the client: put, get, list, show and remove datasets.

    with Client("10.0.0.1:7070") as c:
        ds = c.put_dataset("train.npz", "mnist", shard_size=64 << 20, replicas=2)
        c.get_dataset("mnist", "mnist.npy")

`DataMethods` is mixed into `Client`. Manifest calls go to the leader; shard bytes go
between this process and agents directly (upload to one node per shard, which the others
pull from; downloads pull from any replica over the verified side channel).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from lepton.common.durable import atomic_writer
from lepton.common.errors import InvalidArgument, LeptonError, Unavailable, from_rpc_error
from lepton.common.paging import walk_pages
from lepton.common.validation import (
    DEFAULT_REPLICATION,
    MAX_DATASET_SCHEMA,
    MAX_REPLICATION,
    check_dataset_name,
)
from lepton.dataplane.shards import CHUNK, ShardStore
from lepton.v1 import datasets_pb2 as dpb
from lepton.v1.datasets_pb2_grpc import DatasetsStub, ShardsStub

from ._util import LazyModule

if TYPE_CHECKING:
    from lepton.common.channels import TlsConfig

    from .client import _Conn

np = LazyModule("numpy")
fmt = LazyModule("lepton.dataplane.shard_format")

__all__ = ["KINDS", "DataMethods", "DatasetInfo", "ShardInfo"]

# What a dataset holds: users' data, a trained model, a job's internal checkpoint.
KINDS = {dpb.DATASET_KIND_DATA: "data", dpb.DATASET_KIND_MODEL: "model",
         dpb.DATASET_KIND_CHECKPOINT: "checkpoint"}
_KIND_CODES = {name: code for code, name in KINDS.items()}

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
UPLOAD_TIMEOUT_S = 3600.0


class RecordedDespiteInterrupt(KeyboardInterrupt):
    """A Ctrl-C (or SIGTERM) arrived while a put's commit was in flight, and the commit
    landed: `dataset` is recorded, whole. `interrupt`: the KeyboardInterrupt that came."""

    def __init__(self, dataset: DatasetInfo, interrupt: KeyboardInterrupt):
        super().__init__(f"{dataset.name} v{dataset.version} was recorded before the interrupt took effect")
        self.dataset = dataset
        self.interrupt = interrupt


@dataclass
class ShardInfo:
    id: str
    size: int
    rows: int
    dtype: str
    shape: list[int]
    label_dtype: str
    replicas: list[str]

    @classmethod
    def from_proto(cls, s: dpb.Shard) -> ShardInfo:
        return cls(s.id, s.size, s.rows, s.dtype, list(s.shape), s.label_dtype, list(s.replicas))


@dataclass
class DatasetInfo:
    name: str
    version: int
    replication: int
    rows: int
    size: int
    created_at_ms: int
    source: str
    shards: list[ShardInfo] = field(default_factory=list)
    addresses: dict[str, str] = field(default_factory=dict)
    under_replicated: int = 0
    owner: str = ""  # who put it; only the owner and admins may replace or delete it
    kind: str = "data"  # "data" | "model" | "checkpoint" (KINDS)
    labels: dict[str, str] = field(default_factory=dict)  # a model's recipe, metrics, source
    schema: str = ""  # what put read (JSON, client/formats.py); "" for derived datasets

    @classmethod
    def from_proto(cls, ds: dpb.Dataset, view: dpb.DatasetView | None = None) -> DatasetInfo:
        return cls(
            ds.name,
            ds.version,
            ds.replication,
            ds.rows,
            ds.size,
            ds.created_at_ms,
            ds.source,
            [ShardInfo.from_proto(s) for s in ds.shards],
            dict(view.addresses) if view else {},
            view.under_replicated if view else 0,
            ds.owner,
            KINDS.get(ds.kind, str(ds.kind)),
            dict(ds.labels),
            ds.schema,
        )

    @property
    def dtype(self) -> str:
        return self.shards[0].dtype if self.shards else ""

    @property
    def shape(self) -> list[int]:
        return self.shards[0].shape if self.shards else []

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class DataMethods:
    """The dataset API of `Client` (a mixin: it uses the client's call machinery)."""

    if TYPE_CHECKING:
        _timeout: float
        _tls: TlsConfig | None

        def _unary(self, stub_cls: type, method: str, request: Any, **kw: Any) -> Any: ...
        def _conn(self, address: str) -> _Conn: ...

    # -- manifests ---------------------------------------------------------------------
    def dataset(self, name: str, *, timeout: float | None = None) -> DatasetInfo:
        """The dataset's manifest; NotFound when there is none."""
        req = dpb.GetDatasetRequest(name=check_dataset_name(name))
        view = self._unary(DatasetsStub, "GetDataset", req, timeout=timeout)
        return DatasetInfo.from_proto(view.dataset, view)

    def datasets(self, *, kind: str | None = None, timeout: float | None = None) -> list[DatasetInfo]:
        """Every dataset (without shard lists), or those of one kind ("data", "model",
        "checkpoint")."""
        def fetch(token: str) -> tuple[Sequence[dpb.Dataset], str]:
            req = dpb.ListDatasetsRequest(page_token=token)
            resp = self._unary(DatasetsStub, "ListDatasets", req, timeout=timeout)
            return resp.datasets, resp.next_page_token

        found = [DatasetInfo.from_proto(d) for d in walk_pages(fetch)]
        return found if kind is None else [d for d in found if d.kind == kind]

    def delete_dataset(self, name: str, *, timeout: float | None = None) -> DatasetInfo:
        """Remove the manifest; blobs no other dataset uses are deleted from the agents."""
        req = dpb.DeleteDatasetRequest(name=check_dataset_name(name))
        return DatasetInfo.from_proto(
            self._unary(DatasetsStub, "DeleteDataset", req, idempotent=False, timeout=timeout)
        )

    def commit_dataset(self, ds: dpb.Dataset, *, timeout: float | None = None) -> DatasetInfo:
        req = dpb.CommitDatasetRequest(dataset=ds)
        return DatasetInfo.from_proto(
            self._unary(DatasetsStub, "CommitDataset", req, idempotent=False, timeout=timeout)
        )

    # -- put -----------------------------------------------------------------------------
    def put_dataset(
        self,
        path: str | os.PathLike[str],
        name: str,
        *,
        shard_size: int | None = None,
        shards: int | None = None,
        replicas: int = DEFAULT_REPLICATION,
        label: str | None = None,
        features: Sequence[str] | None = None,
        features_prefix: str | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> DatasetInfo:
        """Cut a .npy/.npz/.csv/.parquet/.arrow/.feather file (a local path or an fsspec
        URL) into shards, store `replicas` copies of each on the agents, then record the
        dataset (a new version if the name exists) with a description of the input, so
        `get_dataset` writes back what came in.

        Tables: `features` (column names) or `features_prefix`, else every column but the
        label; `label` a column name (for a CSV also an index), else one named
        label/labels/y/target/class. The input is read in batches and each shard written
        as it fills: memory holds about one shard, whatever the file's size.
        `progress(done_bytes, total_bytes)` is called as shards are uploaded. Raises
        InvalidArgument (bad input or name), FailedPrecondition (too few ready nodes),
        ResourceExhausted (an agent's store is full), Unavailable. On any failure no
        dataset is recorded and the uploaded blobs are released.
        """

        check_dataset_name(name)
        if shards is not None and shards < 1 or shard_size is not None and shard_size < 1:
            raise InvalidArgument("shards and shard_size must be positive")
        recorded: list[DatasetInfo] = []  # filled by the commit's thread the moment it lands
        try:
            return self._put_file(path, name, shard_size=shard_size, shards=shards, replicas=replicas,
                                  label=label, features=features, features_prefix=features_prefix,
                                  progress=progress, recorded=recorded)
        except KeyboardInterrupt as interrupt:
            if recorded and not isinstance(interrupt, RecordedDespiteInterrupt):
                raise RecordedDespiteInterrupt(recorded[0], interrupt) from None  # while cleaning up
            raise

    def _put_file(self, path: str | os.PathLike[str], name: str, *, shard_size: int | None,
                  shards: int | None, replicas: int, label: str | None, features: Sequence[str] | None,
                  features_prefix: str | None, progress: Callable[[int, int], None] | None,
                  recorded: list[DatasetInfo]) -> DatasetInfo:
        from .formats import cut_shards, open_source

        with open_source(os.fspath(path), features=list(features) if features else None,
                         features_prefix=features_prefix, label=label) as src, \
                tempfile.TemporaryDirectory(prefix="lepton-put-") as tmp:
            dtype = fmt.record_dtype(src.x_dtype, src.row_shape, src.y_dtype)
            if shards is not None:
                bounds = fmt.plan_shards(src.rows or 0, 1, shards=shards)
                sizes: Iterator[int] = iter([b - a for a, b in bounds])
            else:
                sizes = itertools.repeat(max(1, (shard_size or 64 << 20) // max(1, dtype.itemsize)))
            cut = cut_shards(src.batches, dtype, sizes, Path(tmp))
            if not cut:
                raise InvalidArgument(f"{src.name}: no rows")
            schema = json.dumps(src.schema, separators=(",", ":"))
            if len(schema) > MAX_DATASET_SCHEMA:
                raise InvalidArgument(f"{src.name}: too many columns to describe "
                                      f"({len(schema)} bytes of schema; at most {MAX_DATASET_SCHEMA})")
            metas = [dpb.Shard(id=sid, size=size, **desc) for sid, size, desc, _ in cut]
            files = {sid: p for sid, _, _, p in cut}
            return self.put_shards(name, metas, files, replicas=replicas, source=src.name,
                                   schema=schema, progress=progress, _recorded=recorded)

    def put_shards(
        self,
        name: str,
        metas: list[dpb.Shard],
        files: dict[str, Path],
        *,
        replicas: int = DEFAULT_REPLICATION,
        source: str = "",
        progress: Callable[[int, int], None] | None = None,
        kind: str = "data",
        labels: dict[str, str] | None = None,
        schema: str = "",
        _recorded: list[DatasetInfo] | None = None,
    ) -> DatasetInfo:
        """Store already-made shard files (id -> path) and commit the dataset (of `kind`,
        with `labels`). Interrupted (KeyboardInterrupt) before the commit is sent, nothing is
        recorded; once it is sent, see `_commit_past_interrupts`."""
        if kind not in _KIND_CODES:
            raise InvalidArgument(f"unknown dataset kind {kind!r}; known: {', '.join(_KIND_CODES)}")
        if not 1 <= replicas <= MAX_REPLICATION:  # before it reaches a 32-bit proto field
            raise InvalidArgument(f"replicas must be 1 to {MAX_REPLICATION}, not {replicas}")
        plan = self._unary(
            DatasetsStub,
            "PlanPut",
            dpb.PlanPutRequest(
                name=name,
                replication=replicas,
                shards=[dpb.Shard(id=m.id, size=m.size, rows=m.rows, dtype=m.dtype) for m in metas],
            ),
        )
        placed = {p.shard_id: p for p in plan.placements}
        tick = _progress_counter(progress, sum(m.size for m in metas) * plan.replication)
        nodes_used = {n for p in plan.placements for n in p.node_ids}
        try:
            uniq = {m.id: m for m in metas}
            with ThreadPoolExecutor(4, thread_name_prefix="upload") as pool:
                list(
                    pool.map(
                        lambda m: self._upload(placed[m.id].addresses[0], m, files[m.id], tick),
                        uniq.values(),
                    )
                )
            self._replicate(plan, uniq, tick)
            ds = dpb.Dataset(name=name, replication=plan.replication, source=source,
                             kind=_KIND_CODES[kind], labels=labels or {}, schema=schema)
            for m in metas:
                s = ds.shards.add()
                s.CopyFrom(m)
                del s.replicas[:]
                s.replicas.extend(placed[m.id].node_ids)
        except BaseException:
            self._release([m.id for m in metas], sorted(nodes_used))
            raise
        return self._commit_past_interrupts(
            ds, lambda: self._release([m.id for m in metas], sorted(nodes_used)),
            _recorded if _recorded is not None else [])

    def _commit_past_interrupts(self, ds: dpb.Dataset, release: Callable[[], None],
                                recorded: list[DatasetInfo]) -> DatasetInfo:
        """Commit `ds`. Once sent, a commit may land whatever the caller does, so a Ctrl-C
        (KeyboardInterrupt) that comes after the commit was sent waits for its outcome:
        recorded, it raises RecordedDespiteInterrupt with the dataset; refused, it releases
        the blobs and raises the interrupt. One that comes before releases them at once.

        The commit runs on its own thread, which an interrupt cannot cut short; that thread
        appends the result to `recorded` the moment it has it. Whether it was sent is decided
        under the future's lock: the thread claims the future before sending, and the
        interrupted caller tries to cancel it, so exactly one of the two wins."""
        landing: Future[DatasetInfo] = Future()

        def send() -> None:
            if not landing.set_running_or_notify_cancel():
                return  # interrupted before it was sent
            try:
                info = self.commit_dataset(ds)
            except BaseException as err:  # noqa: BLE001 - handed to the caller as it came
                landing.set_exception(err)
                return
            recorded.append(info)
            landing.set_result(info)

        try:
            threading.Thread(target=send, name="commit", daemon=True).start()
            return landing.result()
        except LeptonError:
            release()
            raise
        except KeyboardInterrupt as interrupt:
            if landing.cancel():
                release()
                raise
            try:
                info = landing.result()
            except LeptonError:
                release()
                raise interrupt from None
            raise RecordedDespiteInterrupt(info, interrupt) from None

    def _upload(self, address: str, meta: dpb.Shard, path: Path, tick: Progress) -> None:
        def requests() -> Iterator[dpb.WriteShardRequest]:
            yield dpb.WriteShardRequest(shard_id=meta.id, size=meta.size)
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    yield dpb.WriteShardRequest(data=chunk)
                    tick(len(chunk))

        try:
            for _ in (
                self._conn(address)
                .stub(ShardsStub)
                .WriteShard(requests(), timeout=UPLOAD_TIMEOUT_S)
            ):
                pass
        except grpc.RpcError as err:
            raise _agent_error(address, err) from None

    def _replicate(
        self, plan: dpb.PlanPutResponse, metas: dict[str, dpb.Shard], tick: Progress
    ) -> None:
        """Each placement's other nodes pull the shard from its first node."""
        asks: dict[str, list[dpb.ShardSource]] = {}
        for p in plan.placements:
            for addr in p.addresses[1:]:
                asks.setdefault(addr, []).append(
                    dpb.ShardSource(
                        shard_id=p.shard_id, size=metas[p.shard_id].size, source_nodes=[p.node_ids[0]]
                    )
                )

        def ask(addr: str) -> None:
            req = dpb.PullShardsRequest(shards=asks[addr])
            try:
                resp = self._conn(addr).stub(ShardsStub).PullShards(req, timeout=UPLOAD_TIMEOUT_S)
            except grpc.RpcError as err:
                raise _agent_error(addr, err) from None
            if resp.failed:
                shard_id, why = next(iter(resp.failed.items()))
                raise Unavailable(f"{addr} could not copy shard {shard_id[:12]}: {why}")
            tick(sum(s.size for s in asks[addr]))

        with ThreadPoolExecutor(max(1, min(8, len(asks))), thread_name_prefix="replicate") as pool:
            list(pool.map(ask, asks))

    def _release(self, shard_ids: list[str], node_ids: list[str]) -> None:
        try:
            self._unary(
                DatasetsStub,
                "ReleaseShards",
                dpb.ReleaseShardsRequest(shard_ids=shard_ids, node_ids=node_ids),
                timeout=10,
            )
        except LeptonError as err:
            log.warning("could not release the blobs of a failed put: %s", err.message)

    # -- get -----------------------------------------------------------------------------
    def get_dataset(
        self,
        name: str,
        out: str | os.PathLike[str],
        *,
        force: bool = False,
        progress: Callable[[int, int], None] | None = None,
        parallel: int = 4,
    ) -> DatasetInfo:
        """Download every shard (hash-verified, from any replica) and write `out`, a local
        path or an fsspec URL, in the format its suffix names (.parquet, .arrow, .feather,
        .npz, .npy, .csv): what `put_dataset` read comes back as it was (client/format_out.py).
        An existing `out` is replaced only with `force`; it appears only when complete.
        Raises NotFound, Unavailable (some shard has no good copy), InvalidArgument."""
        from .format_out import check_suffix, write_output
        from .formats import is_local, local_path, remote_fs, suffix_of

        url = os.fspath(out)
        suffix = suffix_of(url)
        check_suffix(suffix, url)
        local = is_local(url)
        fs, remote = (None, "") if local else remote_fs(url)
        target = local_path(url) if local else None
        exists = target.exists() if target is not None else fs.exists(remote)
        if target is not None and target.is_dir():
            raise InvalidArgument(f"{url} is a directory; name a file")
        if target is not None and not target.parent.is_dir():
            # As `cp` does: a folder that is not there is a typo to report, not one to create.
            what = "not a folder" if target.parent.exists() else "no such folder"
            raise InvalidArgument(f"{target.parent}: {what}")
        if exists and not force:
            raise InvalidArgument(f"{url} exists; pass --force to replace it")
        ds = self.dataset(name)
        try:
            for s in ds.shards[:1]:
                np.dtype(s.dtype)
        except TypeError:  # a code archive ("tar.gz"): a blob, not rows
            raise InvalidArgument(f"dataset {name} holds a {ds.shards[0].dtype} blob, not rows") from None
        # Local: work beside the output, so the finished file is renamed into place.
        work = None
        try:
            work = Path(tempfile.mkdtemp(prefix=".lepton-get-",
                                         dir=target.parent if target is not None else None))
            paths = self._pull_all(ds, work / "store", progress, parallel)
            first = ds.shards[0] if ds.shards else None
            x_dtype = np.dtype(first.dtype if first else "<f4")
            y_dtype = np.dtype(first.label_dtype) if first and first.label_dtype else None
            schema = json.loads(ds.schema) if ds.schema else {}
            tmp = work / ("out" + suffix)
            with open(tmp, "wb") as f:
                write_output(f, suffix, paths, schema, ds.rows, x_dtype,
                             tuple(first.shape) if first else (), y_dtype)
            if target is not None:
                os.replace(tmp, target)
            else:
                fs.put_file(str(tmp), remote)
            return ds
        except OSError as e:
            # The work folder is ours, beside `out`: a folder that cannot be written (/proc,
            # read-only) or a full disk is told by the path the user gave, not by ours.
            ours = work is None or not e.filename or str(e.filename).startswith(str(work))
            if target is not None and ours:
                raise OSError(e.errno, f"cannot write in {target.parent}: {e.strerror}", url) from None
            raise
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)

    def download_shards(
        self, name: str, directory: str | os.PathLike[str], *, parallel: int = 4
    ) -> list[Path]:
        """The dataset's shard files (records x[, y]) as DIRECTORY/shard-00000.npy ...,
        in row order; their paths."""
        ds = self.dataset(name)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".lepton-get-", dir=out))
        try:
            written = []
            for i, p in enumerate(self._pull_all(ds, work / "store", None, parallel)):
                dest = out / f"shard-{i:05d}.npy"
                with open(p, "rb") as src, atomic_writer(dest, mode=0o644) as dst:
                    shutil.copyfileobj(src, dst)
                written.append(dest)
            return written
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _pull_all(self, ds: DatasetInfo, store_dir: Path,
                  progress: Callable[[int, int], None] | None, parallel: int) -> list[Path]:
        """Every shard of `ds` pulled (verified) into a private store; paths in row order."""
        from lepton.dataplane.transfer import Puller

        store = ShardStore(store_dir)
        tick = _progress_counter(progress, ds.size)
        items = {
            s.id: (s.id, s.size, [ds.addresses[n] for n in s.replicas if n in ds.addresses])
            for s in ds.shards
        }
        # The side channel, with the client's certificate when TLS is on, and its token.
        puller = Puller(store, tls=getattr(self, "_tls", None), token=getattr(self, "_token", None))
        try:
            result = puller.pull_many(list(items.values()), parallel=parallel, progress=tick)
        finally:
            puller.close()
        if result.failed:
            shard_id, why = next(iter(result.failed.items()))
            raise Unavailable(
                f"dataset {ds.name}: {len(result.failed)} shards could not be fetched "
                f"({shard_id[:12]}: {why})"
            )
        return [store.path(s.id) for s in ds.shards]


def _progress_counter(progress: Callable[[int, int], None] | None, total: int) -> Callable[[int], None]:
    """`tick(n)`: n more bytes moved; tells `progress` (done, total). Called from the upload
    and pull threads at once, so the count is kept under a lock."""
    lock = threading.Lock()
    done = 0

    def tick(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if progress is not None:
                progress(done, total)

    return tick


def _agent_error(address: str, err: grpc.RpcError) -> LeptonError:
    from ._transport import transport_failure

    failure = transport_failure(err)
    if failure is not None:
        return Unavailable(f"cannot reach the agent at {address} ({failure.reason})")
    return from_rpc_error(err)
