{{- define "coserve.labels" -}}
app.kubernetes.io/name: coserve-operator
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* The labels the operator gives a CoServingPool's engine pods (operator/pool.py pool_labels). */}}
{{- define "coserve.engineLabels" -}}
app.kubernetes.io/name: coserve-engine
app.kubernetes.io/managed-by: coserve-operator
{{- with . }}
coserve.dev/pool: {{ . }}
{{- end }}
{{- end -}}
