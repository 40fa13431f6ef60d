"""transform_shard stores its result as a new shard on the holder, plain or encrypted at
rest, and storing the same rows twice is not an error."""

from __future__ import annotations

import numpy as np
import pytest

from lepton.dataplane import shard_crypto as sc
from lepton.dataplane import shard_format as fmt
from lepton.dataplane.process import transform_shard
from lepton.dataplane.shards import ShardStore
from tests.unit.test_shards import put


@pytest.mark.parametrize("cipher", [None, sc.ShardCipher(bytes(range(32)))], ids=["plain", "encrypted"])
def test_transform_stores_the_result_once(tmp_path, cipher) -> None:
    store = ShardStore(tmp_path, cipher=cipher)
    x = np.arange(12, dtype="<f4").reshape(6, 2)
    source = put(store, fmt.shard_bytes(fmt.make_records(x, np.arange(6))))
    spec = {"steps": [{"op": "augment", "noise": 0.5}], "index": 0}
    meta, report = transform_shard(store, source, spec, seed=7)
    assert (report["rows_in"], report["rows_out"]) == (6, 12)
    assert store.has(meta.id) and store.size(meta.id) == meta.size and meta.id != source
    assert store.encrypted(meta.id) == (cipher is not None)
    got_x, got_y = fmt.split_arrays(store.load(meta.id))
    np.testing.assert_array_equal(got_x[:6], x)  # the rows, then a noisy copy of each
    assert not np.array_equal(got_x[6:], x) and np.abs(got_x[6:] - x).max() < 5
    np.testing.assert_array_equal(got_y, np.tile(np.arange(6), 2))
    again, _ = transform_shard(store, source, spec, seed=7)  # same rows: already stored
    assert again.id == meta.id and store.list() == {source: store.size(source), meta.id: meta.size}
