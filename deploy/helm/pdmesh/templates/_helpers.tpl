{{- define "pdmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "pdmesh.labels" -}}
app.kubernetes.io/name: pdmesh
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pdmesh.selector" -}}
app.kubernetes.io/name: pdmesh
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* the pools this release runs, by its mode */}}
{{- define "pdmesh.roles" -}}
{{- if eq .Values.mode "colocated" }}colocated{{ else }}prefill decode{{ end -}}
{{- end -}}

{{- define "pdmesh.image" -}}
{{ .image.repository }}:{{ .image.tag | default .root.Chart.AppVersion }}
{{- end -}}

{{/* the label selector the routers watch workers with: this release's pods that have a role */}}
{{- define "pdmesh.workerSelector" -}}
app.kubernetes.io/name=pdmesh,app.kubernetes.io/instance={{ .Release.Name }},pdmesh.io/role
{{- end -}}

{{- define "pdmesh.modelVolume" -}}
{{- $src := .Values.model.source -}}
{{- if eq $src.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $src.pvc.claimName }}
    readOnly: true
{{- else if eq $src.type "hostPath" }}
- name: model
  hostPath:
    path: {{ $src.hostPath.path }}
    type: Directory
{{- else if eq $src.type "initContainer" }}
- name: model
  emptyDir:
    sizeLimit: {{ $src.initContainer.sizeLimit }}
{{- end }}
{{- end -}}

{{- define "pdmesh.modelMount" -}}
{{- if ne .Values.model.source.type "none" }}
- name: model
  mountPath: {{ .Values.model.path }}
  {{- if and (eq .Values.model.source.type "pvc") .Values.model.source.pvc.subPath }}
  subPath: {{ .Values.model.source.pvc.subPath }}
  {{- end }}
  readOnly: {{ ne .Values.model.source.type "initContainer" }}
{{- end }}
{{- end -}}
