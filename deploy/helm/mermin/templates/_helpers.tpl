{{/* The chart's only helper file: names, labels and the few values derived from others. */}}

{{- define "mermin.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-<chart>, or <release> when it already contains the chart name. */}}
{{- define "mermin.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; pass a dict: root (the chart context) and component. */}}
{{- define "mermin.labels" -}}
{{ include "mermin.selectorLabels" . }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: mermin
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "mermin.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mermin.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "mermin.aggregator.name" -}}{{ include "mermin.fullname" . }}-aggregator{{- end -}}
{{/* The headless Service that gives each aggregator replica its stable DNS name. */}}
{{- define "mermin.aggregator.peersName" -}}{{ include "mermin.fullname" . }}-aggregator-peers{{- end -}}
{{- define "mermin.agent.name" -}}{{ include "mermin.fullname" . }}-agent{{- end -}}
{{- define "mermin.tempo.name" -}}{{ include "mermin.fullname" . }}-tempo{{- end -}}
{{- define "mermin.grafana.name" -}}{{ include "mermin.fullname" . }}-grafana{{- end -}}

{{/*
A component's ServiceAccount name: the given one, else the component's name when the chart
creates it. One the chart does not create must be named: the default name would not exist and
the pods would never start.
Called with (list component-key default-name account-values).
*/}}
{{- define "mermin.serviceAccountName" -}}
{{- $key := index . 0 -}}{{- $account := index . 2 -}}
{{- if and (not $account.create) (not $account.name) -}}
{{- fail (printf "%s.serviceAccount.name is required when %s.serviceAccount.create is false: name the ServiceAccount to use (it must exist)" $key $key) -}}
{{- end -}}
{{- default (index . 1) $account.name -}}
{{- end -}}

{{- define "mermin.aggregator.serviceAccountName" -}}
{{- include "mermin.serviceAccountName" (list "aggregator" (include "mermin.aggregator.name" .) .Values.aggregator.serviceAccount) -}}
{{- end -}}

{{- define "mermin.agent.serviceAccountName" -}}
{{- include "mermin.serviceAccountName" (list "agent" (include "mermin.agent.name" .) .Values.agent.serviceAccount) -}}
{{- end -}}

{{- define "mermin.tempo.serviceAccountName" -}}
{{- include "mermin.serviceAccountName" (list "tempo" (include "mermin.tempo.name" .) .Values.tempo.serviceAccount) -}}
{{- end -}}

{{- define "mermin.agent.priorityClassName" -}}
{{- default (include "mermin.agent.name" .) .Values.agent.priorityClass.name -}}
{{- end -}}

{{/* <repository>:<tag>, the tag defaulting to the chart's appVersion. */}}
{{- define "mermin.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* MERMIN_PEERS: every replica's stable address on the peer port, comma-separated. */}}
{{- define "mermin.aggregator.peers" -}}
{{- $name := include "mermin.aggregator.name" . -}}
{{- $service := include "mermin.aggregator.peersName" . -}}
{{- $peers := list -}}
{{- range $i := until (int .Values.aggregator.replicas) -}}
{{- $peers = append $peers (printf "%s-%d.%s.%s.svc:%d" $name $i $service $.Release.Namespace (int $.Values.aggregator.replication.peerPort)) -}}
{{- end -}}
{{- join "," $peers -}}
{{- end -}}

{{/* The OTLP endpoint spans are exported to. */}}
{{- define "mermin.otlpEndpoint" -}}
{{- $otlp := .Values.aggregator.config.export.otlp -}}
{{- if $otlp.endpoint -}}
{{- $otlp.endpoint -}}
{{- else if .Values.tempo.enabled -}}
{{- $port := ternary .Values.tempo.ports.otlpGrpc .Values.tempo.ports.otlpHttp (eq $otlp.protocol "grpc") -}}
{{- printf "http://%s.%s.svc:%d" (include "mermin.tempo.name" .) .Release.Namespace (int $port) -}}
{{- else -}}
{{- fail "aggregator.config.export.otlp.endpoint is required when tempo.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/* The URL Grafana queries Tempo at. */}}
{{- define "mermin.tempoQueryUrl" -}}
{{- if .Values.grafana.tempoUrl -}}
{{- .Values.grafana.tempoUrl -}}
{{- else if .Values.tempo.enabled -}}
{{- printf "http://%s.%s.svc:%d" (include "mermin.tempo.name" .) .Release.Namespace (int .Values.tempo.ports.http) -}}
{{- else -}}
{{- fail "grafana.tempoUrl is required when tempo.enabled is false and the Grafana data source is provisioned (or set grafana.provisioning.enabled=false)" -}}
{{- end -}}
{{- end -}}

{{/* A string as an HCL string literal (JSON's escaping is a subset HCL accepts). */}}
{{- define "mermin.hclString" -}}{{ toJson (toString . | replace "${" "$${" | replace "%{" "%%{") }}{{- end -}}

{{/* The TLS Secret of one kind (admin, agent, peer, agentClient): the value, or
<fullname>-<kind>-tls (agentClient: agent-client). */}}
{{- define "mermin.tls.secretName" -}}
{{- $given := get .root.Values.tls (printf "%sSecretName" .kind) -}}
{{- default (printf "%s-%s-tls" (include "mermin.fullname" .root) (kebabcase .kind)) $given -}}
{{- end -}}
