"""Processing steps, run on the agent that holds a shard (`Shards.ShardStats` and
`Shards.TransformShard`). Pure numpy; the orchestration is `lepton.client.processor`.

A pipeline is a list of steps, each a dict with "op" and its options:

    normalize  method=zscore|minmax        needs dataset-wide mean/std or min/max
    fillna     method=mean|median|constant (value=V)   needs mean or the exact median
    clip       k=K: clip to mean ± K·std per feature (outliers)       needs mean/std
    smooth     window=W: moving average along each row's last axis (sequences)
    clean      drop rows with NaN/inf, duplicate rows (first kept, across the whole
               dataset), labels outside [low, high] when given       needs row hashes
    augment    noise=S | flip | shift=P | mixup=A: append one augmented copy of each row

Statistics are per feature (a row's features flattened), NaN-aware, computed on the data
as the earlier steps leave it; partial results merge exactly (Chan's formula for mean and
variance), so the result equals one numpy pass over the concatenated data. The median is
exact: the column values are gathered (fine to millions of values; documented limit).
"""

from __future__ import annotations

import base64
import hashlib
import io
import tempfile
from collections.abc import Iterable
from typing import Any

import numpy as np

from lepton.common.errors import AlreadyExists, InvalidArgument
from lepton.dataplane import shard_format as fmt
from lepton.dataplane.shard_hash import content_id
from lepton.dataplane.shards import ShardStore
from lepton.v1 import datasets_pb2 as dpb

OPS = ("normalize", "fillna", "clip", "smooth", "clean", "augment")


def needs(step: dict) -> str | None:
    """Which statistic a step needs before it can run: moments, minmax, median, rowhash."""
    op = step.get("op")
    if op == "normalize":
        return "minmax" if step.get("method") == "minmax" else "moments"
    if op == "fillna":
        return {"mean": "moments", "median": "median"}.get(step.get("method", "mean"))
    if op == "clip":
        return "moments"
    if op == "clean":
        return "rowhash"
    return None


def check_steps(steps: Any) -> list[dict]:
    """Raises InvalidArgument for an unknown op or a bad option."""
    if not isinstance(steps, list) or not steps:
        raise InvalidArgument("steps must be a non-empty list")
    for s in steps:
        if not isinstance(s, dict) or s.get("op") not in OPS:
            raise InvalidArgument(f"unknown step {s!r}; known: {', '.join(OPS)}")
    return steps


# -- statistics (map) --------------------------------------------------------------------


def _cols(x: np.ndarray) -> np.ndarray:
    return x.reshape(len(x), -1).astype(np.float64)


def partial_stats(x: np.ndarray, y: np.ndarray | None, kind: str) -> dict:
    if kind == "labels":  # labels only: no float64 copy of the features
        return {"labels": label_counts(y)}
    c = _cols(x)
    if kind == "moments":
        ok = ~np.isnan(c)
        n = ok.sum(axis=0)
        mean = np.where(n > 0, np.nansum(c, axis=0) / np.maximum(n, 1), 0.0)
        m2 = np.nansum((c - mean) ** 2, axis=0)
        return {"n": n.tolist(), "mean": mean.tolist(), "m2": m2.tolist()}
    if kind == "minmax":
        with np.errstate(all="ignore"):
            lo = np.where(np.all(np.isnan(c), axis=0), np.inf, np.nanmin(np.where(np.isnan(c), np.inf, c), axis=0))
            hi = np.where(np.all(np.isnan(c), axis=0), -np.inf, np.nanmax(np.where(np.isnan(c), -np.inf, c), axis=0))
        return {"min": lo.tolist(), "max": hi.tolist()}
    if kind == "median":
        return {"values": _b64(c)}
    if kind == "rowhash":
        return {"hashes": row_hashes(c, y)}
    raise InvalidArgument(f"unknown statistic {kind!r}")


