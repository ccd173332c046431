{{- /* One image per binary (images/build.sh): <repository>-operator and <repository>-scheduler. */ -}}
{{- define "ringmaster.operatorImage" -}}
{{ .Values.image.repository }}-operator:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "ringmaster.schedulerImage" -}}
{{ .Values.image.repository }}-scheduler:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "ringmaster.labels" -}}
app.kubernetes.io/part-of: ringmaster
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}
