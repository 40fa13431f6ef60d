"""What a replica accepts in Predict (workloads/serving/tensors.py), before any batching."""

from __future__ import annotations

import numpy as np
import pytest

from lepton.common.errors import InvalidArgument
from lepton.v1 import serving_pb2
from lepton.workloads.serving.tensors import (
    MAX_INPUT_BYTES,
    MAX_ROWS,
    check_inputs,
    from_tensor,
    to_tensor,
)

SHAPE = [8, 8]


def tensor(dtype: str, shape: list[int], data: bytes | None = None) -> serving_pb2.Tensor:
    if data is None:
        data = np.zeros(shape, dtype=np.dtype(dtype)).tobytes()
    return serving_pb2.Tensor(dtype=dtype, shape=shape, data=data)


def test_float32_rows_of_the_model_shape_are_taken_as_they_are():
    x = np.random.default_rng(0).random((3, 8, 8), dtype=np.float32)
    got = check_inputs(to_tensor(x), SHAPE)
    assert got.dtype == np.float32 and got.shape == (3, 8, 8)
    np.testing.assert_array_equal(got, x)
    for spelling in ("float32", "f4", "<f4"):
        assert check_inputs(tensor(spelling, [1, 8, 8]), SHAPE).shape == (1, 8, 8)


@pytest.mark.parametrize(("request_tensor", "message"), [
    (tensor("<f8", [2, 8, 8]), "inputs.dtype is '<f8'; the model takes '<f4'"),
    (tensor(">f4", [2, 8, 8]), "inputs.dtype is '>f4'"),
    (tensor("<i8", [2, 8, 8]), "the model takes '<f4'"),
    (serving_pb2.Tensor(dtype="nonsense", shape=[1, 8, 8]), "not a numpy dtype string"),
    (tensor("<f4", [2, 64]), r"inputs.shape is \[2, 64\]: each row must be of shape \[8, 8\]"),
    (tensor("<f4", [2, 8, 8, 1]), "each row must be of shape"),
    (serving_pb2.Tensor(dtype="<f4", shape=[]), "inputs.shape is empty"),
    (tensor("<f4", [0, 8, 8]), "no rows"),
    (tensor("<f4", [2, 8, 8], b"\0" * 7), "inputs.data holds 7 bytes; shape \\[2, 8, 8\\] of <f4 takes 512"),
    (serving_pb2.Tensor(dtype="<f4", shape=[MAX_ROWS + 1, 8, 8]), f"at most {MAX_ROWS} per request"),
    (serving_pb2.Tensor(dtype="<f4", shape=[MAX_INPUT_BYTES // 256 + 1, 8, 8]), "bytes; at most"),
])
def test_bad_inputs_are_invalid_argument_with_a_message(request_tensor, message):
    with pytest.raises(InvalidArgument, match=message):
        check_inputs(request_tensor, SHAPE)


def test_tensor_round_trip_is_little_endian_c_order():
    y = np.arange(6, dtype=">i8").reshape(2, 3).T  # big-endian, not C-contiguous
    t = to_tensor(y)
    assert t.dtype == "<i8" and list(t.shape) == [3, 2]
    np.testing.assert_array_equal(from_tensor(t), y)
    with pytest.raises(InvalidArgument, match="holds 3 bytes"):
        from_tensor(serving_pb2.Tensor(dtype="<i8", shape=[1], data=b"abc"))


async def test_a_model_failure_is_internal_so_the_router_does_not_retry_it_elsewhere():
    # The router retries UNAVAILABLE on every other replica; rows that break the model
    # would break it there too, so a model failure must come back as INTERNAL.
    from lepton.common.errors import Internal
    from lepton.workloads.serving.batcher import Batcher
    from lepton.workloads.serving.replica import InferenceService

    def broken(x):
        raise ValueError("boom")

    class FakeModel:
        input_shape = SHAPE

    batcher = Batcher(broken, max_batch=1, max_wait_s=0)
    service = InferenceService(replica="t1", model_name="m", generation=1)
    service.loaded(batcher, FakeModel())
    request = serving_pb2.PredictRequest(deployment="d", inputs=tensor("<f4", [1, 8, 8]))
    with pytest.raises(Internal, match="the model failed on this request: boom"):
        await InferenceService.Predict.__wrapped__(service, request, None)
    await batcher.close()
