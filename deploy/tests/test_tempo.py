"""The rendered Tempo: storage backend, retention and credentials in the documented places, and
no configuration key outside the documented set for the pinned version
(fixtures/tempo-config-keys.yaml)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import CASES, Rendered, container, env

KEYS = yaml.safe_load((Path(__file__).parent / "fixtures" / "tempo-config-keys.yaml").read_text())
RUNTIME_KEYS = KEYS.pop("runtime_overrides")


def unknown_keys(config: Any, allowed: Any, path: str = "") -> list[str]:
    """Paths in `config` that `allowed` (the fixture's tree) does not document."""
    if isinstance(config, list):
        if isinstance(allowed, dict) and "[]" in allowed:
            return [p for i, item in enumerate(config) for p in unknown_keys(item, allowed["[]"], f"{path}[{i}]")]
        if allowed is None and all(not isinstance(item, (dict, list)) for item in config):
            return []
        return [f"{path} (a list the fixture does not describe)"]
    if not isinstance(config, dict):
        return [] if allowed is None else [f"{path} (a scalar where the fixture expects a map)"]
    if not isinstance(allowed, dict):
        return [f"{path} (a map where the fixture expects a scalar)"]
    found = []
    for key, value in config.items():
        where = f"{path}.{key}" if path else key
        if key in allowed:
            found += unknown_keys(value, allowed[key], where)
        elif "*" in allowed:
            found += unknown_keys(value, allowed["*"], where)
        else:
            found.append(where)
    return found


def test_walker_reports_undocumented_keys():
    config = {
        "compactor": {"compaction": {"block_retention": "1h", "retention": "1h"}},
        "storage": {"trace": {"s3": {"bucket": "b", "access_key_id": "x"}}},
        "metrics_generator": {"storage": {"remote_write": [{"url": "u", "basic_auth": {}}]}},
        "server": {"http_listen_port": {"nested": 1}},
    }
    assert unknown_keys(config, KEYS) == [
        "compactor.compaction.retention",
        "storage.trace.s3.access_key_id",
        "metrics_generator.storage.remote_write[0].basic_auth",
        "server.http_listen_port (a map where the fixture expects a scalar)",
    ]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rendered_key_is_documented(rendered, case):
    assert unknown_keys(rendered[case].tempo_config(), KEYS) == []
    assert unknown_keys(rendered[case].tempo_overrides(), RUNTIME_KEYS) == []


@pytest.mark.parametrize(
    "case, backend, block, expected",
    [
        ("defaults", "local", "local", {"path": "/var/tempo/blocks"}),
        (
            "s3",
            "s3",
            "s3",
            {
                "bucket": "mermin-traces",
                "endpoint": "s3.eu-west-1.amazonaws.com",
                "region": "eu-west-1",
                "insecure": False,
                "forcepathstyle": False,
                "access_key": "${TEMPO_S3_ACCESS_KEY}",
                "secret_key": "${TEMPO_S3_SECRET_KEY}",
            },
        ),
        ("gcs", "gcs", "gcs", {"bucket_name": "mermin-traces-gcs"}),
        (
            "azure",
            "azure",
            "azure",
            {
                "container_name": "traces",
                "storage_account_name": "merminstore",
                "endpoint_suffix": "blob.core.windows.net",
                "storage_account_key": "${TEMPO_AZURE_STORAGE_ACCOUNT_KEY}",
            },
        ),
    ],
)
def test_storage_backend_and_bucket(rendered, case, backend, block, expected):
    trace = rendered[case].tempo_config()["storage"]["trace"]
    assert trace["backend"] == backend
    assert trace[block] == expected
    assert trace["wal"] == {"path": "/var/tempo/wal"}
    # Exactly one backend block besides the WAL.
    assert set(trace) == {"backend", "wal", block}


@pytest.mark.parametrize(
    "case, variables",
    [
        ("s3", {"TEMPO_S3_ACCESS_KEY": ("tempo-s3", "access_key"), "TEMPO_S3_SECRET_KEY": ("tempo-s3", "secret_key")}),
        ("azure", {"TEMPO_AZURE_STORAGE_ACCOUNT_KEY": ("tempo-azure", "account_key")}),
    ],
)
def test_credentials_come_from_the_secret_and_every_reference_is_defined(rendered, case, variables):
    r = rendered[case]
    tempo = container(r.get("StatefulSet", "mermin-tempo"), "tempo")
    assert tempo["args"] == ["-config.file=/conf/tempo.yaml", "-config.expand-env=true"]
    defined = env(tempo)
    assert {name: (ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]) for name, ref in defined.items()} == variables
    text = r.get("ConfigMap", "mermin-tempo")["data"]["tempo.yaml"]
    assert set(re.findall(r"\$\{([A-Z0-9_]+)\}", text)) == set(variables)


def test_gcs_service_account_key_is_mounted_and_named(rendered):
    sts = rendered["gcs"].get("StatefulSet", "mermin-tempo")
    tempo = container(sts, "tempo")
    assert env(tempo) == {"GOOGLE_APPLICATION_CREDENTIALS": "/var/secrets/gcs/service-account.json"}
    assert {"name": "gcs-credentials", "mountPath": "/var/secrets/gcs", "readOnly": True} in tempo["volumeMounts"]
    assert {"name": "gcs-credentials", "secret": {"secretName": "tempo-gcs"}} in sts["spec"]["template"]["spec"]["volumes"]
    assert "${" not in rendered["gcs"].get("ConfigMap", "mermin-tempo")["data"]["tempo.yaml"]


