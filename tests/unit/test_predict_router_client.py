"""Client.predict / predict_detailed against a fake Inference server (a sync gRPC server in
a thread), and the tensor conversions."""

from __future__ import annotations

from concurrent import futures

import grpc
import numpy as np
import pytest

from lepton.client import Client
from lepton.client.predict import from_tensor, to_tensor
from lepton.common.errors import InvalidArgument
from lepton.v1 import serving_pb2, serving_pb2_grpc


class Doubler(serving_pb2_grpc.InferenceServicer):
    def __init__(self):
        self.requests: list[serving_pb2.PredictRequest] = []

    def Predict(self, request, context):
        self.requests.append(request)
        if request.inputs.dtype != "<f4":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"inputs.dtype is {request.inputs.dtype!r}")
        x = from_tensor(request.inputs)
        return serving_pb2.PredictResponse(outputs=to_tensor(x * 2), replica="t1", model="m2",
                                           generation=2, batch_rows=x.shape[0])


@pytest.fixture
def server():
    fake = Doubler()
    srv = grpc.server(futures.ThreadPoolExecutor(2))
    serving_pb2_grpc.add_InferenceServicer_to_server(fake, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", fake
    srv.stop(None)


def test_predict_sends_raw_rows_and_returns_one_output_row_each(server):
    address, fake = server
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    with Client(address, tls_dir="", token="") as c:
        out = c.predict("digits", rows)
        detailed = c.predict_detailed("digits", rows[:1])
    assert np.array_equal(out, rows * 2) and out.flags.writeable
    assert (detailed.replica, detailed.model, detailed.generation, detailed.batch_rows) == ("t1", "m2", 2, 1)
    sent = fake.requests[0]
    assert (sent.deployment, sent.inputs.dtype, list(sent.inputs.shape)) == ("digits", "<f4", [3, 4])
    assert sent.inputs.data == rows.tobytes() and not sent.replica


def test_the_servers_refusal_comes_back_as_its_error(server):
    address, _ = server
    with Client(address, tls_dir="", token="") as c, pytest.raises(InvalidArgument, match="inputs.dtype is '<f8'"):
        c.predict("digits", np.ones((1, 4)))  # float64 is sent as is, not cast quietly


def test_tensor_conversions():
    big_endian = np.arange(4, dtype=">f4").reshape(2, 2)
    t = to_tensor(big_endian)
    assert t.dtype == "<f4" and np.array_equal(from_tensor(t), big_endian)
    assert list(to_tensor([[1, 2], [3, 4]]).shape) == [2, 2]
    with pytest.raises(InvalidArgument, match="rows axis"):
        to_tensor(np.float32(1))
    with pytest.raises(InvalidArgument, match="numbers"):
        to_tensor(["a", "b"])
    with pytest.raises(InvalidArgument, match="does not add up"):
        from_tensor(serving_pb2.Tensor(dtype="<f4", shape=[3], data=b"\0" * 4))
