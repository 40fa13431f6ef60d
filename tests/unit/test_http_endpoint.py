"""HTTP/JSON predictions (agent/http_endpoint.py): a real aiohttp server on loopback in front
of a PredictRouter over fake replicas (tests/unit/test_predict_router.py's)."""

from __future__ import annotations

import base64

import aiohttp
import numpy as np
import pytest

from lepton.agent.http_endpoint import MAX_BODY_BYTES, HttpEndpoint
from lepton.common.auth import AuthInterceptor, Principal, Role
from tests.unit.test_predict_router import endpoint_set, local_router
from tests.unit.test_predict_router import replicas as replicas  # noqa: F401 - the fixture

TOKENS = {"lep_user": Principal("alice", Role.USER), "lep_viewer": Principal("vic", Role.VIEWER)}


@pytest.fixture
async def http(replicas):  # noqa: F811 - the fixture imported above
    """(url, router, refusals) of an endpoint with auth on (tokens above)."""
    router = local_router(replicas, "t1")
    router.set_endpoints(endpoint_set(version=2, digits=[("t1", "nodeA", "a:1")], empty=[]))
    refusals = []
    auth = AuthInterceptor(TOKENS.get, use_certificates=False, on_event=refusals.append)
    endpoint = HttpEndpoint(router, "127.0.0.1", 0, auth=auth)
    url = await endpoint.start()
    yield url, router, refusals
    await endpoint.close()


async def post(url: str, body, token: str | None = "lep_user", path: str = "/v1/deployments/digits/predict"):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as session:
        kw = {"data": body} if isinstance(body, bytes) else {"json": body}
        async with session.post(url + path, headers=headers, **kw) as response:
            return response.status, await response.json()


async def test_rows_as_json_lists_are_predicted(http):
    url, router, _ = http
    status, body = await post(url, {"inputs": [[1, 2], [3, 4.5]]})
    assert status == 200, body
    assert body["predictions"] == [[2, 4], [6, 9]] and body["replica"] == "t1"
    assert (body["model"], body["generation"]) == ("m", 1)
    assert router.stats()[0].requests == 1  # the same router and counters as gRPC


async def test_a_big_body_is_converted_off_the_loop_and_answered(http):
    url, _, _ = http
    rows = np.random.default_rng(0).random((3000, 64), dtype=np.float32)
    status, body = await post(url, {"inputs": rows.tolist()})
    assert status == 200 and np.array_equal(np.asarray(body["predictions"], dtype=np.float32), rows * 2)


async def test_raw_tensors_in_base64(http):
    url, _, _ = http
    rows = np.arange(6, dtype="<f4").reshape(3, 2)
    status, body = await post(url, {"dtype": "<f4", "shape": [3, 2],
                                     "data_b64": base64.b64encode(rows.tobytes()).decode()})
    assert status == 200 and body["predictions"] == (rows * 2).tolist()


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not JSON"),
    ({"inputs": []}, "empty batch"),
    ({"inputs": [[1, 2], [3]]}, "all of one shape"),
    ({"inputs": [1, 2]}, "a list of rows"),
    ({"inputs": [["a"]]}, "rows of numbers"),
    ({"dtype": "<f4", "shape": [1, 2], "data_b64": "!!"}, "not base64"),
    ({"dtype": "<f4", "shape": [-1], "data_b64": ""}, "list of sizes"),
    ({"inputs": [[1]], "timeout_s": -1}, "timeout_s"),
    ({"rows": [[1]]}, 'give "inputs"'),
])
async def test_bad_bodies_are_400_with_a_message(http, body, message):
    url, _, _ = http
    status, answer = await post(url, body)
    assert status == 400 and answer["error"]["code"] == "INVALID_ARGUMENT"
    assert message in answer["error"]["message"]


async def test_an_oversized_body_is_400(http):
    url, _, _ = http
    status, answer = await post(url, b" " * (MAX_BODY_BYTES + 1))
    assert status == 400 and "split the rows" in answer["error"]["message"]