def test_no_secret_means_no_credentials_in_the_config():
    r = Rendered({"tempo": {"storage": {"backend": "s3", "s3": {"bucket": "b", "endpoint": "minio:9000", "insecure": True}}}})
    s3 = r.tempo_config()["storage"]["trace"]["s3"]
    assert s3 == {"bucket": "b", "endpoint": "minio:9000", "insecure": True, "forcepathstyle": False}
    assert "env" not in container(r.get("StatefulSet", "mermin-tempo"), "tempo")


def test_a_cloud_identity_reaches_the_bucket_through_tempos_service_account():
    role = "arn:aws:iam::123456789012:role/mermin-tempo"
    r = Rendered(
        {
            "tempo": {
                "storage": {
                    "backend": "s3",
                    "s3": {"bucket": "traces", "endpoint": "s3.eu-west-1.amazonaws.com", "region": "eu-west-1"},
                },
                "serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": role}},
                "podLabels": {"azure.workload.identity/use": "true"},
            }
        }
    )
    account = r.get("ServiceAccount", "mermin-tempo")
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": role}
    assert account["automountServiceAccountToken"] is False
    sts = r.get("StatefulSet", "mermin-tempo")
    pod = sts["spec"]["template"]
    assert pod["spec"]["serviceAccountName"] == "mermin-tempo"
    assert pod["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert "azure.workload.identity/use" not in sts["spec"]["selector"]["matchLabels"]
    # No keys anywhere: the identity is the pod's.
    assert "env" not in container(sts, "tempo")
    assert r.tempo_config()["storage"]["trace"]["s3"]["bucket"] == "traces"


def test_azure_without_a_key_signs_in_with_the_workload_identity_token():
    storage = {"backend": "azure", "azure": {"containerName": "traces", "storageAccountName": "acct"}}
    azure = Rendered({"tempo": {"storage": storage}}).tempo_config()["storage"]["trace"]["azure"]
    assert azure["use_federated_token"] is True
    assert "storage_account_key" not in azure
    keyed = Rendered({"tempo": {"storage": {**storage, "secretName": "tempo-azure"}}}).tempo_config()
    assert "use_federated_token" not in keyed["storage"]["trace"]["azure"]


def test_an_existing_service_account_is_used_not_created():
    r = Rendered({"tempo": {"serviceAccount": {"create": False, "name": "tempo-bucket-reader"}}})
    assert ("ServiceAccount", "mermin-tempo") not in r.names()
    pod = r.get("StatefulSet", "mermin-tempo")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "tempo-bucket-reader"


@pytest.mark.parametrize("case, retention", [("defaults", "720h"), ("s3", "168h"), ("gcs", "336h")])
def test_retention_is_the_compactors_block_retention(rendered, case, retention):
    assert rendered[case].tempo_config()["compactor"]["compaction"] == {
        "block_retention": retention,
        "compacted_block_retention": "1h",
        "compaction_window": "1h",
        "max_block_bytes": 107374182400,
    }


def test_per_tenant_retention_goes_to_the_runtime_overrides_file(rendered):
    config = rendered["gcs"].tempo_config()
    assert config["overrides"]["per_tenant_override_config"] == "/conf/overrides.yaml"
    assert rendered["gcs"].tempo_overrides() == {"overrides": {"team-a": {"compaction": {"block_retention": "24h"}}}}
    assert rendered["defaults"].tempo_overrides() == {"overrides": {}}
    mounts = container(rendered["gcs"].get("StatefulSet", "mermin-tempo"), "tempo")["volumeMounts"]
    assert {"name": "config", "mountPath": "/conf", "readOnly": True} in mounts


def test_metrics_generator_draws_the_service_graph(rendered):
    config = rendered["defaults"].tempo_config()
    assert config["overrides"]["defaults"]["metrics_generator"]["processors"] == ["service-graphs", "span-metrics", "local-blocks"]
    generator = config["metrics_generator"]
    assert generator["processor"]["service_graphs"]["dimensions"] == ["source.namespace", "destination.namespace"]
    assert generator["processor"]["local_blocks"] == {"filter_server_spans": False, "flush_to_storage": True}
    assert "remote_write" not in generator["storage"]
    named = rendered["mermin-names"].tempo_config()["metrics_generator"]["processor"]["service_graphs"]
    assert named["dimensions"] == ["source.k8s.namespace.name", "destination.k8s.namespace.name"]
    remote = rendered["everything-optional"].tempo_config()["metrics_generator"]["storage"]["remote_write"]
    assert remote == [{"url": "http://prometheus:9090/api/v1/write", "send_exemplars": True}]


def test_metrics_generator_off_removes_the_block_and_the_processors():
    config = Rendered({"tempo": {"metricsGenerator": {"enabled": False}}}).tempo_config()
    assert "metrics_generator" not in config
    assert "metrics_generator" not in config["overrides"]["defaults"]


def test_receivers_and_ports_match_the_service(rendered):
    r = rendered["defaults"]
    config = r.tempo_config()
    protocols = config["distributor"]["receivers"]["otlp"]["protocols"]
    assert protocols == {"grpc": {"endpoint": "0.0.0.0:4317"}, "http": {"endpoint": "0.0.0.0:4318"}}
    assert config["server"] == {"http_listen_port": 3200, "grpc_listen_port": 9095}
    service = r.get("Service", "mermin-tempo")
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"http": 3200, "otlp-grpc": 4317, "otlp-http": 4318, "grpc": 9095}
    assert container(r.get("StatefulSet", "mermin-tempo"), "tempo")["image"] == "grafana/tempo:2.8.2"
