{{/*
Chart name, truncated to 63 characters (a DNS label).
*/}}
{{- define "wsgateway-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name when it already contains the chart name.
*/}}
{{- define "wsgateway-operator.fullname" -}}
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

{{- define "wsgateway-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of everything the chart renders, without app.kubernetes.io/component (each object adds its own).
*/}}
{{- define "wsgateway-operator.commonLabels" -}}
helm.sh/chart: {{ include "wsgateway-operator.chart" . }}
{{ include "wsgateway-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: wsgateway
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels of the operator's own objects.
*/}}
{{- define "wsgateway-operator.labels" -}}
{{ include "wsgateway-operator.commonLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "wsgateway-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "wsgateway-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "wsgateway-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "wsgateway-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "wsgateway-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
The namespaces the operator serves when not cluster-wide, as a JSON list (use with fromJsonArray):
watch.namespaces, or the release namespace when that list is empty. Fails on contradicting values.
*/}}
{{- define "wsgateway-operator.watchNamespaces" -}}
{{- if .Values.watch.allNamespaces }}
{{- if .Values.watch.namespaces }}
{{- fail "watch.namespaces must be empty when watch.allNamespaces is true" }}
{{- end }}
{{- list | toJson }}
{{- else if .Values.watch.namespaces }}
{{- if ne (len .Values.watch.namespaces) (len (uniq .Values.watch.namespaces)) }}
{{- fail "watch.namespaces lists a namespace twice" }}
{{- end }}
{{- toJson .Values.watch.namespaces }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/*
RBAC rules for what the operator does inside a served namespace (the same rules make up the
ClusterRole in cluster-wide mode): exactly the API calls of kopf and of the operator's own client
(operator/wsgateway_operator/kube.py: get, create, merge-patch, delete of children; pods listed;
the NATS credentials Secret read). tests/test_chart.py asserts this exact set.
*/}}
{{- define "wsgateway-operator.rules" -}}
# WebSocketGateways: kopf lists and watches them and patches annotations and finalizers.
- apiGroups: ["wsgateway.dev"]
  resources: ["websocketgateways"]
  verbs: ["list", "watch", "patch"]
# kopf patches the status through the status subresource.
- apiGroups: ["wsgateway.dev"]
  resources: ["websocketgateways/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion: allowed only with update on the owner's
# finalizers (OwnerReferencesPermissionEnforcement admission).
- apiGroups: ["wsgateway.dev"]
  resources: ["websocketgateways/finalizers"]
  verbs: ["update"]
# Children: created, drift merge-patched, deleted when the spec no longer wants them. Read one by
# one (get), never listed or watched.
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch", "delete"]
{{- if .Values.rbac.keda }}
- apiGroups: ["keda.sh"]
  resources: ["scaledobjects"]
  verbs: ["get", "create", "patch", "delete"]
{{- end }}
{{- if .Values.rbac.prometheusOperator }}
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors", "prometheusrules"]
  verbs: ["get", "create", "patch", "delete"]
{{- end }}
# Gateway pods are listed by label (their /metrics, fetched from the pod IP, give the status'
# connection count; the finalizer waits for them to be gone).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# spec.nats.credentialsSecret: the operator reads the .creds to manage JetStream. Read by name only
# (no list/watch, so no other Secret's content can be enumerated).
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# kopf reports handler progress and errors as Events on the resources.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}