def merge_stats(parts: list[dict], kind: str) -> dict:
    """Reduce per-shard partials to the dataset's statistic."""
    if kind == "moments":
        n = np.zeros(len(parts[0]["n"]))
        mean = np.zeros_like(n)
        m2 = np.zeros_like(n)
        for p in parts:  # Chan et al.: exact merge of means and squared deviations
            nb, mb, m2b = np.array(p["n"], float), np.array(p["mean"]), np.array(p["m2"])
            tot = n + nb
            delta = mb - mean
            with np.errstate(all="ignore"):
                mean = np.where(tot > 0, mean + delta * nb / np.maximum(tot, 1), 0.0)
                m2 = m2 + m2b + delta**2 * n * nb / np.maximum(tot, 1)
            n = tot
        std = np.sqrt(np.where(n > 0, m2 / np.maximum(n, 1), 0.0))
        return {"mean": mean.tolist(), "std": std.tolist()}
    if kind == "minmax":
        return {"min": np.min([p["min"] for p in parts], axis=0).tolist(),
                "max": np.max([p["max"] for p in parts], axis=0).tolist()}
    if kind == "median":
        values = np.concatenate([_unb64(p["values"]) for p in parts])
        with np.errstate(all="ignore"):
            med = np.nanmedian(values, axis=0) if len(values) else np.zeros(values.shape[1])
        return {"median": np.nan_to_num(med, nan=0.0).tolist()}
    if kind == "rowhash":
        # For shard i: hashes already seen in shards before it (their rows are duplicates).
        seen: set[str] = set()
        before = []
        for p in parts:
            hs = p["hashes"]
            before.append(sorted(seen.intersection(hs)))
            seen.update(hs)
        return {"seen_before": before}
    if kind == "labels":
        total: dict[str, int] = {}
        for p in parts:
            for label, n in p["labels"].items():
                total[label] = total.get(label, 0) + n
        return {"labels": total}
    raise InvalidArgument(f"unknown statistic {kind!r}")


def row_hashes(x: np.ndarray, y: np.ndarray | None) -> list[str]:
    xb = np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint8).reshape(len(x), -1)
    yb = None if y is None else np.ascontiguousarray(y).view(np.uint8).reshape(len(y), -1)
    out = []
    for i in range(len(x)):
        h = hashlib.blake2b(xb[i].tobytes(), digest_size=16)
        if yb is not None:
            h.update(yb[i].tobytes())
        out.append(h.hexdigest())
    return out


def _b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def _unb64(s: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(s)), allow_pickle=False)


# -- transforms (apply) --------------------------------------------------------------------


