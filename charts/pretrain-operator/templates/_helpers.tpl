{{- define "pretrain-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pretrain-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pretrain-operator.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pretrain-operator.serviceAccount" -}}
{{- default (include "pretrain-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The rules the operator needs in a namespace it serves (see tests/cluster: the API server
grants every request of a job's whole life, and nothing is granted that is not asked for but
the owner's finalizers, which the OwnerReferencesPermissionEnforcement admission checks). */}}
{{- define "pretrain-operator.rules" -}}
- apiGroups: [pretrain.dev]
  resources: [pretrainjobs]
  verbs: [get, list, watch, patch]
- apiGroups: [pretrain.dev]
  resources: [pretrainjobs/status]
  verbs: [patch]
- apiGroups: [pretrain.dev]
  resources: [pretrainjobs/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch, create, delete, patch]
- apiGroups: [""]
  resources: [configmaps]
  verbs: [create, patch]
- apiGroups: [""]
  resources: [services, serviceaccounts]
  verbs: [create]
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- if eq .Values.gangScheduler "volcano" }}
- apiGroups: [scheduling.volcano.sh]
  resources: [podgroups]
  verbs: [create, delete]
{{- else if eq .Values.gangScheduler "coscheduling" }}
- apiGroups: [scheduling.x-k8s.io]
  resources: [podgroups]
  verbs: [create, delete]
{{- end }}
{{- end -}}
