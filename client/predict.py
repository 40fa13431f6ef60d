"""Online predictions: `Client.predict(S, rows)` through any agent (docs/serving.md).

Every agent answers `Inference.Predict` for every deployment and forwards to a ready replica,
so the client sends to whichever address it uses and moves on to the next one only when that
agent cannot be reached. Tensors travel as raw little-endian C-order bytes with their dtype
and shape (never lists of floats); the dtype is sent as given, and a replica refuses one the
model does not take with INVALID_ARGUMENT naming both. numpy is imported on first use
(lepton-ctl starts without it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lepton.common.errors import InvalidArgument
from lepton.common.grpc_util import MAX_MESSAGE_BYTES
from lepton.v1 import serving_pb2
from lepton.v1.serving_pb2_grpc import InferenceStub

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np

__all__ = ["Prediction", "PredictMethods", "to_tensor", "from_tensor"]

# Room for the request's other fields under the gRPC message limit.
_MAX_INPUT_BYTES = MAX_MESSAGE_BYTES - 64 * 1024


@dataclass(frozen=True)
class Prediction:
    """One answer: `outputs` has one row per input row; which replica, model and generation
    answered, and the rows of the batch it ran in."""

    outputs: np.ndarray
    replica: str
    model: str
    generation: int
    batch_rows: int


def to_tensor(rows: Any) -> serving_pb2.Tensor:
    """`rows` (an array or nested lists; the first axis is rows) as a Tensor. A big-endian
    array is sent little-endian, the values unchanged. Raises InvalidArgument."""
    import numpy as np

    array = np.asarray(rows)
    if array.ndim == 0:
        raise InvalidArgument("inputs must have a rows axis: pass [row, ...], not one number")
    if array.dtype.hasobject or array.dtype.kind in "USV":
        raise InvalidArgument(f"inputs must be numbers, not {array.dtype}")
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    array = np.ascontiguousarray(array)
    if array.nbytes > _MAX_INPUT_BYTES:
        raise InvalidArgument(f"inputs are {array.nbytes} bytes, over one request's limit: "
                              "split the rows into several requests")
    return serving_pb2.Tensor(dtype=array.dtype.str, shape=list(array.shape), data=array.tobytes())


def from_tensor(tensor: serving_pb2.Tensor) -> np.ndarray:
    """A Tensor as a (writable) numpy array. Raises InvalidArgument for one that does not add up."""
    import numpy as np

    try:
        dtype = np.dtype(tensor.dtype)
        return np.frombuffer(tensor.data, dtype=dtype).reshape([int(d) for d in tensor.shape]).copy()
    except (TypeError, ValueError) as err:
        raise InvalidArgument(f"the answer's tensor does not add up ({tensor.dtype}, {list(tensor.shape)}): "
                              f"{err}") from None


class PredictMethods:
    """`predict` for the Client (mixed in: uses its `_unary`)."""

    _unary: Callable[..., Any]

    def predict(self, deployment: str, rows: Any, *, timeout: float | None = None) -> np.ndarray:
        """The deployment's outputs for `rows`, one row per input row."""
        return self.predict_detailed(deployment, rows, timeout=timeout).outputs

    def predict_detailed(self, deployment: str, rows: Any, *, timeout: float | None = None) -> Prediction:
        """`predict`, with which replica, model and generation answered."""
        if not deployment:
            raise InvalidArgument("a deployment name is required")
        request = serving_pb2.PredictRequest(deployment=deployment, inputs=to_tensor(rows))
        response = self._unary(InferenceStub, "Predict", request, idempotent=True, timeout=timeout)
        return Prediction(from_tensor(response.outputs), response.replica, response.model,
                          response.generation, response.batch_rows)
