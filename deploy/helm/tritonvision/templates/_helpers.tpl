{{/* Names are DNS labels: at most 63 characters, no trailing dash. */}}
{{- define "tritonvision.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tritonvision.fullname" -}}
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

{{- define "tritonvision.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tritonvision.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tritonvision.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tritonvision.labels" -}}
helm.sh/chart: {{ include "tritonvision.chart" . }}
{{ include "tritonvision.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tritonvision.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tritonvision.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Secret with the access key of the administrative protocols: the user's, or the one the chart creates.
*/}}
{{- define "tritonvision.accessKeySecret" -}}
{{- .Values.accessKey.existingSecret | default (printf "%s-access-key" (include "tritonvision.fullname" . | trunc 52 | trimSuffix "-")) }}
{{- end }}
{{/*
The access key's Secret data: the value of the Secret already in the cluster ("existing", what lookup
returned: empty on install and offline), else 32 random characters. Quoted, base64.
*/}}
{{- define "tritonvision.accessKeyData" -}}
{{- $kept := index ((.existing | default dict).data | default dict) "accessKey" }}
{{- $kept | default (randAlphaNum 32 | b64enc) | quote }}
{{- end }}
{{/* The image reference: pinned by digest when one is given. */}}
{{- define "tritonvision.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}
{{- end }}

{{/* Which volume the model repository is copied from: "pvc", "nfs", or "" (the image, or a URL Triton reads). */}}
{{- define "tritonvision.modelVolume" -}}
{{- $r := .Values.modelRepository }}
{{- $set := 0 }}
{{- if $r.url }}{{ $set = add1 $set }}{{ end }}
{{- if $r.persistentVolumeClaim.claimName }}{{ $set = add1 $set }}{{ end }}
{{- if or $r.nfs.server $r.nfs.path }}{{ $set = add1 $set }}{{ end }}
{{- if gt $set 1 }}
{{- fail "modelRepository: set at most one of url, persistentVolumeClaim.claimName and nfs" }}
{{- end }}
{{- if and $r.nfs.path (not $r.nfs.server) }}
{{- fail "modelRepository.nfs.path needs modelRepository.nfs.server" }}
{{- end }}
{{- if $r.persistentVolumeClaim.claimName }}pvc{{ else if $r.nfs.server }}nfs{{ end }}
{{- end }}

{{/* Where the init container copies the repository from. */}}
{{- define "tritonvision.modelSource" -}}
{{- if include "tritonvision.modelVolume" . }}/model-source{{ else }}{{ .Values.modelRepository.source }}{{ end }}
{{- end }}

{{/* The TLS Secret's mount point in the server container. */}}
{{- define "tritonvision.tlsDir" -}}/etc/tritonvision/tls{{- end }}

{{/* The python backend's shared-memory regions in the pod's /dev/shm are named with this prefix. */}}
{{- define "tritonvision.shmPrefix" -}}tritonvision_server_{{- end }}
