"""The chart as Helm sees it: lint, schema, and the rendered objects' exact settings."""

from __future__ import annotations

import json

import helm_python as helm
import pytest
import yaml

from conftest import CASES, CHART, NAMESPACE, RBAC_FILE, Rendered, container, env, render_raw

AGGREGATOR_SVC = f"mermin-aggregator.{NAMESPACE}.svc"
WORKING_TRACEQL = [
    '{ span.source.pod.name =~ "nginx-.*" }',
    "{ span.flow.bytes.sent > 1000000 }",
    '{ span.network.protocol = "TCP" && span.destination.port = 443 }',
    '{ span.source.namespace = "frontend" && span.destination.namespace = "backend" }',
]


@pytest.mark.parametrize("case", sorted(CASES))
def test_lint_strict_has_no_errors_or_warnings(case):
    report = helm.lint(CHART, CASES[case], strict=True, namespace=NAMESPACE)
    assert report["errors"] == []
    # Severity 1 is info ("icon is recommended"); 2 warning, 3 error.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize(
    "values, where",
    [
        ({"aggregator": {"replica": 3}}, "additional properties 'replica'"),
        ({"aggregator": {"replicas": "3"}}, "/aggregator/replicas"),
        ({"aggregator": {"replicas": 2}}, "/aggregator/replicas"),
        ({"aggregator": {"config": {"metadata": {"attributeNames": "elastiflow"}}}}, "attributeNames"),
        ({"aggregator": {"config": {"settle": "3 seconds"}}}, "settle"),
        ({"tempo": {"storage": {"backend": "minio"}}}, "backend"),
        ({"agent": {"capabilities": ["SYS_ADMIN"]}}, "additional properties 'capabilities'"),
        ({"aggregator": {"config": {"export": {"otlp": {"headers": {"X-Tenant": 7}}}}}}, "headers"),
        ({"aggregator": {"config": {"export": {"otlp": {"tls": {"caFile": "/ca.pem"}}}}}}, "additional properties 'caFile'"),
    ],
)
def test_schema_rejects_unknown_keys_and_bad_values(values, where):
    with pytest.raises(helm.HelmError) as err:
        render_raw(values)
    assert where in str(err.value)


def test_defaults_render_exactly_these_objects(rendered):
    assert rendered["defaults"].names() == {
        ("ConfigMap", "mermin-aggregator"),
        ("StatefulSet", "mermin-aggregator"),
        ("Service", "mermin-aggregator"),
        ("Service", "mermin-aggregator-peers"),
        ("PodDisruptionBudget", "mermin-aggregator"),
        ("ServiceAccount", "mermin-aggregator"),
        ("ClusterRole", "mermin-aggregator"),
        ("ClusterRoleBinding", "mermin-aggregator"),
        ("DaemonSet", "mermin-agent"),
        ("ServiceAccount", "mermin-agent"),
        ("PriorityClass", "mermin-agent"),
        ("ConfigMap", "mermin-tempo"),
        ("StatefulSet", "mermin-tempo"),
        ("ServiceAccount", "mermin-tempo"),
        ("Service", "mermin-tempo"),
        ("ConfigMap", "mermin-grafana-datasource"),
        ("ConfigMap", "mermin-grafana-dashboard"),
    }


