"""Issue 19, the stable endpoint, end to end: real agents, real replica processes, the digits
model. Predictions through Client.predict, `serve predict -o json` and HTTP equal the batch
`predict` recipe's; kill -9 of a replica's agent and `serve update` under steady load (2 s
deadline per request) fail no request; bad input is INVALID_ARGUMENT; HTTP under --auth."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest

from lepton.client import Client
from lepton.client.predict import from_tensor, to_tensor
from lepton.common.errors import InvalidArgument
from lepton.v1 import serving_pb2, serving_pb2_grpc
from tests.integration.cluster import run_ctl, wait_until

pytestmark = pytest.mark.integration

REPLICA_CPU = 0.25


def digits_model(path: Path, *, seed: int, epochs: int) -> tuple[Path, np.ndarray]:
    """A digits MLP trained briefly here (full batch, a second at most), saved as the recipes
    save models; and some held-out rows."""
    import torch
    from sklearn.datasets import load_digits

    from lepton.workloads.recipes.models import build_model, save_model

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    torch.manual_seed(seed)
    model = build_model("mlp", [64], 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x[:1500]), torch.from_numpy(y[:1500])
    for _ in range(epochs):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    save_model(path, model, {"algorithm": "mlp", "task": "classification", "input_shape": [64], "output_dim": 10,
                             "num_classes": 10, "target_shape": [], "hidden": 64, "recipe": "test"})
    return path, x[1500:1532]


def batch_predictions(model_path: Path, rows: np.ndarray, tmp: Path) -> np.ndarray:
    """What the batch `predict` recipe writes for `rows` (through a shard, as a job reads it)."""
    from lepton.dataplane import shard_format as fmt
    from lepton.workloads.recipes.predict import predict

    shard = tmp / "rows.npy"
    fmt.write_shard(fmt.make_records(rows, None), shard)
    return predict(str(model_path), [str(shard)])


def store_model(client: Client, name: str, path: Path, copies: int = 1) -> None:
    """`copies`: on that many nodes (a copy only on a killed node could not be fetched)."""
    from lepton.workloads.recipes.cluster import model_labels, put_file
    from lepton.workloads.recipes.models import read_config

    put_file(client, name, path, replicas=copies, kind="model", labels=model_labels(read_config(path)))


def wait_ready(client: Client, name: str, count: int, agents_started: list, what: str,
               nodes: Callable[[set[str]], bool] = lambda _nodes: True) -> None:
    """Until `count` replicas of the current generation are ready (on `nodes` that pass);
    on a timeout, the deployment's sentence and the replicas' output say why."""
    def done() -> bool:
        ready = ready_replicas(client, name)
        return len(ready) >= count and nodes({r.node_id for r in ready})

    try:
        wait_until(done, timeout=240, what=what)
    except AssertionError as err:
        d = client.get_deployment(name)
        outputs = [f"{f}:\n{f.read_text(errors='replace')[-1500:]}" for a in agents_started
                   for f in a.data_dir.glob("tasks/*/*/output.log")]
        raise AssertionError(f"{err}; {d.state}: {d.message}\n" + "\n".join(outputs)
                             + "\n".join(a.log()[-1500:] for a in agents_started)) from None


def ready_replicas(client: Client, name: str, generation: int | None = None) -> list:
    d = client.get_deployment(name)
    gen = d.generation if generation is None else generation
    return [r for r in d.replica_list if r.state == "ready" and r.generation == gen]


class SteadyLoad:
    """One caller in a loop, each request with a 2 s deadline, straight to one agent's
    Inference.Predict (no client-side retry): every failure is counted."""

    def __init__(self, address: str, deployment: str, rows: np.ndarray, token: str = ""):
        self._channel = grpc.insecure_channel(address)
        self._stub = serving_pb2_grpc.InferenceStub(self._channel)
        self._request = serving_pb2.PredictRequest(deployment=deployment, inputs=to_tensor(rows))
        self.answers: list[serving_pb2.PredictResponse] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(self._stub.Predict(self._request, timeout=2.0))
            except grpc.RpcError as err:
                self.failures.append(f"{err.code().name}: {err.details()}")

    def __enter__(self) -> SteadyLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        self._channel.close()

    def answered_since(self, n: int) -> int:
        return len(self.answers) - n


@pytest.fixture
def models(tmp_path):
    m1, rows = digits_model(tmp_path / "m1.safetensors", seed=0, epochs=60)
    m2, _ = digits_model(tmp_path / "m2.safetensors", seed=1, epochs=5)
    return m1, m2, rows


@pytest.mark.timeout(900)  # replicas import torch: tens of seconds each on a loaded machine
def test_serving_e2e(agents, models, tmp_path):
    """Through any agent, equal to the batch recipe; survives a node loss and an update.
    (Short test names: a replica's socket lives under the test's folder, and unix socket
    paths hold at most 107 bytes.)"""
    m1, m2, rows = models
    voter = agents("voter", "--serve-http-listen", "127.0.0.1:0")
    workers = [agents(f"worker-{i}", "--join", voter.address) for i in (1, 2)]
    with Client(voter.address, timeout=30) as c:
        wait_until(lambda: len(c.nodes(states=["ready"])) == 3, what="three ready nodes")
        store_model(c, "digits-a", m1, copies=3)
        store_model(c, "digits-b", m2, copies=3)
        c.create_deployment("digits", "digits-a", replicas=2, cpu=REPLICA_CPU, max_batch=8, max_wait_ms=2)
        wait_ready(c, "digits", 2, [voter, *workers], "two ready replicas")
        placed = {r.node_id for r in ready_replicas(c, "digits")}
        assert len(placed) == 2  # spread across nodes

        # Predictions equal the batch recipe's, through every door and every agent.
        expected = batch_predictions(m1, rows, tmp_path)
        for agent in (voter, *workers):
            with Client(agent.address, timeout=30) as via:
                assert np.array_equal(via.predict("digits", rows), expected)
        np.save(tmp_path / "rows.npy", rows)
        out = run_ctl("-o", "json", "serve", "predict", "digits", "--input", str(tmp_path / "rows.npy"),
                      server=workers[0].address, check=True)
        assert json.loads(out.stdout) == {"predictions": expected.tolist()}
        http_url = json.loads((voter.data_dir / "agent.json").read_text())["http"]
        status, body = http_post(f"{http_url}/v1/deployments/digits/predict", {"inputs": rows.tolist()})
        assert status == 200 and body["predictions"] == expected.tolist() and body["model"] == "digits-a"

        # Bad input is INVALID_ARGUMENT with a message, and the replicas keep serving.
        for bad, message in ((rows.astype(np.float64), "dtype"), (rows[:, :10], "shape"),
                             (np.zeros((0, 64), np.float32), "no rows"),
                             (np.zeros((55_000, 64), np.float32), "split")):
            with pytest.raises(InvalidArgument, match=message):
                c.predict("digits", bad)
        assert np.array_equal(c.predict("digits", rows), expected)

        # kill -9 of a replica's agent under steady load: no request fails; it is replaced.
        victim = next(w for w in workers if w.node_id in placed)
        with SteadyLoad(voter.address, "digits", rows[:4]) as load:
            wait_until(lambda: load.answered_since(0) >= 20, what="steady load")
            victim.kill9()
            at_kill = len(load.answers)
            wait_ready(c, "digits", 2, [voter, *workers], "the lost replica replaced on a live node",
                       nodes=lambda on: len(on - {victim.node_id}) == 2)
            wait_until(lambda: load.answered_since(at_kill) >= 20, what="answers after the replacement")
        assert load.failures == [], load.failures[:5]

        # `serve update` under load: no request fails; then every answer is the new model's.
        with SteadyLoad(voter.address, "digits", rows[:4]) as load:
            wait_until(lambda: load.answered_since(0) >= 10, what="steady load")
            run_ctl("serve", "update", "digits", "digits-b", "--wait-timeout", "240", server=voter.address,
                    check=True, timeout=300)
            rolled = len(load.answers)
            wait_until(lambda: load.answered_since(rolled) >= 20, what="answers after the update")
        assert load.failures == [], load.failures[:5]
        after = load.answers[rolled:]
        assert {(a.model, a.generation) for a in after} == {("digits-b", 2)}
        assert np.array_equal(from_tensor(after[-1].outputs), batch_predictions(m2, rows[:4], tmp_path))


@pytest.mark.timeout(600)
def test_serving_auth(agents, models, tmp_path):
    """HTTP and gRPC predictions under --auth: tokens checked, roles enforced."""
    m1, _, rows = models
    voter = agents("voter", "--auth", "--serve-http-listen", "127.0.0.1:0")
    admin = (voter.data_dir / "admin.token")
    wait_until(admin.exists, what="the bootstrap admin token")
    admin = admin.read_text().strip()
    user = run_ctl("--token", admin, "tokens", "create", "--role", "user", "--name", "alice",
                   server=voter.address, check=True).stdout.strip()
    viewer = run_ctl("--token", admin, "tokens", "create", "--role", "viewer", "--name", "vic",
                     server=voter.address, check=True).stdout.strip()
    with Client(voter.address, timeout=30, token=user) as c:
        store_model(c, "digits-a", m1)
        c.create_deployment("digits", "digits-a", replicas=1, cpu=REPLICA_CPU)
        wait_ready(c, "digits", 1, [voter], "a ready replica")
        expected = batch_predictions(m1, rows, tmp_path)
        assert np.array_equal(c.predict("digits", rows), expected)
    url = json.loads((voter.data_dir / "agent.json").read_text())["http"] + "/v1/deployments/digits/predict"
    status, body = http_post(url, {"inputs": rows.tolist()})
    assert status == 401 and body["error"]["code"] == "UNAUTHENTICATED"
    status, body = http_post(url, {"inputs": rows.tolist()}, token=viewer)
    assert status == 403 and "needs role user" in body["error"]["message"]
    status, body = http_post(url, {"inputs": rows.tolist()}, token=user)
    assert status == 200 and body["predictions"] == expected.tolist()
    status, body = http_post(url, {"inputs": [[1.0, 2.0]]}, token=user)
    assert status == 400 and "shape" in body["error"]["message"]
    # serve show's figures: this agent's router counters, reported to the leader and merged.
    with Client(voter.address, timeout=30, token=user) as c:
        stats = wait_until(lambda: (s := c.get_deployment("digits").stats).requests >= 3 and s,
                           what="serve show counting the requests")
        assert stats.errors >= 1 and stats.p50_ms > 0 and stats.p99_ms >= stats.p50_ms
    # Only a node may name the replica to use: a user's forged forwarding is refused.
    with grpc.insecure_channel(voter.address) as ch:
        stub = serving_pb2_grpc.InferenceStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Predict(serving_pb2.PredictRequest(deployment="digits", inputs=to_tensor(rows), replica="x" * 16),
                         metadata=[("authorization", f"Bearer {user}")], timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def http_post(url: str, body: dict, token: str = "") -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
