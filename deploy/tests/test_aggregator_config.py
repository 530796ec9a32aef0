"""The rendered HCL parses with the aggregator's own loader and gives the expected settings:
`mermin-aggregator --config FILE --check-config` prints the effective settings as JSON (exit 0)
or `file:line: message` (exit 2). The binary: $MERMIN_AGGREGATOR_BIN, else
<repo>/target/debug/mermin-aggregator (scripts/chart-test.sh builds it)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import CASES, REPO, NAMESPACE, Rendered

BINARY = Path(os.environ.get("MERMIN_AGGREGATOR_BIN", REPO / "target" / "debug" / "mermin-aggregator"))
# The environment wins over the file: keep the aggregator's own variables out of the check.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("MERMIN_")}

DEFAULTS = {
    "listen": "0.0.0.0:4600",
    "data_dir": "/var/lib/mermin",
    "settle": "3s",
    "grace": "1m",
    "checkpoint_interval": "250ms",
    "outbox_max_bytes": 1073741824,
    "outbox_when_full": "backpressure",
    "export": {"traces": {"otlp": {"endpoint": f"http://mermin-tempo.{NAMESPACE}.svc:4317", "protocol": "grpc"}}},
    "metadata": {"attribute_names": "seed", "static_file": None, "labels": [], "deleted_grace": "5m", "kubernetes": True},
    "tls": {"mode": "disabled"},
    "replication": {
        "ordinal": None, "listen": "0.0.0.0:4610", "advertise": None, "peers": [],
        "snapshot_entries": 5000, "tls": {"cert_file": None, "key_file": None, "ca_file": None},
    },
}


def check(path: Path, pod_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    assert BINARY.is_file(), f"{BINARY} not found: build it (cargo build -p mermin-aggregator) or set MERMIN_AGGREGATOR_BIN"
    return subprocess.run(
        [str(BINARY), "--config", str(path), "--check-config"],
        capture_output=True, text=True, timeout=60, env={**ENV, **(pod_env or {})},
    )


def effective(hcl: str, tmp_path: Path, pod_env: dict[str, str] | None = None) -> dict[str, Any]:
    path = tmp_path / "mermin.hcl"
    path.write_text(hcl)
    result = check(path, pod_env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def subset(settings: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    """The parts of `settings` that `expected` names (more keys may appear in the output)."""
    return {
        key: subset(settings[key], value) if isinstance(value, dict) and isinstance(settings.get(key), dict) else settings.get(key)
        for key, value in expected.items()
    }


def merged(overrides: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(DEFAULTS))
    for key, value in overrides.items():
        if isinstance(value, dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


@pytest.mark.parametrize(
    "case, expected",
    [
        ("defaults", DEFAULTS),
        ("three-replicas", DEFAULTS),
        ("tls", merged({
            "tls": {
                "mode": "required",
                "cert_file": "/etc/mermin/tls/agent/tls.crt",
                "key_file": "/etc/mermin/tls/agent/tls.key",
                "client_ca_file": "/etc/mermin/tls/agent/ca.crt",
            },
            "replication": {**DEFAULTS["replication"], "tls": {
                "cert_file": "/etc/mermin/tls/peer/tls.crt",
                "key_file": "/etc/mermin/tls/peer/tls.key",
                "ca_file": "/etc/mermin/tls/peer/ca.crt",
            }},
        })),
        ("mermin-names", merged({"metadata": {"attribute_names": "mermin", "labels": ["app", "team"]}})),
    ],
)
def test_rendered_hcl_gives_the_expected_settings(rendered, tmp_path, case, expected):
    assert case in CASES
    settings = effective(rendered[case].hcl(), tmp_path)
    assert subset(settings, expected) == expected


def test_every_config_value_reaches_the_aggregator(tmp_path):
    values = {
        "aggregator": {
            "port": 4700,
            "config": {
                "settle": "5s",
                "grace": "2m",
                "checkpointInterval": "500ms",
                "outbox": {"maxBytes": 2147483648, "whenFull": "drop_oldest"},
                "export": {"otlp": {"endpoint": "http://otel-collector.otel.svc:4318", "protocol": "http/protobuf"}},
                "metadata": {"labels": ["app.kubernetes.io/name"], "deletedGrace": "10m", "kubernetes": False},
            },
        }
    }
    settings = effective(Rendered(values).hcl(), tmp_path)
    expected = merged(
        {
            "listen": "0.0.0.0:4700",
            "settle": "5s",
            "grace": "2m",
            "checkpoint_interval": "500ms",
            "outbox_max_bytes": 2147483648,
            "outbox_when_full": "drop_oldest",
            "export": {"traces": {"otlp": {"endpoint": "http://otel-collector.otel.svc:4318", "protocol": "http/protobuf"}}},
            "metadata": {"labels": ["app.kubernetes.io/name"], "deleted_grace": "10m", "kubernetes": False},
        }
    )
    assert subset(settings, expected) == expected


def test_export_headers_and_tls_files_reach_the_aggregator(tmp_path):
    values = {"aggregator": {"config": {"export": {"otlp": {
        "endpoint": "https://otlp.example.com:443",
        "headers": {"X-Scope-OrgID": "tenant-a"},
        "tls": {"secretName": "otlp-ca", "clientCertificate": True},
    }}}}}
    otlp = effective(Rendered(values).hcl(), tmp_path)["export"]["traces"]["otlp"]
    assert otlp["headers"] == ["x-scope-orgid"]
    assert otlp["tls"] == {
        "ca_file": "/etc/mermin/tls/otlp/ca.crt",
        "cert_file": "/etc/mermin/tls/otlp/tls.crt",
        "key_file": "/etc/mermin/tls/otlp/tls.key",
    }
    # The Secret's headers, in the environment, replace the file's.
    secret = effective(Rendered(values).hcl(), tmp_path, {"MERMIN_OTLP_HEADERS": "Authorization=Bearer s3cr3t,X-Scope-OrgID=b"})
    assert secret["export"]["traces"]["otlp"]["headers"] == ["authorization", "x-scope-orgid"]
    assert "s3cr3t" not in json.dumps(secret)
    # A value HCL would read as a template reaches the aggregator as written.
    template = {"aggregator": {"config": {"export": {"otlp": {"headers": {"X-Note": "${x}"}}}}}}
    assert effective(Rendered(template).hcl(), tmp_path)["export"]["traces"]["otlp"]["headers"] == ["x-note"]


def test_the_operators_client_ca_reaches_the_aggregator(tmp_path):
    values = {"tls": {"enabled": True, "adminClientCaSecretName": "operators-ca"}}
    tls = effective(Rendered(values).hcl(), tmp_path)["tls"]
    assert (tls["client_ca_file"], tls["admin_client_ca_file"]) == (
        "/etc/mermin/tls/agent/ca.crt",
        "/etc/mermin/tls/admin-clients/ca.crt",
    )


def test_the_checker_refuses_an_unknown_key_with_file_and_line(rendered, tmp_path):
    path = tmp_path / "mermin.hcl"
    path.write_text(rendered["defaults"].hcl() + 'peers = "a,b"\n')
    result = check(path)
    line = len(rendered["defaults"].hcl().splitlines()) + 1
    assert result.returncode == 2
    assert f"{path}:{line}:" in result.stderr
    assert "peers" in result.stderr


def test_the_pods_arguments_are_the_aggregators_own(tmp_path):
    """The StatefulSet's arguments, with the mounted config swapped for the rendered file."""
    r = Rendered({"aggregator": {"metricsPort": 9500}})
    path = tmp_path / "mermin.hcl"
    path.write_text(r.hcl())
    (c,) = r.get("StatefulSet", "mermin-aggregator")["spec"]["template"]["spec"]["containers"]
    mounted = "--config=/etc/mermin/config/mermin.hcl"
    assert c["args"][0] == mounted
    args = [f"--config={path}", *c["args"][1:], "--check-config"]
    result = subprocess.run([str(BINARY), *args], capture_output=True, text=True, timeout=60, env=ENV)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["metrics_listen"] == "0.0.0.0:9500"


def test_a_replica_pod_of_three_gets_its_ordinal_address_and_peers(rendered, tmp_path):
    """The StatefulSet's environment for pod 2, as the kubelet expands it."""
    r = rendered["three-replicas"]
    sts = r.get("StatefulSet", "mermin-aggregator")
    pod = "mermin-aggregator-2"
    variables = {
        e["name"]: e["value"].replace("$(POD_NAME)", pod)
        for e in sts["spec"]["template"]["spec"]["containers"][0]["env"]
        if e["name"].startswith("MERMIN_REPLICA")
    }
    settings = effective(r.hcl(), tmp_path, variables)
    peers = [f"mermin-aggregator-{i}.mermin-aggregator-peers.{NAMESPACE}.svc:4610" for i in range(3)]
    assert settings["replication"] == {
        "ordinal": 2,
        "listen": "0.0.0.0:4610",
        "advertise": peers[2],
        "peers": peers,
        "snapshot_entries": 5000,
        "tls": {"cert_file": None, "key_file": None, "ca_file": None},
    }
