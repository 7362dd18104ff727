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

{{/* Destinations pods must reach directly, never through the gateway. */}}
{{- define "egress-gateway.noProxy" -}}
{{- $entries := list "localhost" "127.0.0.1" "::1" ".svc" (printf ".%s" .Values.cluster.domain) "kubernetes.default" "kubernetes.default.svc" }}
{{- $entries = concat $entries .Values.cluster.podCIDRs .Values.cluster.serviceCIDRs .Values.cluster.apiServerAddresses }}
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