def test_aggregator_statefulset(rendered):
    sts = rendered["defaults"].get("StatefulSet", "mermin-aggregator")
    spec = sts["spec"]
    pod = spec["template"]["spec"]
    c = container(sts, "aggregator")
    assert spec["replicas"] == 1
    assert spec["serviceName"] == "mermin-aggregator-peers"
    assert c["args"] == ["--config=/etc/mermin/config/mermin.hcl", "--metrics-listen=0.0.0.0:9465"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"agents": 4600, "metrics": 9465, "peer": 4610, "admin": 4620}
    # The admin API listens on that port, on the pod's address (a standby forwards it there).
    assert 'admin {\n  # On the pod\'s address: a standby forwards the admin port to the leader\'s.\n  listen = "0.0.0.0:4620"\n}' in rendered["defaults"].hcl()
    for probe, path in [("livenessProbe", "/livez"), ("readinessProbe", "/readyz"), ("startupProbe", "/livez")]:
        assert c[probe]["httpGet"] == {"path": path, "port": "metrics"}
    assert pod["terminationGracePeriodSeconds"] == 120
    assert pod["serviceAccountName"] == "mermin-aggregator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert {m["mountPath"]: m["name"] for m in c["volumeMounts"]} == {
        "/etc/mermin/config": "config",
        "/var/lib/mermin": "data",
    }
    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10737418240"
    preferred = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert preferred[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert preferred[0]["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]


def test_aggregator_services_and_pdb(rendered):
    r = rendered["defaults"]
    agents = r.get("Service", "mermin-aggregator")
    peers = r.get("Service", "mermin-aggregator-peers")
    selector = r.get("StatefulSet", "mermin-aggregator")["spec"]["selector"]["matchLabels"]
    assert agents["spec"]["selector"] == selector
    assert {p["name"]: p["port"] for p in agents["spec"]["ports"]} == {"agents": 4600, "metrics": 9465}
    assert peers["spec"]["clusterIP"] == "None"
    assert peers["spec"]["publishNotReadyAddresses"] is True
    assert peers["spec"]["selector"] == selector
    assert {p["name"]: p["port"] for p in peers["spec"]["ports"]} == {"peer": 4610, "admin": 4620}
    pdb = r.get("PodDisruptionBudget", "mermin-aggregator")
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": {"matchLabels": selector}}


def test_three_replicas_form_a_cluster_named_by_their_headless_dns_names(rendered):
    sts = rendered["three-replicas"].get("StatefulSet", "mermin-aggregator")
    assert sts["spec"]["replicas"] == 3
    variables = env(container(sts, "aggregator"))
    assert variables["MERMIN_REPLICA_ORDINAL"] == "$(POD_NAME)"
    assert variables["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert variables["MERMIN_REPLICATION_ADVERTISE"] == f"$(POD_NAME).mermin-aggregator-peers.{NAMESPACE}.svc:4610"
    assert variables["MERMIN_REPLICATION_PEERS"] == ",".join(
        f"mermin-aggregator-{i}.mermin-aggregator-peers.{NAMESPACE}.svc:4610" for i in range(3)
    )


def test_one_replica_runs_alone(rendered):
    sts = rendered["defaults"].get("StatefulSet", "mermin-aggregator")
    assert sts["spec"]["replicas"] == 1
    variables = env(container(sts, "aggregator"))
    assert not {"MERMIN_REPLICA_ORDINAL", "MERMIN_REPLICATION_ADVERTISE", "MERMIN_REPLICATION_PEERS"} & set(variables)


def test_three_replicas_required_anti_affinity_and_notes_warning(rendered):
    r = rendered["three-replicas"]
    affinity = r.get("StatefulSet", "mermin-aggregator")["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert list(affinity) == ["requiredDuringSchedulingIgnoredDuringExecution"]
    assert affinity["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == "kubernetes.io/hostname"
    assert "Replicated: aggregator.replicas=3 replicas form one Raft cluster (it survives 1 lost)." in r.notes
    assert "Replicated" not in rendered["defaults"].notes
    assert "Replica-to-replica traffic is plaintext (tls.enabled turns on mutual TLS)" in r.notes
    secured = Rendered({"aggregator": {"replicas": 3}, "tls": {"enabled": True, "peerSecretName": "peer"}})
    assert "Replicas speak mutual TLS to each other (the peer certificate)." in secured.notes


def test_agent_daemonset_capabilities_and_host_access(rendered):
    r = rendered["defaults"]
    ds = r.get("DaemonSet", "mermin-agent")
    pod = ds["spec"]["template"]["spec"]
    c = container(ds, "agent")
    security = c["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "NET_ADMIN", "PERFMON"]}
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["runAsUser"] == 0
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["automountServiceAccountToken"] is False
    priority = r.get("PriorityClass", "mermin-agent")
    assert pod["priorityClassName"] == priority["metadata"]["name"]
    assert priority["value"] == 1000000
    assert env(c)["MERMIN_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert c["args"][0] == f"--aggregator=http://{AGGREGATOR_SVC}:4600"
    assert "--metrics-listen=0.0.0.0:9464" in c["args"]
    assert not any(a.startswith("--interfaces") for a in c["args"])
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9464}
    # Nothing from the host's filesystem: it pins nothing in bpffs.
    assert "volumeMounts" not in c
    assert "volumes" not in pod
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}


def test_agent_options_reach_its_arguments():
    r = Rendered({"agent": {"interfaces": ["eth*", "veth*"], "timeouts": {"tcpIdle": "45s"}, "kernelTableEntries": 131072}})
    args = container(r.get("DaemonSet", "mermin-agent"), "agent")["args"]
    assert "--interfaces=eth*,veth*" in args
    assert "--tcp-idle-timeout=45s" in args
    assert "--kernel-table-entries=131072" in args


def test_cluster_role_grants_exactly_the_rbac_file(rendered):
    expected = yaml.safe_load(RBAC_FILE.read_text())["rules"]
    for case in CASES:
        assert rendered[case].get("ClusterRole", "mermin-aggregator")["rules"] == expected
    binding = rendered["defaults"].get("ClusterRoleBinding", "mermin-aggregator")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "mermin-aggregator"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mermin-aggregator", "namespace": NAMESPACE}]


def test_rbac_create_false_leaves_role_and_binding_out():
    names = Rendered({"aggregator": {"rbac": {"create": False}}}).names()
    assert ("ClusterRole", "mermin-aggregator") not in names
    assert ("ClusterRoleBinding", "mermin-aggregator") not in names


def test_tls_mounts_secrets_and_requests_certificates(rendered):
    r = rendered["tls"]
    sts = r.get("StatefulSet", "mermin-aggregator")
    mounts = {m["name"]: m["mountPath"] for m in container(sts, "aggregator")["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in sts["spec"]["template"]["spec"]["volumes"] if "secret" in v}
    for kind in ["admin", "agent", "peer"]:
        assert mounts[f"tls-{kind}"] == f"/etc/mermin/tls/{kind}"
        assert secrets[f"tls-{kind}"] == f"mermin-{kind}-tls"
        cert = r.get("Certificate", f"mermin-{kind}")
        assert cert["spec"]["secretName"] == f"mermin-{kind}-tls"
        assert cert["spec"]["issuerRef"] == {"name": "mermin-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}
    assert r.get("Certificate", "mermin-peer")["spec"]["dnsNames"] == [f"*.mermin-aggregator-peers.{NAMESPACE}.svc"]
    assert r.get("Certificate", "mermin-agent")["spec"]["dnsNames"] == [AGGREGATOR_SVC]
    # The agents present a client certificate of their own, never the aggregator's key.
    client = r.get("Certificate", "mermin-agent-client")
    assert client["spec"]["secretName"] == "mermin-agent-client-tls"
    assert client["spec"]["dnsNames"] == ["mermin-agent"]
    assert client["spec"]["usages"] == ["digital signature", "key encipherment", "client auth"]
    daemonset = r.get("DaemonSet", "mermin-agent")
    assert daemonset["spec"]["template"]["spec"]["volumes"] == [{"name": "tls-agent", "secret": {"secretName": "mermin-agent-client-tls"}}]
    agent = container(daemonset, "agent")
    assert {"name": "tls-agent", "mountPath": "/etc/mermin/tls/agent", "readOnly": True} in agent["volumeMounts"]
    assert agent["args"][:4] == [
        f"--aggregator=https://{AGGREGATOR_SVC}:4600",
        "--aggregator-ca=/etc/mermin/tls/agent/ca.crt",
        "--aggregator-cert=/etc/mermin/tls/agent/tls.crt",
        "--aggregator-key=/etc/mermin/tls/agent/tls.key",
    ]
    # The aggregator serves the agent Secret's certificate on the agent endpoint and the admin
    # API (checked by the aggregator's own loader in test_aggregator_config.py).
    assert 'cert_file      = "/etc/mermin/tls/agent/tls.crt"' in r.hcl()
    assert 'mode = "disabled"' in rendered["defaults"].hcl()
    assert r.hcl().split("\nreplication {")[0] == rendered["defaults"].hcl().split("\nreplication {")[0]
    # The replicas speak mutual TLS with the peer Secret's certificate.
    assert 'ca_file   = "/etc/mermin/tls/peer/ca.crt"' in r.hcl()
    assert "/etc/mermin/tls/peer" not in rendered["defaults"].hcl()
    assert not rendered["defaults"].all("Certificate")


def test_operators_can_have_a_client_ca_of_their_own_for_the_admin_api():
    r = Rendered({"tls": {"enabled": True, "adminClientCaSecretName": "operators-ca"}})
    sts = r.get("StatefulSet", "mermin-aggregator")
    assert {"name": "tls-admin-clients", "secret": {"secretName": "operators-ca"}} in sts["spec"]["template"]["spec"]["volumes"]
    mounts = container(sts, "aggregator")["volumeMounts"]
    assert {"name": "tls-admin-clients", "mountPath": "/etc/mermin/tls/admin-clients", "readOnly": True} in mounts
    assert 'admin_client_ca_file = "/etc/mermin/tls/admin-clients/ca.crt"' in r.hcl()
    assert "admin_client_ca_file" not in Rendered({"tls": {"enabled": True}}).hcl()
    with pytest.raises(helm.HelmError) as err:
        render_raw({"tls": {"adminClientCaSecretName": "operators-ca"}})
    assert "tls.adminClientCaSecretName is set but tls.enabled is false" in str(err.value)
    # The issuer's own CA would let every agent in again.
    with pytest.raises(helm.HelmError) as err:
        render_raw({"tls": {"enabled": True, "adminClientCaSecretName": "mermin-admin-tls"}})
    assert "tls.adminClientCaSecretName is the chart's own admin TLS Secret" in str(err.value)


@pytest.mark.parametrize(
    "component, kind, name",
    [
        ("aggregator", "StatefulSet", "mermin-aggregator"),
        ("agent", "DaemonSet", "mermin-agent"),
        ("tempo", "StatefulSet", "mermin-tempo"),
    ],
)
def test_a_service_account_the_chart_does_not_create_must_be_named(component, kind, name):
    with pytest.raises(helm.HelmError) as err:
        render_raw({component: {"serviceAccount": {"create": False}}})
    assert (
        f"{component}.serviceAccount.name is required when {component}.serviceAccount.create is false"
        in str(err.value)
    )
    r = Rendered({component: {"serviceAccount": {"create": False, "name": "given"}}})
    assert ("ServiceAccount", name) not in r.names()
    assert r.get(kind, name)["spec"]["template"]["spec"]["serviceAccountName"] == "given"


def test_tls_without_cert_manager_uses_given_secrets():
    r = Rendered({"tls": {"enabled": True, "peerSecretName": "my-peer-cert"}})
    assert not r.all("Certificate")
    volumes = r.get("StatefulSet", "mermin-aggregator")["spec"]["template"]["spec"]["volumes"]
    assert {"name": "tls-peer", "secret": {"secretName": "my-peer-cert"}} in volumes


def test_otlp_endpoint_defaults_to_the_charts_tempo_and_is_required_without_it(rendered):
    hcl = rendered["defaults"].hcl()
    assert 'endpoint = "http://mermin-tempo.observability.svc:4317"\n    protocol = "grpc"\n' in hcl
    assert "headers" not in hcl and "/etc/mermin/tls/otlp" not in hcl
    http = Rendered({"aggregator": {"config": {"export": {"otlp": {"protocol": "http/protobuf"}}}}})
    assert 'endpoint = "http://mermin-tempo.observability.svc:4318"\n    protocol = "http/protobuf"\n' in http.hcl()
    own_tempo = {"tempo": {"enabled": False}, "grafana": {"tempoUrl": "http://tempo.obs.svc:3200"}}
    with pytest.raises(helm.HelmError) as err:
        render_raw(own_tempo)
    assert "aggregator.config.export.otlp.endpoint is required" in str(err.value)
    # Grafana's data source needs to know where that Tempo answers queries.
    with pytest.raises(helm.HelmError) as err:
        render_raw({"tempo": {"enabled": False}, "aggregator": {"config": {"export": {"otlp": {"endpoint": "http://collector:4317"}}}}})
    assert "grafana.tempoUrl is required when tempo.enabled is false" in str(err.value)
    own = Rendered({**own_tempo, "aggregator": {"config": {"export": {"otlp": {"endpoint": "http://collector:4317"}}}}})
    assert 'endpoint = "http://collector:4317"' in own.hcl()
    assert ("StatefulSet", "mermin-tempo") not in own.names()
    assert "http://tempo.obs.svc:3200" in json.dumps(own.all("ConfigMap"))


def test_export_tls_and_headers_keep_secrets_out_of_the_configmap(rendered):
    r = Rendered({"aggregator": {"config": {"export": {"otlp": {
        "endpoint": "https://otlp.example.com:443",
        "headers": {"X-Scope-OrgID": "tenant-a", "X-Team": "net"},
        "headersSecret": "otlp-auth",
        "tls": {"secretName": "otlp-ca", "clientCertificate": True},
    }}}}})
    assert 'headers  = { "X-Scope-OrgID" = "tenant-a", "X-Team" = "net" }' in r.hcl()
    assert 'ca_file   = "/etc/mermin/tls/otlp/ca.crt"' in r.hcl()
    sts = r.get("StatefulSet", "mermin-aggregator")
    c = container(sts, "aggregator")
    assert {"name": "tls-otlp", "mountPath": "/etc/mermin/tls/otlp", "readOnly": True} in c["volumeMounts"]
    assert {"name": "tls-otlp", "secret": {"secretName": "otlp-ca"}} in sts["spec"]["template"]["spec"]["volumes"]
    assert env(c)["MERMIN_OTLP_HEADERS"] == {"secretKeyRef": {"name": "otlp-auth", "key": "headers"}}
    # A client certificate with the system's CA certificates; a value HCL would read as a template.
    system = Rendered({"aggregator": {"config": {"export": {"otlp": {
        "endpoint": "https://otlp.example.com:443",
        "headers": {"X-Note": "${not} %{a template}"},
        "tls": {"secretName": "otlp-client", "caCertificate": False, "clientCertificate": True},
    }}}}})
    assert "ca_file" not in system.hcl().split("replication {")[0]
    assert 'cert_file = "/etc/mermin/tls/otlp/tls.crt"' in system.hcl()
    assert '"X-Note" = "$${not} %%{a template}"' in system.hcl()
    with pytest.raises(helm.HelmError) as err:
        render_raw({"aggregator": {"config": {"export": {"otlp": {"tls": {"secretName": "otlp-ca"}}}}}})
    assert "tls.secretName is set but the endpoint is not https://" in str(err.value)
    default = container(rendered["defaults"].get("StatefulSet", "mermin-aggregator"), "aggregator")
    assert "MERMIN_OTLP_HEADERS" not in env(default)
    assert all(m["name"] != "tls-otlp" for m in default["volumeMounts"])


def test_notes_print_the_working_first_query(rendered):
    assert '{ span.source.namespace = "frontend" && span.destination.namespace = "backend" }' in rendered["defaults"].notes
    assert (
        '{ span.source.k8s.namespace.name = "frontend" && span.destination.k8s.namespace.name = "backend" }'
        in rendered["mermin-names"].notes
    )


def test_grafana_provisioning_configmaps(rendered):
    r = rendered["defaults"]
    datasource_cm = r.get("ConfigMap", "mermin-grafana-datasource")
    assert datasource_cm["metadata"]["labels"]["grafana_datasource"] == "1"
    (datasource,) = yaml.safe_load(datasource_cm["data"]["mermin-tempo.yaml"])["datasources"]
    assert datasource["type"] == "tempo"
    assert datasource["uid"] == "mermin-tempo"
    assert datasource["url"] == f"http://mermin-tempo.{NAMESPACE}.svc:3200"
    dashboard_cm = r.get("ConfigMap", "mermin-grafana-dashboard")
    assert dashboard_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = r.dashboard()
    queries = [t.get("query") for p in dashboard["panels"] for t in p["targets"]]
    for query in WORKING_TRACEQL:
        assert query in queries
    assert [p["type"] for p in dashboard["panels"]].count("nodeGraph") == 1
    titles = [p["title"] for p in dashboard["panels"]]
    assert "Top talkers: bytes sent by client workload" in titles
    assert "Bytes by namespace pair (client → server)" in titles
    assert all(t["datasource"]["uid"] == "mermin-tempo" for p in dashboard["panels"] for t in p["targets"])


def test_dashboard_follows_the_attribute_names(rendered):
    queries = [t.get("query") for p in rendered["mermin-names"].dashboard()["panels"] for t in p["targets"]]
    assert '{ span.source.k8s.namespace.name = "frontend" && span.destination.k8s.namespace.name = "backend" }' in queries
    assert '{ span.source.k8s.pod.name =~ "nginx-.*" }' in queries
    assert not any("@" in (q or "") for q in queries)


def test_optional_grafana_and_service_monitors(rendered):
    r = rendered["everything-optional"]
    grafana = r.get("Deployment", "mermin-grafana")
    mounts = {m["mountPath"] for m in container(grafana, "grafana")["volumeMounts"]}
    assert mounts == {"/etc/grafana/provisioning/datasources", "/etc/grafana/provisioning/dashboards", "/var/lib/grafana/dashboards/mermin"}
    (datasource,) = yaml.safe_load(r.get("ConfigMap", "mermin-grafana-datasource")["data"]["mermin-tempo.yaml"])["datasources"]
    assert datasource["jsonData"]["serviceMap"] == {"datasourceUid": "prom"}
    for component in ["aggregator", "agent"]:
        monitor = r.get("ServiceMonitor", f"mermin-{component}")
        assert monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
        assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
    assert r.get("Service", "mermin-agent-metrics")["spec"]["clusterIP"] == "None"


def test_every_value_is_typed_in_the_schema():
    """Each key of values.yaml has a typed entry, and each schema object says what else it takes."""
    schema = __import__("json").loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value, node, path):
        assert "type" in node or "oneOf" in node, f"{path}: untyped"
        if node.get("type") == "object":
            assert "additionalProperties" in node, f"{path}: additionalProperties not set"
            if "properties" in node:
                assert node["additionalProperties"] is False, f"{path}: open object with properties"
        if isinstance(value, dict) and "properties" in node:
            assert set(value) <= set(node["properties"]), path
            assert set(node.get("required", [])) <= set(value), path
            for key, item in value.items():
                walk(item, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "values")
