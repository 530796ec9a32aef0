"""Shared helpers: render the chart with the real Helm library (helm-python-sdk, Helm v4's Go
SDK) and look objects up in the parsed manifests."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

# The Go library logs that files/aggregator-clusterrole.yaml is a link, on every load.
helm.disable_logging()

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "mermin"
RBAC_FILE = REPO / "deploy" / "rbac" / "aggregator-clusterrole.yaml"
NAMESPACE = "observability"
RELEASE = "mermin"

# The cases every manifest-level check runs over (the brief's render matrix).
CASES: dict[str, dict[str, Any]] = {
    "defaults": {},
    "three-replicas": {"aggregator": {"replicas": 3, "podAntiAffinity": "required"}},
    "s3": {
        "tempo": {
            "storage": {
                "backend": "s3",
                "secretName": "tempo-s3",
                "s3": {"bucket": "mermin-traces", "endpoint": "s3.eu-west-1.amazonaws.com", "region": "eu-west-1"},
            },
            "retention": {"blockRetention": "168h"},
        }
    },
    "gcs": {
        "tempo": {
            "storage": {"backend": "gcs", "secretName": "tempo-gcs", "gcs": {"bucketName": "mermin-traces-gcs"}},
            "retention": {"blockRetention": "336h", "perTenant": {"team-a": {"blockRetention": "24h"}}},
        }
    },
    "azure": {
        "tempo": {
            "storage": {
                "backend": "azure",
                "secretName": "tempo-azure",
                "azure": {"containerName": "traces", "storageAccountName": "merminstore"},
            }
        }
    },
    "mermin-names": {"aggregator": {"config": {"metadata": {"attributeNames": "mermin", "labels": ["app", "team"]}}}},
    "tls": {"tls": {"enabled": True, "certManager": {"enabled": True, "issuerRef": {"name": "mermin-ca"}}}},
    "everything-optional": {
        "serviceMonitor": {"enabled": True},
        "grafana": {"deploy": True, "prometheusDatasourceUid": "prom"},
        "tempo": {"metricsGenerator": {"remoteWriteUrl": "http://prometheus:9090/api/v1/write"}},
    },
}


def render_raw(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm template` would produce it."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(values=copy.deepcopy(values or {}), name=RELEASE, namespace=NAMESPACE, is_install=True)


class Rendered:
    """The parsed objects of one render, and its NOTES."""

    def __init__(self, values: dict[str, Any] | None = None):
        raw = render_raw(values)
        self.notes = raw.pop(f"{RELEASE}/templates/NOTES.txt", "")
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(raw.items()):
            for doc in yaml.safe_load_all(text):
                if doc:
                    doc.setdefault("__template", path)
                    self.objects.append(doc)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> dict[str, Any]:
        found = [o for o in self.all(kind) if o["metadata"]["name"] == name]
        assert len(found) == 1, f"{kind}/{name}: found {len(found)} (have {self.names()})"
        return found[0]

    def names(self) -> set[tuple[str, str]]:
        return {(o["kind"], o["metadata"]["name"]) for o in self.objects}

    def manifests(self) -> list[dict[str, Any]]:
        """The objects without the test's bookkeeping key."""
        return [{k: v for k, v in o.items() if k != "__template"} for o in self.objects]

    def hcl(self) -> str:
        return self.get("ConfigMap", "mermin-aggregator")["data"]["mermin.hcl"]

    def tempo_config(self) -> dict[str, Any]:
        return yaml.safe_load(self.get("ConfigMap", "mermin-tempo")["data"]["tempo.yaml"])

    def tempo_overrides(self) -> dict[str, Any]:
        return yaml.safe_load(self.get("ConfigMap", "mermin-tempo")["data"]["overrides.yaml"])

    def dashboard(self) -> dict[str, Any]:
        return json.loads(self.get("ConfigMap", "mermin-grafana-dashboard")["data"]["mermin-flows.json"])


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    assert len(found) == 1
    return found[0]


def env(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


@pytest.fixture(scope="session")
def rendered() -> dict[str, Rendered]:
    return {case: Rendered(values) for case, values in CASES.items()}
