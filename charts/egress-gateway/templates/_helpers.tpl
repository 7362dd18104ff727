{{/* Names, labels and small computed values shared by the templates. */}}

{{- define "egress-gateway.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "egress-gateway.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "egress-gateway.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "egress-gateway.selectorLabels" -}}
app.kubernetes.io/name: {{ include "egress-gateway.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "egress-gateway.labels" -}}
helm.sh/chart: {{ include "egress-gateway.chart" . }}
{{ include "egress-gateway.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: egress-gateway
{{- end }}

{{- define "egress-gateway.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "egress-gateway.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "egress-gateway.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "egress-gateway.leaseName" -}}
{{- default (printf "%s-status" (include "egress-gateway.fullname" .)) .Values.config.kubernetes.leaseName }}
{{- end }}

{{/* "0.0.0.0" + 3128 -> "0.0.0.0:3128"; "::" + 3128 -> "[::]:3128" */}}
{{- define "egress-gateway.hostPort" -}}
{{- $host := index . 0 }}
{{- $port := index . 1 }}
{{- if contains ":" $host }}
{{- printf "[%s]:%v" $host $port }}
{{- else }}
{{- printf "%s:%v" $host $port }}
{{- end }}
{{- end }}

{{- define "egress-gateway.proxyHost" -}}
{{- printf "%s.%s.svc.%s" (include "egress-gateway.fullname" .) .Release.Namespace .Values.cluster.domain }}
{{- end }}

{{- define "egress-gateway.proxyURL" -}}
{{- printf "http://%s:%v" (include "egress-gateway.proxyHost" .) .Values.service.port }}
{{- end }}

{{/* "true" when enforcement is on (per-namespace NetworkPolicies or the cluster-scoped policy). */}}
{{- define "egress-gateway.enforcementOn" -}}
{{- if or .Values.enforcement.namespaces (not (kindIs "invalid" .Values.enforcement.namespaceSelector)) }}true{{ end }}
{{- end }}

{{/*
Destinations pods reach directly, never through the gateway. Must agree with enforcement: when it is on and
allowClusterPods is false, direct traffic to pods and Services is dropped, so only loopback and the API server
(reachable when enforcement.extraEgress allows it) stay direct.
*/}}
{{- define "egress-gateway.noProxy" -}}
{{- $entries := list "localhost" "127.0.0.1" "::1" "kubernetes.default" "kubernetes.default.svc" }}
{{- if or (not (include "egress-gateway.enforcementOn" .)) .Values.enforcement.allowClusterPods }}
{{- $entries = concat $entries (list ".svc" (printf ".%s" .Values.cluster.domain)) .Values.cluster.podCIDRs .Values.cluster.serviceCIDRs }}
{{- end }}
{{- $entries = concat $entries .Values.cluster.apiServerAddresses }}
{{- join "," (uniq $entries) }}
{{- end }}

{{- define "egress-gateway.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (int .Values.preStopSleepSeconds) (int (ceil .Values.config.shutdownGraceSeconds)) 5 }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The egress rules that let an enforced pod reach DNS and the gateway, shared by NetworkPolicy and ANP. */}}
{{- define "egress-gateway.gatewayPeer" -}}
namespaceSelector:
  matchLabels:
    kubernetes.io/metadata.name: {{ .Release.Namespace }}
podSelector:
  matchLabels:
    {{- include "egress-gateway.selectorLabels" . | nindent 4 }}
{{- end }}

{{/*
One enforcement.extraEgress rule's `to` (NetworkPolicyEgressPeer list) as cluster-scoped policy peers, which take one
selector each. Args: (list index peers). What a cluster-scoped policy cannot say fails the render with the reason.
*/}}
{{- define "egress-gateway.clusterPeers" -}}
{{- $index := index . 0 }}
{{- $peers := index . 1 }}
{{- if not $peers }}
- namespaces: {}
- networks:
    - 0.0.0.0/0
    - ::/0
{{- end }}
{{- range $peer := $peers }}
{{- if hasKey $peer "ipBlock" }}
{{- if $peer.ipBlock.except }}
{{- fail (printf "enforcement.extraEgress[%d]: ipBlock.except cannot be expressed in the cluster-scoped policy (enforcement.namespaceSelector); list the allowed CIDRs instead" $index) }}
{{- end }}
- networks:
    - {{ $peer.ipBlock.cidr }}
{{- else if and (hasKey $peer "namespaceSelector") (hasKey $peer "podSelector") }}
- pods:
    namespaceSelector:
      {{- toYaml $peer.namespaceSelector | nindent 6 }}
    podSelector:
      {{- toYaml $peer.podSelector | nindent 6 }}
{{- else if hasKey $peer "namespaceSelector" }}
- namespaces:
    {{- toYaml $peer.namespaceSelector | nindent 4 }}
{{- else }}
{{- fail (printf "enforcement.extraEgress[%d]: a podSelector without a namespaceSelector means the pod's own namespace, which a cluster-scoped policy (enforcement.namespaceSelector) cannot say; add a namespaceSelector" $index) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
NetworkPolicyPort entries ({protocol, port, endPort}) as a cluster-scoped policy's ports: `protocols` for
ClusterNetworkPolicy v1alpha2, `ports` for AdminNetworkPolicy v1alpha1. Args: (list isClusterNetworkPolicy ports).
*/}}
{{- define "egress-gateway.clusterPorts" -}}
{{- $cnp := index . 0 }}
{{- $ports := index . 1 }}
{{- if $cnp }}
protocols:
{{- range $p := $ports }}
{{- $protocol := lower (default "TCP" $p.protocol) }}
{{- if kindIs "string" $p.port }}
  - destinationNamedPort: {{ $p.port }}
{{- else if $p.endPort }}
  - {{ $protocol }}:
      destinationPort:
        range:
          start: {{ $p.port | int64 }}
          end: {{ $p.endPort | int64 }}
{{- else if $p.port }}
  - {{ $protocol }}:
      destinationPort:
        number: {{ $p.port | int64 }}
{{- else }}
  - {{ $protocol }}:
      destinationPort:
        range:
          start: 1
          end: 65535
{{- end }}
{{- end }}
{{- else }}
ports:
{{- range $p := $ports }}
{{- $protocol := default "TCP" $p.protocol }}
{{- if kindIs "string" $p.port }}
{{- fail (printf "enforcement.extraEgress: named port %q: AdminNetworkPolicy v1alpha1 has no named ports; use a number" $p.port) }}
{{- else if $p.endPort }}
  - portRange:
      protocol: {{ $protocol }}
      start: {{ $p.port | int64 }}
      end: {{ $p.endPort | int64 }}
{{- else if $p.port }}
  - portNumber:
      protocol: {{ $protocol }}
      port: {{ $p.port | int64 }}
{{- else }}
  - portRange:
      protocol: {{ $protocol }}
      start: 1
      end: 65535
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* "true" when the gateway reads client pods and namespaces (pod-ip or service-account-token identity). */}}
{{- define "egress-gateway.watchesWorkloads" -}}
{{- $modes := .Values.config.identity.mode }}
{{- if or (has "pod-ip" $modes) (has "service-account-token" $modes) }}true{{ end }}
{{- end }}

{{/* "true" when the gateway calls the API server at all; otherwise it needs no RBAC and no mounted token. */}}
{{- define "egress-gateway.usesKubernetesAPI" -}}
{{- if or (eq .Values.config.policySource "kubernetes") (include "egress-gateway.watchesWorkloads" .) }}true{{ end }}
{{- end }}
