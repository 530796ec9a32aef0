"""Every rendered manifest against the Kubernetes OpenAPI schemas, strict (an unknown field fails),
for the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest bundled one.
kubernetes-validate bundles the schemas: no network. The CRD kinds (cert-manager's Certificate,
Prometheus Operator's ServiceMonitor) have no bundled schema and are skipped, by name."""

from __future__ import annotations

import copy

import kubernetes_validate
import pytest

from conftest import CASES

VERSIONS = ["1.25.0", "1.37.0"]
CRD_KINDS = {"Certificate", "ServiceMonitor"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_manifests_are_valid_kubernetes_objects(rendered, case, version):
    checked = 0
    for manifest in rendered[case].manifests():
        if manifest["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(manifest, version, strict=True)
        checked += 1
    assert checked >= 16


def test_only_the_crd_kinds_are_skipped(rendered):
    kinds = {m["kind"] for case in CASES for m in rendered[case].manifests()}
    assert kinds & CRD_KINDS == CRD_KINDS
    for kind in CRD_KINDS:
        sample = next(m for case in CASES for m in rendered[case].manifests() if m["kind"] == kind)
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(sample, VERSIONS[-1], strict=True)


def test_strict_validation_fails_on_an_unknown_field(rendered):
    daemonset = copy.deepcopy(rendered["defaults"].get("DaemonSet", "mermin-agent"))
    daemonset.pop("__template")
    daemonset["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegedd"] = False
    with pytest.raises(kubernetes_validate.ValidationError) as err:
        kubernetes_validate.validate(daemonset, VERSIONS[-1], strict=True)
    assert "privilegedd" in err.value.message


def test_validation_fails_on_a_wrong_type(rendered):
    service = copy.deepcopy(rendered["defaults"].get("Service", "mermin-aggregator"))
    service.pop("__template")
    service["spec"]["ports"][0]["port"] = "agents"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(service, VERSIONS[-1], strict=True)
