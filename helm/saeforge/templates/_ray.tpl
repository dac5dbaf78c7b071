{{/*
Pod template of one Ray group. Arg: dict with
  root  - the chart context
  group - the group's values
  kind  - "head" or "worker"
  name  - group name (for labels)
*/}}
{{- define "saeforge.rayPodTemplate" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- $res := deepCopy (default dict $g.resources) }}
{{- if and (hasKey $g "gpus") (gt (int $g.gpus) 0) }}
{{- $limits := deepCopy (default dict $res.limits) }}
{{- $requests := deepCopy (default dict $res.requests) }}
{{- $_ := set $limits $g.gpuResourceName (int $g.gpus) }}
{{- $_ := set $requests $g.gpuResourceName (int $g.gpus) }}
{{- $_ := set $res "limits" $limits }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
metadata:
  labels:
    {{- include "saeforge.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: ray-{{ .kind }}
    saeforge.io/ray-group: {{ .name }}
  annotations:
    checksum/config: {{ include "saeforge.configChecksum" $root }}
    {{- with $g.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "saeforge.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- include "saeforge.podSecurityContext" $root | nindent 4 }}
  containers:
    - name: ray-{{ .kind }}
      image: {{ include "saeforge.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if eq .kind "head" }}
      ports:
        - name: gcs-server
          containerPort: 6379
          protocol: TCP
        - name: dashboard
          containerPort: 8265
          protocol: TCP
        - name: client
          containerPort: 10001
          protocol: TCP
        - name: metrics
          containerPort: 8080
          protocol: TCP
      {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "saeforge.configName" $root }}
      {{- $secretEnv := include "saeforge.s3SecretEnv" $root | trim }}
      {{- if or $secretEnv $g.extraEnv }}
      env:
        {{- with $secretEnv }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- with $g.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      resources:
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- include "saeforge.containerSecurityContext" (dict "root" $root "readOnly" $root.Values.ray.readOnlyRootFilesystem) | nindent 8 }}
      volumeMounts:
        # Ray's object store lives in /dev/shm: an in-memory emptyDir sized for it.
        - name: shared-mem
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
        {{- if $root.Values.sharedVolume.enabled }}
        - name: shared
          mountPath: {{ $root.Values.sharedVolume.mountPath }}
          readOnly: {{ $root.Values.sharedVolume.readOnly }}
        {{- end }}
  volumes:
    - name: shared-mem
      emptyDir:
        medium: Memory
        sizeLimit: {{ $g.shmSizeLimit }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $g.tmpSizeLimit }}
    {{- if $root.Values.sharedVolume.enabled }}
    - name: shared
      persistentVolumeClaim:
        claimName: {{ $root.Values.sharedVolume.existingClaim }}
    {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
