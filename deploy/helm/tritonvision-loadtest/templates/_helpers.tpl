{{/* Names are DNS labels: at most 63 characters, no trailing dash; the role suffix fits within them. */}}
{{- define "tvload.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tvload.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 56 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 56 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tvload.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tvload.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tvload.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "tvload.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The container both roles share; "args" is the role's own Locust arguments. */}}
{{- define "tvload.container" -}}
- name: locust
  image: {{ ternary (printf "%s@%s" .root.Values.image.repository .root.Values.image.digest) (printf "%s:%s" .root.Values.image.repository .root.Values.image.tag) (not (empty .root.Values.image.digest)) | quote }}
  imagePullPolicy: {{ .root.Values.image.pullPolicy }}
  securityContext:
    {{- toYaml .root.Values.securityContext | nindent 4 }}
  command: ["locust"]
  args:
    - --locustfile={{ include "tvload.locustfile" .root }}
    {{- range .args }}
    - {{ . | quote }}
    {{- end }}
  env:
    - name: HOME
      value: /tmp
    - name: PYTHONDONTWRITEBYTECODE
      value: "1"
    {{- if .root.Values.imagesConfigMap }}
    - name: TRITONVISION_IMAGES
      value: /images
    {{- end }}
    {{- range $key, $value := .root.Values.options }}
    - name: TRITONVISION_{{ $key }}
      value: {{ $value | quote }}
    {{- end }}
  {{- with .ports }}
  ports:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  resources:
    {{- toYaml .resources | nindent 4 }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    {{- if .root.Values.locustfile.configMap }}
    - name: locustfile
      mountPath: /locustfile
      readOnly: true
    {{- end }}
    {{- if .root.Values.imagesConfigMap }}
    - name: images
      mountPath: /images
      readOnly: true
    {{- end }}
{{- end }}

{{- define "tvload.locustfile" -}}
{{- if .Values.locustfile.configMap }}/locustfile/locustfile.py{{ else }}{{ .Values.locustfile.path }}{{ end }}
{{- end }}

{{- define "tvload.volumes" -}}
- name: tmp
  emptyDir: {}
{{- if .Values.locustfile.configMap }}
- name: locustfile
  configMap:
    name: {{ .Values.locustfile.configMap }}
{{- end }}
{{- if .Values.imagesConfigMap }}
- name: images
  configMap:
    name: {{ .Values.imagesConfigMap }}
{{- end }}
{{- end }}

{{- define "tvload.podSpec" -}}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
