{{- define "coserve.labels" -}}
app.kubernetes.io/name: coserve-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}
