{{/* Names and labels. */}}
{{- define "llada-serve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llada-serve.fullname" -}}
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

{{- define "llada-serve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "llada-serve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llada-serve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llada-serve.labels" -}}
helm.sh/chart: {{ include "llada-serve.chart" . }}
{{ include "llada-serve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llada-serve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llada-serve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The server's fixed port; probes, Service and args all use it. */}}
{{- define "llada-serve.port" -}}8000{{- end }}

{{/* Where a pvc model is mounted, and where hub downloads go (HF_HOME). */}}
{{- define "llada-serve.modelMount" -}}/models{{- end }}
{{- define "llada-serve.hfHome" -}}/var/cache/huggingface{{- end }}
{{/* The image's user home (deploy/docker): an emptyDir under a read-only root. */}}
{{- define "llada-serve.home" -}}/home/llada{{- end }}

{{/* The --model argument, empty for the bundled demo model. */}}
{{- define "llada-serve.model" -}}
{{- $m := .Values.model }}
{{- if eq $m.source "hub" }}
{{- required "model.hub.id is required when model.source is hub" $m.hub.id }}
{{- else if eq $m.source "pvc" }}
{{- $_ := required "model.pvc.claimName is required when model.source is pvc" $m.pvc.claimName }}
{{- printf "%s/%s" (include "llada-serve.modelMount" .) $m.pvc.path | trimSuffix "/" }}
{{- end }}
{{- end }}

{{/*
A flag value as the server parses it. Numbers from values files arrive as
float64 and would print as 1.048576e+06: print whole numbers as integers.
*/}}
{{- define "llada-serve.flagValue" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/*
Container args: --flag=value for each engine.* value (camelCase -> kebab-case),
null left out; a boolean is a switch, given when true.
*/}}
{{- define "llada-serve.args" -}}
- --host=0.0.0.0
- --port={{ include "llada-serve.port" . }}
{{- with include "llada-serve.model" . }}
- {{ printf "--model=%s" . | quote }}
{{- end }}
{{- with .Values.servedModelName }}
- {{ printf "--served-model-name=%s" . | quote }}
{{- end }}
{{- range $key, $value := .Values.engine }}
{{- if kindIs "bool" $value }}
{{- if $value }}
- --{{ kebabcase $key }}
{{- end }}
{{- else if not (kindIs "invalid" $value) }}
- {{ printf "--%s=%s" (kebabcase $key) (include "llada-serve.flagValue" $value) | quote }}
{{- end }}
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* Above the server's drain timeout, so the kubelet never kills a draining pod. */}}
{{- define "llada-serve.terminationGracePeriodSeconds" -}}
{{- add .Values.preStopSleepSeconds (ceil .Values.engine.drainTimeout | int64) .Values.terminationGraceMarginSeconds }}
{{- end }}

{{- define "llada-serve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
