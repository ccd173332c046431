{{- /* The prefix of every object's name: the release name, with the chart's name added
unless the release already carries it ("ringmaster" -> ringmaster-operator, "ml" ->
ml-ringmaster-operator), so two releases never claim the same cluster-scoped name. */ -}}
{{- define "ringmaster.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{ .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else -}}
{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" }}
{{- end -}}
{{- end }}

{{- /* One image per binary (images/build.sh): <repository>-operator and <repository>-scheduler. */ -}}
{{- define "ringmaster.operatorImage" -}}
{{ .Values.image.repository }}-operator:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "ringmaster.schedulerImage" -}}
{{ .Values.image.repository }}-scheduler:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "ringmaster.labels" -}}
app.kubernetes.io/part-of: ringmaster
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{- /* Pod-level security shared by both components (the restricted Pod Security Standard). */ -}}
{{- define "ringmaster.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile: {type: RuntimeDefault}
{{- end }}

{{- define "ringmaster.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities: {drop: [ALL]}
{{- end }}

{{- /* Scheduling of a component's pods: the chart-wide nodeSelector and tolerations, and
anti-affinity between its replicas so one node's loss never takes both (soft by default:
a one-node cluster still runs them). Call with (list $ "operator"). */ -}}
{{- define "ringmaster.placement" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- with $root.Values.nodeSelector }}
nodeSelector: {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $root.Values.tolerations }}
tolerations: {{- toYaml . | nindent 2 }}
{{- end }}
{{- if $root.Values.affinity }}
affinity: {{- toYaml $root.Values.affinity | nindent 2 }}
{{- else if eq $root.Values.podAntiAffinity "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels: {app.kubernetes.io/instance: {{ $root.Release.Name }}, app.kubernetes.io/name: {{ $component }}}
{{- else if eq $root.Values.podAntiAffinity "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels: {app.kubernetes.io/instance: {{ $root.Release.Name }}, app.kubernetes.io/name: {{ $component }}}
{{- end }}
{{- end }}