def apply_steps(x: np.ndarray, y: np.ndarray | None, steps: list[dict], *, rng: np.random.Generator,
                shard_index: int = 0, cast: bool = True) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Run `steps` (each with its reduced "stats" when it needs one) on one shard's rows.
    Works in float64; `cast` returns float32 (float64 for float64 input), as stored."""
    out_dtype = np.result_type(x.dtype, np.float32)
    x = np.array(x, dtype=np.float64)
    y = None if y is None else np.array(y)
    report: dict[str, int] = {}
    for step in steps:
        op, st = step["op"], step.get("stats") or {}
        shape = x.shape
        c = x.reshape(len(x), -1)
        if op == "normalize":
            if step.get("method") == "minmax":
                lo, hi = np.array(st["min"]), np.array(st["max"])
                span = np.where(hi > lo, hi - lo, 1.0)
                c = (c - lo) / span
            else:
                mean, std = np.array(st["mean"]), np.array(st["std"])
                c = (c - mean) / np.where(std > 0, std, 1.0)
        elif op == "fillna":
            method = step.get("method", "mean")
            fill = (np.array(st["mean"]) if method == "mean" else np.array(st["median"])
                    if method == "median" else np.full(c.shape[1], float(step.get("value", 0.0))))
            nan = np.isnan(c)
            report["filled"] = report.get("filled", 0) + int(nan.sum())
            c = np.where(nan, fill, c)
        elif op == "clip":
            mean, std, k = np.array(st["mean"]), np.array(st["std"]), float(step.get("k", 3.0))
            before = c.copy()
            c = np.clip(c, mean - k * std, mean + k * std)
            report["clipped"] = report.get("clipped", 0) + int(np.sum(before != c))
        elif op == "smooth":
            w = int(step.get("window", 3))
            k = np.ones(w) / w
            seq = x.reshape(-1, shape[-1]) if x.ndim > 1 else x.reshape(-1, 1)
            seq = np.stack([np.convolve(r, k, mode="same") for r in seq]) if seq.shape[1] >= w else seq
            c = seq.reshape(len(x), -1)
        elif op == "clean":
            c, y = _clean(c, y, x, step, st.get("seen_before", [[]] * (shard_index + 1))[shard_index], report)
            shape = (len(c), *shape[1:])
        elif op == "augment":
            aug, ya = _augment(c.reshape(shape), y, step, rng)
            c = np.concatenate([c, aug.reshape(len(aug), -1)])
            y = None if y is None else np.concatenate([y, ya])
            report["augmented"] = report.get("augmented", 0) + len(aug)
            shape = (len(c), *shape[1:])
        x = c.reshape((len(c), *shape[1:]))
    return (x.astype(out_dtype) if cast else x), y, report


def _clean(c, y, x, step, seen_before, report):
    keep = np.all(np.isfinite(c), axis=1)
    if y is not None and y.dtype.kind == "f":
        keep &= np.isfinite(y)
    report["dropped_nonfinite"] = report.get("dropped_nonfinite", 0) + int((~keep).sum())
    if y is not None and "low" in step:
        bad = keep & ((y < float(step["low"])) | (y > float(step["high"])))
        report["dropped_label_range"] = report.get("dropped_label_range", 0) + int(bad.sum())
        keep &= ~bad
    seen = set(seen_before)
    hashes = row_hashes(c, y)  # float64, as the statistics pass hashed them
    dup = 0
    for i, h in enumerate(hashes):
        if not keep[i]:
            continue
        if h in seen:
            keep[i] = False
            dup += 1
        seen.add(h)
    report["dropped_duplicates"] = report.get("dropped_duplicates", 0) + dup
    return c[keep], (None if y is None else y[keep])


def _augment(x, y, step, rng):
    if "noise" in step:
        return x + rng.normal(0.0, float(step["noise"]), x.shape), y
    if "flip" in step:
        if x.ndim < 3:
            raise InvalidArgument("flip needs image-shaped rows (at least 2-D per row)")
        flip = rng.random(len(x)) < 0.5
        return np.where(flip.reshape(-1, *[1] * (x.ndim - 1)), x[..., ::-1], x), y
    if "shift" in step:
        p = int(step["shift"])
        out = np.empty_like(x)
        for i in range(len(x)):
            out[i] = np.roll(x[i], tuple(rng.integers(-p, p + 1, x.ndim - 1)), axis=tuple(range(x.ndim - 1)))
        return out, y
    if "mixup" in step:
        lam = rng.beta(float(step["mixup"]), float(step["mixup"]), len(x)).reshape(-1, *[1] * (x.ndim - 1))
        perm = rng.permutation(len(x))
        mixed = lam * x + (1 - lam) * x[perm]
        ya = None if y is None else np.where(lam.reshape(-1) >= 0.5, y, y[perm])  # dominant label
        return mixed, ya
    raise InvalidArgument(f"augment needs noise, flip, shift or mixup: {step}")


# -- split ---------------------------------------------------------------------------------
# A split is planned at the client and cut on the holders. For each stratum (a label, or all
# rows) the client rounds each part's size (largest remainder), then deals those rows out to
# the shards with a seeded multivariate hypergeometric draw: shard j gets a[j, s, k] of
# stratum s's rows for part k. Each holder permutes its stratum's rows with a generator
# seeded by (seed, shard, stratum) and cuts the permutation at those counts, so every part
# call on any replica picks the same rows: disjoint, covering, and a uniformly random split
# (a hypergeometric deal plus a local permutation is a global permutation). Rows keep their
# order within a part.

MAX_PARTS = 16
MAX_STRATA = 1000
MAX_SEED = 2**63 - 1


def check_split(fractions: list[float], seed: int) -> list[float]:
    """Raises InvalidArgument unless 2..16 positive fractions sum to 1 and 0 <= seed < 2**63."""
    if not 2 <= len(fractions) <= MAX_PARTS:
        raise InvalidArgument(f"give 2 to {MAX_PARTS} fractions, not {len(fractions)}")
    if not all(np.isfinite(f) and f > 0 for f in fractions):
        raise InvalidArgument(f"fractions must be positive numbers: {fractions}")
    if abs(sum(fractions) - 1.0) > 1e-6:
        raise InvalidArgument(f"fractions must sum to 1, not {sum(fractions):g}")
    if not 0 <= seed <= MAX_SEED:
        raise InvalidArgument(f"seed must be between 0 and {MAX_SEED}, not {seed}")
    return [float(f) for f in fractions]


def label_counts(y: np.ndarray | None) -> dict[str, int]:
    """Rows per label (keys are the labels as decimal text). Raises InvalidArgument for no
    labels, labels that are not integers, or more than MAX_STRATA of them."""
    if y is None:
        raise InvalidArgument("stratify needs labels; the dataset has none")
    if y.dtype.kind not in "biu":
        raise InvalidArgument(f"stratify needs integer (class) labels, not {y.dtype}")
    values, counts = np.unique(y, return_counts=True)
    if len(values) > MAX_STRATA:
        raise InvalidArgument(f"{len(values)} distinct labels in one shard; stratify takes at most {MAX_STRATA}")
    return {str(int(v)): int(n) for v, n in zip(values, counts, strict=True)}


def part_sizes(rows: int, fractions: list[float]) -> np.ndarray:
    """`rows` cut by `fractions`: floors, then one more row to the largest remainders."""
    exact = rows * np.asarray(fractions, dtype=np.float64)
    sizes = np.floor(exact).astype(np.int64)
    extra = rows - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:extra]] += 1
    return sizes


def plan_split(shard_counts: list[dict[str, int]], fractions: list[float], seed: int) -> tuple[list[str], np.ndarray]:
    """(strata, a) with a[j, s, k] the rows of stratum s that shard j gives to part k, from
    each shard's rows per stratum. Pure and deterministic in its arguments."""
    strata = sorted({k for c in shard_counts for k in c}, key=int)
    if len(strata) > MAX_STRATA:
        raise InvalidArgument(f"{len(strata)} distinct labels; stratify takes at most {MAX_STRATA}")
    rng = np.random.default_rng([seed, 0])
    alloc = np.zeros((len(shard_counts), len(strata), len(fractions)), dtype=np.int64)
    for s, key in enumerate(strata):
        have = [int(c.get(key, 0)) for c in shard_counts]
        left = part_sizes(sum(have), fractions)
        for j, n in enumerate(have):
            if n:
                alloc[j, s] = rng.multivariate_hypergeometric(left, n, method="marginals")
                left -= alloc[j, s]
    return strata, alloc


