"""Predict's tensors (lepton.v1.Tensor: dtype string, shape, raw C-order bytes) to and from
numpy, and the checks a replica makes before a request may join a batch.

A replica takes float32 (`<f4`) rows of the model's input shape; anything else is refused
with INVALID_ARGUMENT naming what was expected and what came, before any batching, so a bad
request never costs the others in its batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from lepton.common.errors import InvalidArgument
from lepton.v1 import serving_pb2

INPUT_DTYPE = np.dtype("<f4")
# One request's rows and bytes at most. The bytes stay well under the gRPC message limit
# (MAX_MESSAGE_BYTES, which a forwarding agent also applies), so an oversized request gets
# this module's INVALID_ARGUMENT and not gRPC's RESOURCE_EXHAUSTED.
MAX_ROWS = 65_536
MAX_INPUT_BYTES = 12 * 1024 * 1024


def parse_dtype(text: str) -> np.dtype:
    """The numpy dtype a Tensor's dtype string names. Raises InvalidArgument."""
    try:
        return np.dtype(text)
    except (TypeError, ValueError):
        raise InvalidArgument(f"inputs.dtype {text[:40]!r} is not a numpy dtype string "
                              f"(the model takes {INPUT_DTYPE.str!r}, float32)") from None


def check_inputs(tensor: serving_pb2.Tensor, input_shape: Sequence[int]) -> np.ndarray:
    """The request's rows as a read-only float32 array of shape (rows, *input_shape).
    Raises InvalidArgument saying what is wrong: dtype, shape, no rows, too many rows or
    bytes, or data whose length does not match dtype and shape."""
    dtype = parse_dtype(tensor.dtype)
    if dtype != INPUT_DTYPE:  # == also accepts "float32", "f4" and "=f4" here
        raise InvalidArgument(f"inputs.dtype is {tensor.dtype!r}; the model takes {INPUT_DTYPE.str!r} "
                              "(float32, little-endian): convert the array first")
    shape = [int(d) for d in tensor.shape]
    want = [int(d) for d in input_shape]
    if not shape:
        raise InvalidArgument(f"inputs.shape is empty; give [rows, {', '.join(map(str, want))}]")
    if shape[1:] != want:
        raise InvalidArgument(f"inputs.shape is {shape}: each row must be of shape {want} "
                              f"(send [rows, {', '.join(map(str, want))}])")
    rows = shape[0]
    if rows < 1:
        raise InvalidArgument("inputs has no rows (an empty batch): send at least one")
    if rows > MAX_ROWS:
        raise InvalidArgument(f"inputs has {rows} rows; at most {MAX_ROWS} per request: split it")
    expected = math.prod(shape) * dtype.itemsize
    if expected > MAX_INPUT_BYTES:
        raise InvalidArgument(f"inputs are {expected} bytes; at most {MAX_INPUT_BYTES} per request: split it")
    if len(tensor.data) != expected:
        raise InvalidArgument(f"inputs.data holds {len(tensor.data)} bytes; shape {shape} of "
                              f"{dtype.str} takes {expected}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def to_tensor(array: np.ndarray) -> serving_pb2.Tensor:
    """A numpy array as a Tensor (little-endian, C order)."""
    arr = np.ascontiguousarray(array)
    if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and np.little_endian is False):
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return serving_pb2.Tensor(dtype=arr.dtype.str, shape=list(arr.shape), data=arr.tobytes())


def from_tensor(tensor: serving_pb2.Tensor) -> np.ndarray:
    """A Tensor as a read-only numpy array. Raises InvalidArgument when dtype, shape and
    data disagree."""
    dtype = parse_dtype(tensor.dtype)
    shape = [int(d) for d in tensor.shape]
    if len(tensor.data) != math.prod(shape) * dtype.itemsize:
        raise InvalidArgument(f"tensor data holds {len(tensor.data)} bytes, not shape {shape} of {dtype.str}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
