"""HTTP/JSON predictions for callers without gRPC: `POST /v1/deployments/NAME/predict`.

Served by an agent started with `--serve-http-listen HOST:PORT` (aiohttp, imported only
then), in front of the same router as gRPC `Inference.Predict` (agent/predict_router.py).
Same transport security and the same authorization code as the agent's gRPC server: with
--tls-dir it is HTTPS with the node certificate and the caller presents a client certificate
of the cluster CA; with --auth, `Authorization: Bearer <token>` or that certificate is
checked by the agent's AuthInterceptor against the Predict rule (common/auth.py).

Body: {"inputs": [[...], ...]} (numbers, one list per row, sent to the model as float32), or
raw: {"dtype": "<f4", "shape": [rows, ...], "data_b64": "..."}; optional "timeout_s".
Answer: {"predictions": [...one per input row], "replica", "model", "generation"}.
Errors: {"error": {"code": "NOT_FOUND", "message": "..."}} with HTTP 400 (bad input, an
oversized body included), 401, 403, 404, 503 (no ready replica), 504, 500.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
import ssl
from typing import Any

from aiohttp import web

from lepton.agent.predict_router import MAX_PREDICT_BYTES, PredictRouter
from lepton.common.auth import AuthEvent, AuthInterceptor, rule_for
from lepton.common.auth import _Denied as Denied  # the interceptor's refusal, reused as is
from lepton.common.errors import InvalidArgument, LeptonError
from lepton.common.validation import join_host_port
from lepton.v1 import serving_pb2

logger = logging.getLogger(__name__)

PREDICT_METHOD = "/lepton.v1.Inference/Predict"  # the rule HTTP callers are held to
# JSON spells a float32 in up to ~16 characters and base64 takes 4/3: room for a request
# the router accepts, in either form.
MAX_BODY_BYTES = MAX_PREDICT_BYTES * 4
# Bodies and answers past this are converted in a thread.
_INLINE_BYTES = 256 * 1024
_HTTP_STATUS = {
    "INVALID_ARGUMENT": 400, "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
}


def error_response(code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=_HTTP_STATUS.get(code, 500))


class _HttpCallContext:
    """What AuthInterceptor.authorize reads from a gRPC call, taken from an HTTP request."""

    def __init__(self, request: web.Request):
        self._request = request

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return [("authorization", v) for v in self._request.headers.getall("Authorization", [])]

    def auth_context(self) -> dict[str, list[bytes]]:
        ssl_object = self._request.transport.get_extra_info("ssl_object") if self._request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            return {}
        return {"transport_security_type": [b"ssl"], "x509_pem_cert": [ssl.DER_cert_to_PEM_cert(der).encode()]}


def parse_body(raw: bytes) -> tuple[serving_pb2.Tensor, float | None]:
    """The inputs and the optional timeout of a request body. Raises InvalidArgument."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidArgument(f"the body is not JSON: {err}") from None
    if not isinstance(body, dict):
        raise InvalidArgument('the body must be a JSON object: {"inputs": [[...], ...]}')
    timeout = body.get("timeout_s")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or not 0 < timeout <= 3600):
        raise InvalidArgument("timeout_s must be a number of seconds between 0 and 3600")
    if "inputs" in body:
        return _rows_tensor(body["inputs"]), timeout
    if "data_b64" in body:
        return _raw_tensor(body), timeout
    raise InvalidArgument('give "inputs" (a list of rows) or "dtype", "shape" and "data_b64"')


def _rows_tensor(rows: Any) -> serving_pb2.Tensor:
    import numpy as np

    if not isinstance(rows, list) or not rows:
        raise InvalidArgument('"inputs" must be a non-empty list of rows (an empty batch has nothing to predict)')
    try:
        array = np.asarray(rows, dtype="<f4")
    except (TypeError, ValueError):
        raise InvalidArgument('"inputs" must be rows of numbers, all of one shape') from None
    if array.ndim < 2:
        raise InvalidArgument('"inputs" must be a list of rows, e.g. [[0.1, 0.2], [0.3, 0.4]]')
    return serving_pb2.Tensor(dtype=array.dtype.str, shape=list(array.shape), data=array.tobytes())