def split_rows(recs: np.ndarray, split: dict, shard_index: int) -> np.ndarray:
    """The row numbers (ascending) of this shard that go to part split["part"].
    split: {"seed", "part", "counts": [[rows per part] per stratum], "strata": labels or None}.
    Raises InvalidArgument when the plan does not fit the shard."""
    try:
        seed, part = int(split["seed"]), int(split["part"])
        counts = np.asarray(split["counts"], dtype=np.int64)
        strata = split.get("strata")
        if strata is not None and not isinstance(strata, list):
            raise TypeError("strata must be a list of labels")
        values = None if strata is None else np.array([int(k) for k in strata], dtype=np.int64)
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise InvalidArgument(f"bad split spec: {err}") from None
    if counts.size == 0 and part >= 0:  # no strata: a stratified split of a dataset without rows
        counts = np.zeros((0, part + 1), dtype=np.int64)
    if counts.ndim != 2 or not 0 <= part < counts.shape[1] or (counts < 0).any() or not 0 <= seed <= MAX_SEED:
        raise InvalidArgument("bad split spec: counts must be [[rows per part] per stratum] and part one of them")
    if values is None:
        groups = [np.arange(len(recs))]
    else:
        if "y" not in (recs.dtype.names or ()):
            raise InvalidArgument("a stratified split needs labels; this shard has none")
        y = np.asarray(recs["y"]).astype(np.int64)
        order = np.argsort(y, kind="stable")
        lo, hi = np.searchsorted(y[order], values, "left"), np.searchsorted(y[order], values, "right")
        groups = [order[a:b] for a, b in zip(lo, hi, strict=True)]
    if len(groups) != len(counts) or [len(g) for g in groups] != counts.sum(axis=1).tolist() \
            or sum(len(g) for g in groups) != len(recs):
        raise InvalidArgument("the split plan does not match the shard's rows")
    picked = []
    for s, rows in enumerate(groups):
        perm = np.random.default_rng([seed, 1, shard_index, s]).permutation(rows)
        bounds = np.concatenate([[0], np.cumsum(counts[s])])
        picked.append(perm[bounds[part]:bounds[part + 1]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


# -- the agent's side ------------------------------------------------------------------------


def _load(store: ShardStore, shard_id: str):
    recs = store.load(shard_id)  # hash verified
    return fmt.split_arrays(recs)


def _seed(seed: int, shard_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, shard_index])


def shard_stats(store: ShardStore, shard_id: str, spec: dict) -> dict:
    """spec: {"prefix": steps already reduced, "kind": statistic, "index": shard index, "seed"}."""
    x, y = _load(store, shard_id)
    idx = int(spec.get("index", 0))
    prefix = check_steps(spec["prefix"]) if spec.get("prefix") else []
    if prefix:
        x, y, _ = apply_steps(x, y, prefix, rng=_seed(int(spec.get("seed", 0)), idx), shard_index=idx,
                              cast=False)
    return partial_stats(x, y, spec["kind"])


def transform_shard(store: ShardStore, shard_id: str, spec: dict, seed: int) -> tuple[dpb.Shard, dict]:
    """Apply the steps (or, with spec["split"], keep one part of a split); store the result as
    a new shard here. Returns (meta, report)."""
    if "split" in spec:
        recs = store.load(shard_id)
        out = recs[split_rows(recs, spec["split"], int(spec.get("index", 0)))]  # dtype kept exactly
        return _save(store, out), {"rows_in": len(recs), "rows_out": len(out)}
    x, y = _load(store, shard_id)
    rows_in = len(x)
    idx = int(spec.get("index", 0))
    x, y, report = apply_steps(x, y, check_steps(spec["steps"]), rng=_seed(seed, idx), shard_index=idx)
    recs = fmt.make_records(x, y)
    report["rows_in"], report["rows_out"] = rows_in, len(recs)
    return _save(store, recs), report


def _save(store: ShardStore, recs: np.ndarray) -> dpb.Shard:
    """Store `recs` as a shard here (sealed in memory when the store encrypts)."""
    if store.cipher is not None:  # encrypted at rest: the plaintext never touches the disk
        data = fmt.shard_bytes(recs)
        sid, size = content_id(data), len(data)
        _store(store, sid, size, [data])
    else:
        with tempfile.NamedTemporaryFile(dir=store.tmp, suffix=".npy") as tmp:
            sid, size = fmt.write_shard(recs, tmp.name)
            with open(tmp.name, "rb") as f:
                _store(store, sid, size, iter(lambda: f.read(4 << 20), b""))
    return dpb.Shard(id=sid, size=size, **fmt.describe(recs))


def _store(store: ShardStore, shard_id: str, size: int, chunks: Iterable[bytes]) -> None:
    try:
        with store.writer(shard_id, size) as w:
            for chunk in chunks:
                w.write(chunk)
            w.commit()
    except AlreadyExists:
        pass  # the same rows are already stored here