async def test_unknown_deployment_404_and_no_ready_replica_503(http):
    url, _, _ = http
    status, answer = await post(url, {"inputs": [[1]]}, path="/v1/deployments/nope/predict")
    assert status == 404 and answer["error"]["code"] == "NOT_FOUND"
    status, answer = await post(url, {"inputs": [[1]], "timeout_s": 0.1}, path="/v1/deployments/empty/predict")
    assert status == 503 and "no ready replica of empty" in answer["error"]["message"]


async def test_other_paths_and_methods_answer_json(http):
    url, _, _ = http
    status, answer = await post(url, {"inputs": [[1]]}, path="/v2/other")
    assert status == 404 and "POST /v1/deployments/NAME/predict" in answer["error"]["message"]
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/deployments/digits/predict") as r:
        assert r.status == 405 and (await r.json())["error"]["code"] == "INVALID_ARGUMENT"


async def test_tokens_are_checked_by_the_grpc_rule(http):
    url, _, refusals = http
    status, answer = await post(url, {"inputs": [[1]]}, token=None)
    assert status == 401 and "needs credentials" in answer["error"]["message"]
    status, answer = await post(url, {"inputs": [[1]]}, token="lep_unknown")
    assert status == 401 and "unknown, expired or revoked" in answer["error"]["message"]
    status, answer = await post(url, {"inputs": [[1]]}, token="lep_viewer")
    assert status == 403 and "needs role user or node" in answer["error"]["message"]
    assert [e.code.name for e in refusals] == ["UNAUTHENTICATED", "UNAUTHENTICATED", "PERMISSION_DENIED"]
    status, _ = await post(url, {"inputs": [[1]]}, token="lep_user")
    assert status == 200


async def test_https_takes_client_certificates_of_the_cluster_ca(replicas, tmp_path):  # noqa: F811
    """--tls-dir: the node's certificate, a CA client certificate required, and its role
    checked by the same interceptor (a viewer's certificate may not predict)."""
    import ssl

    from lepton.common import tls

    tls.init_ca(tmp_path)
    tls.issue(tmp_path, "node-a", kind="node", hosts=["127.0.0.1"])
    tls.issue(tmp_path, "alice", kind="user", role="user")
    tls.issue(tmp_path, "vic", kind="user", role="viewer")
    router = local_router(replicas, "t1")
    endpoint = HttpEndpoint(router, "127.0.0.1", 0, auth=AuthInterceptor(TOKENS.get, use_certificates=True),
                            ssl_context=tls.server_ssl_context(tmp_path, "node-a"))
    url = await endpoint.start()
    try:
        assert url.startswith("https://")
        body = {"inputs": [[1.0]]}
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/v1/deployments/digits/predict", json=body,
                                    ssl=tls.client_ssl_context(tmp_path, "alice")) as r:
                assert r.status == 200 and (await r.json())["predictions"] == [[2.0]]
            async with session.post(url + "/v1/deployments/digits/predict", json=body,
                                    ssl=tls.client_ssl_context(tmp_path, "vic")) as r:
                assert r.status == 403
            no_cert = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
            with pytest.raises(aiohttp.ClientError):
                async with session.post(url + "/v1/deployments/digits/predict", json=body, ssl=no_cert) as r:
                    await r.read()
    finally:
        await endpoint.close()


def test_the_listen_address_is_checked_like_the_grpc_ones():
    from lepton.common.config import AgentConfig
    from lepton.common.errors import InvalidArgument

    assert AgentConfig().serve_http_listen == ""  # off unless asked
    with pytest.raises(InvalidArgument, match="serve_http_listen"):
        AgentConfig(serve_http_listen="8080")
    with pytest.raises(InvalidArgument, match="refusing to serve predictions on 0.0.0.0:8080 without TLS"):
        AgentConfig(serve_http_listen="0.0.0.0:8080")
    assert AgentConfig(serve_http_listen="0.0.0.0:8080", insecure=True).serve_http_listen == "0.0.0.0:8080"