def _raw_tensor(body: dict[str, Any]) -> serving_pb2.Tensor:
    dtype, shape, data = body.get("dtype"), body.get("shape"), body.get("data_b64")
    if not isinstance(dtype, str) or not isinstance(data, str):
        raise InvalidArgument('raw inputs need "dtype" (e.g. "<f4") and "data_b64" as strings')
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40
                                              for d in shape):
        raise InvalidArgument('raw inputs need "shape": a list of sizes, [rows, ...]')
    try:
        payload = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument('"data_b64" is not base64') from None
    return serving_pb2.Tensor(dtype=dtype, shape=shape, data=payload)


def predictions_json(response: serving_pb2.PredictResponse) -> dict[str, Any]:
    import numpy as np

    outputs = response.outputs
    try:
        array = np.frombuffer(outputs.data, dtype=np.dtype(outputs.dtype)).reshape([int(d) for d in outputs.shape])
    except (TypeError, ValueError) as err:
        raise LeptonError(f"the replica's answer does not add up: {err}") from None
    return {"predictions": array.tolist(), "replica": response.replica, "model": response.model,
            "generation": response.generation}


class HttpEndpoint:
    """The aiohttp server; `start()` binds, `close()` stops. `url` once started."""

    def __init__(self, router: PredictRouter, host: str, port: int, *,
                 auth: AuthInterceptor | None = None, ssl_context: ssl.SSLContext | None = None):
        self._router = router
        self._auth = auth
        self._ssl = ssl_context
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_json_errors])
        app.router.add_post("/v1/deployments/{name}/predict", self._predict)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, ssl_context=self._ssl, reuse_address=True)
        await site.start()
        port = self._runner.addresses[0][1]  # the real one, when the port asked was 0
        self.url = f"{'https' if self._ssl else 'http'}://{join_host_port(self._host, port)}"
        logger.info("serving HTTP predictions on %s/v1/deployments/NAME/predict", self.url)
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _authorize(self, request: web.Request) -> web.Response | None:
        """None when the caller may predict, else the refusal to send."""
        if self._auth is None:
            return None
        context = _HttpCallContext(request)
        try:
            await self._auth.resolve(context.invocation_metadata())
            self._auth.authorize(PREDICT_METHOD, rule_for(PREDICT_METHOD), context)
        except Denied as denied:
            logger.info("refused HTTP predict: %s", denied.message)
            self._auth.emit(AuthEvent(denied.principal, PREDICT_METHOD, denied.code, True, None, denied.message))
            return error_response(denied.code.name, denied.message)
        except LeptonError as err:  # a worker could not reach a voter to check the token
            return error_response(err.code.name, err.message)
        return None

    async def _predict(self, request: web.Request) -> web.Response:
        refused = await self._authorize(request)
        if refused is not None:
            return refused
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return error_response("INVALID_ARGUMENT", f"the body is over {MAX_BODY_BYTES} bytes: split the rows "
                                                      "into several requests")
        try:
            # A big body's JSON would hold the agent's loop (heartbeats, Raft on a voter): off it.
            inputs, timeout = parse_body(raw) if len(raw) < _INLINE_BYTES else await asyncio.to_thread(parse_body, raw)
            response = await self._router.predict(request.match_info["name"], inputs, timeout_s=timeout)
            if len(response.outputs.data) < _INLINE_BYTES:
                return web.json_response(predictions_json(response))
            return web.json_response(await asyncio.to_thread(predictions_json, response))
        except LeptonError as err:
            return error_response(err.code.name, err.message)


@web.middleware
async def _json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own refusals (unknown path, wrong method) as JSON like ours."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = {404: "NOT_FOUND", 405: "INVALID_ARGUMENT", 413: "INVALID_ARGUMENT"}.get(exc.status, "INTERNAL")
        response = error_response(code, f"{request.method} {request.path}: {exc.reason}; "
                                        "use POST /v1/deployments/NAME/predict")
        response.set_status(exc.status)
        return response
