"""What an idle agent does not load (issue 15: RSS <= 60 MB): cryptography without TLS or a
shard key, prometheus_client without /metrics, and never torch. Checked in a fresh
interpreter, since this test process has imported everything."""

from __future__ import annotations

import json
import subprocess
import sys

from lepton.common.lazy import deferred

AGENT_MODULES = ("lepton.agent.main", "lepton.agent.daemon", "lepton.agent.heartbeat", "lepton.agent.data_node",
                 "lepton.agent.assignments", "lepton.agent.tasks.runner", "lepton.coordinator.coordinator",
                 "lepton.coordinator.raft.node", "lepton.common.tls", "lepton.dataplane.shard_crypto")
HEAVY = ("cryptography", "prometheus_client", "torch", "numpy", "pyarrow")


def test_the_agents_modules_load_no_heavy_package_until_used():
    script = (
        "import importlib, json, sys\n"
        f"for m in {AGENT_MODULES!r}: importlib.import_module(m)\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(out.stdout) == []


def test_a_deferred_module_loads_on_first_use():
    script = (
        "import sys\n"
        "from lepton.common.lazy import deferred\n"
        "oid = deferred('cryptography.x509.oid', 'NameOID')\n"
        "assert 'cryptography.x509' not in sys.modules\n"
        "assert oid.COMMON_NAME.dotted_string == '2.5.4.3'\n"
        "assert 'cryptography.x509' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], timeout=120, check=True)
    assert repr(deferred("json", "dumps")) == "<deferred json.dumps>"
