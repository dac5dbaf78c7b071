{{/* Names ------------------------------------------------------------------------------------------ */}}

{{- define "saeforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "saeforge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Short enough that KubeRay's "<name>-head-svc" stays a valid, untruncated Service name. */}}
{{- define "saeforge.rayClusterName" -}}
{{- if .Values.ray.clusterName -}}
{{- .Values.ray.clusterName -}}
{{- else -}}
{{- printf "%s-ray" (include "saeforge.fullname" . | trunc 36 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{- define "saeforge.rayHeadService" -}}
{{- printf "%s-head-svc" (include "saeforge.rayClusterName" .) -}}
{{- end -}}

{{- define "saeforge.rayAddress" -}}
{{- printf "http://%s:8265" (include "saeforge.rayHeadService" .) -}}
{{- end -}}

{{- define "saeforge.apiName" -}}
{{- printf "%s-api" (include "saeforge.fullname" . | trunc 59 | trimSuffix "-") -}}
{{- end -}}

{{- define "saeforge.mlflowName" -}}
{{- printf "%s-mlflow" (include "saeforge.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{- define "saeforge.configName" -}}
{{- printf "%s-config" (include "saeforge.fullname" . | trunc 56 | trimSuffix "-") -}}
{{- end -}}

{{- define "saeforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "saeforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Labels ----------------------------------------------------------------------------------------- */}}

{{- define "saeforge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "saeforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: saeforge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "saeforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "saeforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Image ------------------------------------------------------------------------------------------ */}}

{{- define "saeforge.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "saeforge.mlflowImage" -}}
{{- if .Values.mlflow.image.repository -}}
{{- printf "%s:%s" .Values.mlflow.image.repository (required "mlflow.image.tag is required when mlflow.image.repository is set" .Values.mlflow.image.tag) -}}
{{- else -}}
{{- include "saeforge.image" . -}}
{{- end -}}
{{- end -}}

{{/* Derived settings ------------------------------------------------------------------------------- */}}

{{- define "saeforge.s3Root" -}}
{{- printf "s3://%s/%s" .Values.s3.bucket (.Values.s3.prefix | trimAll "/") | trimSuffix "/" -}}
{{- end -}}

{{- define "saeforge.outputRoot" -}}
{{- if .Values.config.outputRoot -}}
{{- .Values.config.outputRoot -}}
{{- else if .Values.s3.enabled -}}
{{- include "saeforge.s3Root" . -}}
{{- else if .Values.sharedVolume.enabled -}}
{{- printf "file://%s/outputs" (.Values.sharedVolume.mountPath | trimSuffix "/") -}}
{{- else -}}
file:///tmp/saeforge/outputs
{{- end -}}
{{- end -}}

{{- define "saeforge.mlflowTrackingUri" -}}
{{- if .Values.mlflow.enabled -}}
{{- printf "http://%s:%v" (include "saeforge.mlflowName" .) .Values.mlflow.service.port -}}
{{- else -}}
{{- required "mlflow.external.trackingUri is required when mlflow.enabled is false" .Values.mlflow.external.trackingUri -}}
{{- end -}}
{{- end -}}

{{- define "saeforge.mlflowArtifacts" -}}
{{- if .Values.mlflow.artifacts.destination -}}
{{- .Values.mlflow.artifacts.destination -}}
{{- else if .Values.s3.enabled -}}
{{- printf "%s/mlflow-artifacts" (include "saeforge.s3Root" .) -}}
{{- else -}}
/data/mlflow-artifacts
{{- end -}}
{{- end -}}

{{/* Secrets: which Secret and key holds each value (a chart-made one only when a value is given). ---- */}}

{{- define "saeforge.envSecretName" -}}
{{- printf "%s-env" (include "saeforge.fullname" . | trunc 59 | trimSuffix "-") -}}
{{- end -}}

{{- define "saeforge.tokensSecretName" -}}
{{- if .Values.api.auth.existingSecret -}}
{{- .Values.api.auth.existingSecret -}}
{{- else -}}
{{- printf "%s-api-tokens" (include "saeforge.fullname" . | trunc 52 | trimSuffix "-") -}}
{{- end -}}
{{- end -}}

{{- define "saeforge.externalDatabase" -}}
{{- if or .Values.api.database.existingSecret .Values.api.database.url -}}true{{- end -}}
{{- end -}}

{{- define "saeforge.externalMlflowBackend" -}}
{{- if or .Values.mlflow.backendStore.existingSecret .Values.mlflow.backendStore.uri -}}true{{- end -}}
{{- end -}}

{{- define "saeforge.s3Keys" -}}
{{- if and .Values.s3.enabled (or .Values.s3.credentials.existingSecret .Values.s3.credentials.accessKeyId) -}}true{{- end -}}
{{- end -}}

{{- define "saeforge.needsEnvSecret" -}}
{{- if or .Values.api.database.url .Values.mlflow.backendStore.uri (and .Values.s3.enabled (not .Values.s3.credentials.existingSecret) .Values.s3.credentials.accessKeyId) -}}true{{- end -}}
{{- end -}}

{{/* AWS keys as secretKeyRef env entries (never literal values). */}}
{{- define "saeforge.s3SecretEnv" -}}
{{- if include "saeforge.s3Keys" . }}
{{- $secret := default (include "saeforge.envSecretName" .) .Values.s3.credentials.existingSecret }}
{{- $idKey := ternary .Values.s3.credentials.accessKeyIdKey "AWS_ACCESS_KEY_ID" (ne .Values.s3.credentials.existingSecret "") }}
{{- $secretKey := ternary .Values.s3.credentials.secretAccessKeyKey "AWS_SECRET_ACCESS_KEY" (ne .Values.s3.credentials.existingSecret "") }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $idKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ $secret }}
      key: {{ $secretKey }}
{{- end }}
{{- end -}}

{{/* Security contexts ------------------------------------------------------------------------------ */}}

{{- define "saeforge.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end -}}

{{/* Arg: dict with readOnly (bool). */}}
{{- define "saeforge.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .root.Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .root.Values.podSecurityContext.runAsGroup }}
allowPrivilegeEscalation: false
privileged: false
readOnlyRootFilesystem: {{ .readOnly }}
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* Checksum of the settings, so pods restart when the ConfigMap changes. */}}
{{- define "saeforge.configChecksum" -}}
{{- include (print $.Template.BasePath "/configmap.yaml") . | sha256sum -}}
{{- end -}}

{{/* Cross-field checks the schema cannot express; each message names the value. ------------------- */}}
{{- define "saeforge.validate" -}}
{{- if and .Values.s3.enabled (not .Values.s3.bucket) -}}
{{- fail "s3.bucket is required when s3.enabled is true" -}}
{{- end -}}
{{- if and .Values.s3.credentials.accessKeyId (not .Values.s3.credentials.secretAccessKey) -}}
{{- fail "s3.credentials.secretAccessKey is required when s3.credentials.accessKeyId is set" -}}
{{- end -}}
{{- if and .Values.s3.credentials.existingSecret .Values.s3.credentials.accessKeyId -}}
{{- fail "set either s3.credentials.existingSecret or s3.credentials.accessKeyId, not both" -}}
{{- end -}}
{{- if and .Values.sharedVolume.enabled (not .Values.sharedVolume.existingClaim) -}}
{{- fail "sharedVolume.existingClaim is required when sharedVolume.enabled is true" -}}
{{- end -}}
{{- if and .Values.api.database.existingSecret .Values.api.database.url -}}
{{- fail "set either api.database.existingSecret or api.database.url, not both" -}}
{{- end -}}
{{- if and .Values.api.auth.existingSecret .Values.api.auth.tokens -}}
{{- fail "set either api.auth.existingSecret or api.auth.tokens, not both" -}}
{{- end -}}
{{- if and .Values.mlflow.backendStore.existingSecret .Values.mlflow.backendStore.uri -}}
{{- fail "set either mlflow.backendStore.existingSecret or mlflow.backendStore.uri, not both" -}}
{{- end -}}
{{- if and (gt (int .Values.api.replicas) 1) (not (include "saeforge.externalDatabase" .)) -}}
{{- fail (printf "api.replicas is %v but the SQLite job store allows one replica: set api.database.existingSecret (external PostgreSQL) or api.replicas: 1" .Values.api.replicas) -}}
{{- end -}}
{{- if and (not .Values.mlflow.enabled) (not .Values.mlflow.external.trackingUri) -}}
{{- fail "mlflow.external.trackingUri is required when mlflow.enabled is false" -}}
{{- end -}}
{{- range $name, $g := .Values.ray.workerGroups }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) -}}
{{- fail (printf "ray.workerGroups.%s.minReplicas (%v) is greater than ray.workerGroups.%s.maxReplicas (%v)" $name $g.minReplicas $name $g.maxReplicas) -}}
{{- end -}}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) -}}
{{- fail (printf "ray.workerGroups.%s.replicas (%v) must lie between minReplicas (%v) and maxReplicas (%v)" $name $g.replicas $g.minReplicas $g.maxReplicas) -}}
{{- end -}}
{{- if hasKey $g.rayStartParams "resources" -}}
{{- fail (printf "ray.workerGroups.%s.rayStartParams.resources is set by the chart: use ray.workerGroups.%s.customResources" $name $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Bytes in a size quantity such as 4Gi or 500M (units limited by the schema). */}}
{{- define "saeforge.quantityBytes" -}}
{{- $q := toString . -}}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 -}}
{{- $n := regexFind "^[0-9]+(\\.[0-9]+)?" $q -}}
{{- $u := trimPrefix $n $q -}}
{{- $mult := 1 -}}
{{- if $u }}{{ $mult = index $units $u }}{{ end -}}
{{- mulf (float64 $n) $mult | int64 -}}
{{- end -}}

{{/* `ray start` parameters of a group: the object store gets a share of the /dev/shm emptyDir, so Ray
     keeps it in memory (it falls back to slow /tmp when /dev/shm is smaller than the store) and NCCL and
     torch still find room there. Arg: dict root, group. */}}
{{- define "saeforge.rayStartParams" -}}
{{- $g := .group -}}
{{- if not (hasKey $g.rayStartParams "object-store-memory") }}
object-store-memory: {{ mulf (include "saeforge.quantityBytes" $g.shmSizeLimit | float64) .root.Values.ray.objectStoreShmFraction | int64 | toString | quote }}
{{- end }}
{{- range $k, $v := $g.rayStartParams }}
{{ $k }}: {{ $v | toString | quote }}
{{- end }}
{{- end -}}
