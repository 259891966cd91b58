{{/* Names, labels and the small pieces every template shares. */}}

{{- define "veil-core.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "veil-core.fullname" -}}
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

{{- define "veil-core.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "veil-core.labels" -}}
helm.sh/chart: {{ include "veil-core.chart" . }}
{{ include "veil-core.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: veil
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "veil-core.selectorLabels" -}}
app.kubernetes.io/name: {{ include "veil-core.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: core
{{- end }}

{{- define "veil-core.locker.fullname" -}}
{{- printf "%s-locker" (include "veil-core.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "veil-core.locker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "veil-core.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: locker
{{- end }}

{{- define "veil-core.locker.labels" -}}
helm.sh/chart: {{ include "veil-core.chart" . }}
{{ include "veil-core.locker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.locker.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: veil
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "veil-core.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "veil-core.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The core image: digest wins over tag; the tag defaults to <appVersion>-vllm (core.engine vllm), else -cuda|cpu. */}}
{{- define "veil-core.image" -}}
{{- $image := .Values.image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- $variant := ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- if include "veil-core.vllm.active" . }}{{ $variant = "vllm" }}{{ end }}
{{- $tag := $image.tag | default (printf "%s-%s" .Chart.AppVersion $variant) }}
{{- printf "%s:%s" $image.repository $tag }}
{{- end }}
{{- end }}

{{/* Whether the core runs the vllm engine (its image, /dev/shm and export volume). */}}
{{- define "veil-core.vllm.active" -}}
{{- if eq .Values.core.engine "vllm" }}true{{ end }}
{{- end }}

{{/* The startup probe's failureThreshold: vLLM starts slower, so with it at least vllm.startupFailureThreshold. */}}
{{- define "veil-core.startup.failureThreshold" -}}
{{- $threshold := int64 .Values.probes.startup.failureThreshold }}
{{- if include "veil-core.vllm.active" . }}
{{- $threshold = max $threshold (int64 .Values.vllm.startupFailureThreshold) }}
{{- end }}
{{- $threshold }}
{{- end }}

{{- define "veil-core.identity.secretName" -}}
{{- .Values.identity.existingSecret | default (printf "%s-identity" (include "veil-core.fullname" .)) }}
{{- end }}

{{/* The old key during a rotation: on only when identity.previous names one. */}}
{{- define "veil-core.identity.previous.active" -}}
{{- if or .Values.identity.previous.existingSecret .Values.identity.previous.privateKey }}true{{ end }}
{{- end }}

{{- define "veil-core.identity.previous.secretName" -}}
{{- .Values.identity.previous.existingSecret | default (printf "%s-previous-identity" (include "veil-core.fullname" .)) }}
{{- end }}

{{/*
What makes the core re-read its keys and its edges: both are read at start-up only,
so a change rolls the pods. Values only (never a generated key, which differs in
every `helm template`); the private keys enter as their SHA-256.
*/}}
{{- define "veil-core.identity.checksum" -}}
{{- $i := .Values.identity }}
{{- $p := $i.previous }}
{{- list $i.existingSecret $i.secretKey (sha256sum $i.privateKey) $p.existingSecret $p.secretKey (sha256sum $p.privateKey) | toJson | sha256sum }}
{{- end }}

{{/* Enrolled edges: the chart's Secret, or the user's. */}}
{{- define "veil-core.enrollment.secretName" -}}
{{- .Values.enrollment.existingSecret | default (printf "%s-enrollment" (include "veil-core.fullname" .)) }}
{{- end }}

{{/* enrollment.allowedEdges as the core's allowed-edges file (core_server/enrollment.py). */}}
{{- define "veil-core.enrollment.file" -}}
{{- $edges := list }}
{{- range .Values.enrollment.allowedEdges }}
{{- $edge := dict "name" .name "public_key" (trim .publicKey) }}
{{- if not (kindIs "invalid" .maxSessions) }}
{{- $_ := set $edge "max_sessions" (int64 .maxSessions) }}
{{- end }}
{{- $edges = append $edges $edge }}
{{- end }}
{{- dict "edges" $edges | toYaml }}
{{- end }}

{{/* Whether the ServiceMonitor (and the metrics Service it scrapes) is rendered. */}}
{{- define "veil-core.serviceMonitor.active" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1") }}true{{ end }}
{{- end }}

{{- define "veil-core.bundle.claimName" -}}
{{- .Values.bundle.pvc.claimName | default (printf "%s-bundle" (include "veil-core.fullname" .)) }}
{{- end }}

{{/* Directory VEIL_CORE_BUNDLE points at. */}}
{{- define "veil-core.bundle.path" -}}
{{- .Values.bundle.mountPath }}
{{- end }}

{{/* Locker: on (in-chart or external), its URL, and the Secret with its password. */}}
{{- define "veil-core.locker.active" -}}
{{- if or .Values.locker.enabled .Values.locker.external.url }}true{{ end }}
{{- end }}

{{- define "veil-core.locker.url" -}}
{{- if .Values.locker.enabled }}
{{- printf "redis://%s.%s.svc:%d/0" (include "veil-core.locker.fullname" .) .Release.Namespace (int .Values.locker.port) }}
{{- else }}
{{- .Values.locker.external.url }}
{{- end }}
{{- end }}

{{- define "veil-core.locker.secretName" -}}
{{- if .Values.locker.enabled }}
{{- .Values.locker.existingSecret | default (include "veil-core.locker.fullname" .) }}
{{- else }}
{{- .Values.locker.external.existingSecret }}
{{- end }}
{{- end }}

{{- define "veil-core.locker.secretKey" -}}
{{- if .Values.locker.enabled }}{{ .Values.locker.secretKey }}{{ else }}{{ .Values.locker.external.secretKey }}{{ end }}
{{- end }}

{{/*
A fresh X25519 private key as PEM (PKCS#8), from crypto/rand bytes.
The DER is a fixed 16-byte prefix plus the 32-byte key; its base64 is the fixed
21 characters below, one character carrying 4 key bits (A-P), then 42
characters carrying the other 252 bits. randBytes 33 yields 44 characters of
crypto/rand bytes: its 2nd character supplies the 4 bits (mod 16) and the last
42 are used as they stand.
*/}}
{{- define "veil-core.identity.generatePem" -}}
{{- $alphabet := "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/" }}
{{- $random := randBytes 33 }}
{{- $second := substr 1 2 $random }}
{{- $index := 0 }}
{{- range $i, $c := splitList "" $alphabet }}
{{- if eq $c $second }}{{ $index = int (mod $i 16) }}{{ end }}
{{- end }}
{{- $body := printf "MC4CAQAwBQYDK2VuBCIEI%s%s" (substr $index (int (add1 $index)) $alphabet) (substr 2 44 $random) }}
{{- printf "-----BEGIN PRIVATE KEY-----\n%s\n-----END PRIVATE KEY-----\n" $body }}
{{- end }}

{{/* Shared restricted security context for init containers. */}}
{{- define "veil-core.initSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser | default 10001 }}
runAsGroup: {{ .Values.securityContext.runAsGroup | default 10001 }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}
