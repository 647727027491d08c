{{/* Shared helpers of the ssd chart. */}}

{{- define "ssd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>-ssd, or the release name alone when it already contains the chart name.
Kept to 50 characters so that "-gateway"/"-target" suffixes stay within 63. */}}
{{- define "ssd.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ssd.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object. Call with (dict "root" $ "component" "gateway"). */}}
{{- define "ssd.labels" -}}
helm.sh/chart: {{ include "ssd.chart" .root }}
{{ include "ssd.selectorLabels" . }}
app.kubernetes.io/part-of: ssd
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* Selector labels: stable across upgrades. */}}
{{- define "ssd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ssd.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Service account names: created ones default to <fullname>-gateway / -workload, existing
ones (serviceAccount.create=false) to "default". */}}
{{- define "ssd.gatewayServiceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-gateway" (include "ssd.fullname" .)) .Values.serviceAccount.gatewayName -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.gatewayName -}}
{{- end -}}
{{- end -}}

{{- define "ssd.workloadServiceAccount" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-workload" (include "ssd.fullname" .)) .Values.serviceAccount.workloadName -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.workloadName -}}
{{- end -}}
{{- end -}}

{{/* The ssd image of a component: its image.repository/tag when set, else the shared image;
the shared tag defaults to appVersion, with "-cuda" when gpu.enabled. Call with
(dict "root" $ "values" .Values.target). */}}
{{- define "ssd.image" -}}
{{- $root := .root -}}
{{- $own := .values.image | default dict -}}
{{- $repo := $own.repository | default $root.Values.image.repository -}}
{{- $tag := $own.tag | default $root.Values.image.tag -}}
{{- if not $tag -}}
{{- $tag = $root.Chart.AppVersion -}}
{{- if $root.Values.gpu.enabled -}}{{- $tag = printf "%s-cuda" $tag -}}{{- end -}}
{{- end -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* Redis URL of the speculation index, "" when none. */}}
{{- define "ssd.redisUrl" -}}
{{- if .Values.redis.externalUrl -}}
{{- .Values.redis.externalUrl -}}
{{- else if .Values.redis.enabled -}}
{{- printf "redis://%s-redis:%d/0" (include "ssd.fullname" .) (int .Values.redis.port) -}}
{{- end -}}
{{- end -}}

{{- define "ssd.redisConfigured" -}}
{{- if or .Values.redis.existingSecret.name (include "ssd.redisUrl" .) -}}true{{- end -}}
{{- end -}}

{{/* OTLP endpoint, "" when tracing is off or has nowhere to go. */}}
{{- define "ssd.otlpEndpoint" -}}
{{- if .Values.telemetry.tracing.enabled -}}
{{- if .Values.telemetry.tracing.otlpEndpoint -}}
{{- .Values.telemetry.tracing.otlpEndpoint -}}
{{- else if .Values.jaeger.enabled -}}
{{- printf "http://%s-jaeger:%d" (include "ssd.fullname" .) (int .Values.jaeger.otlpGrpcPort) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Chart-wide checks, rendered (as nothing) by every Deployment. */}}
{{- define "ssd.validate" -}}
{{- range $c := list "gateway" "target" "draft" -}}
{{- $v := index $.Values $c -}}
{{- $need := add (ceil $v.graceSeconds | int) 5 -}}
{{- if lt (int $v.terminationGracePeriodSeconds) (int $need) -}}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must be >= %s.graceSeconds + 5 (%v): the service drains for up to graceSeconds after SIGTERM and the kubelet kills it at terminationGracePeriodSeconds" $c $v.terminationGracePeriodSeconds $c $need) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.autoscaling.draft.mode "keda") (not .Values.autoscaling.prometheusAddress) -}}
{{- fail "autoscaling.draft.mode=keda needs autoscaling.prometheusAddress (the Prometheus server KEDA queries)" -}}
{{- end -}}
{{- if and (eq .Values.gateway.discovery "static") (not .Values.target.enabled) .Values.gateway.enabled -}}
{{- fail "gateway.discovery=static needs target.enabled (the gateway's --targets is the target Service)" -}}
{{- end -}}
{{- if and (ne .Values.autoscaling.draft.mode "none") (not .Values.draft.enabled) -}}
{{- fail "autoscaling.draft.mode needs draft.enabled" -}}
{{- end -}}
{{- if and (eq .Values.cache.type "pvc") (not .Values.cache.existingClaim) -}}
{{- fail "cache.type=pvc needs cache.existingClaim" -}}
{{- end -}}
{{- end -}}

{{/* Environment common to the three services. Call with (dict "root" $ "component" "target"). */}}
{{- define "ssd.env" -}}
{{- $root := .root -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: SSD_CACHE_DIR
  value: {{ $root.Values.cache.mountPath | quote }}
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
- name: OTEL_SERVICE_NAME
  value: ssd-{{ .component }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.namespace.name=$(POD_NAMESPACE),k8s.pod.name=$(POD_NAME),k8s.node.name=$(NODE_NAME),service.instance.id=$(POD_NAME)"
{{- $otlp := include "ssd.otlpEndpoint" $root }}
{{- if $otlp }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $otlp | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: grpc
- name: OTEL_TRACES_SAMPLER
  value: parentbased_traceidratio
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $root.Values.telemetry.tracing.samplingRatio | toString | quote }}
{{- else }}
- name: OTEL_TRACES_EXPORTER
  value: none
{{- end }}
{{- if and (ne .component "gateway") (include "ssd.redisConfigured" $root) }}
- name: SSD_REDIS_URL
{{- if $root.Values.redis.existingSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ $root.Values.redis.existingSecret.name }}
      key: {{ $root.Values.redis.existingSecret.key | default "url" }}
{{- else }}
  value: {{ include "ssd.redisUrl" $root | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Flags shared by the three roles. */}}
{{- define "ssd.commonArgs" -}}
{{- $e := .Values.engine -}}
- --host
- 0.0.0.0
- --metrics-port
- {{ .Values.telemetry.metrics.port | quote }}
- --target
- {{ $e.target | quote }}
- --draft
- {{ $e.draft | quote }}
- --max-batch
- {{ $e.maxBatch | quote }}
- --max-model-len
- {{ $e.maxModelLen | quote }}
- --num-speculative-tokens
- {{ $e.numSpeculativeTokens | quote }}
- --fan-out-budget
- {{ $e.fanOutBudget | quote }}
- {{ ternary "--adaptive" "--no-adaptive" $e.adaptive }}
- --p-min
- {{ $e.pMin | quote }}
- --dtype
- {{ $e.dtype | quote }}
- --weights
- {{ $e.weights | quote }}
- --draft-weights
- {{ $e.draftWeights | quote }}
- --activations
- {{ $e.activations | quote }}
- {{ ternary "--batch-invariant" "--no-batch-invariant" $e.batchInvariant }}
{{- end -}}

{{/* Volumes of a service pod. Call with the root context. */}}
{{- define "ssd.volumes" -}}
- name: tmp
  emptyDir: {sizeLimit: 1Gi}
- name: cache
{{- if eq .Values.cache.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.cache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- end }}
{{- end -}}

{{- define "ssd.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
{{- end -}}

{{/* Call with (dict "root" $ "values" .Values.target). Init container that points the cache volume at the image's pre-converted models and
generated stubs (symlinks) or copies them, entry by entry with an atomic rename, so a
service never sees a half-written model. */}}
{{- define "ssd.seedCache" -}}
{{- $image := include "ssd.image" . -}}
{{- with .root }}
{{- if ne .Values.cache.seed "none" }}
- name: seed-cache
  image: {{ $image }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["/bin/sh", "-c"]
  args:
    - |
      set -eu
      src={{ .Values.cache.imagePath }}; dst={{ .Values.cache.mountPath }}
      for d in models protos kernels; do
        [ -d "$src/$d" ] || continue
        mkdir -p "$dst/$d"
        for e in "$src/$d"/*; do
          [ -e "$e" ] || continue
          n=$(basename "$e")
          [ -e "$dst/$d/$n" ] && continue
          tmp="$dst/$d/.seed-$HOSTNAME-$n"
          rm -rf "$tmp"
      {{- if eq .Values.cache.seed "copy" }}
          cp -R "$e" "$tmp"
      {{- else }}
          # the compiled kernels are copied (small): loading them takes a lock file beside them
          if [ "$d" = kernels ]; then cp -R "$e" "$tmp"; else ln -s "$e" "$tmp"; fi
      {{- end }}
          mv -T "$tmp" "$dst/$d/$n" 2>/dev/null || rm -rf "$tmp"
        done
      done
      echo "cache seeded ({{ .Values.cache.seed }}) from $src into $dst"
  securityContext:
    {{- toYaml .Values.containerSecurityContext | nindent 4 }}
  resources:
    requests: {cpu: 50m, memory: 64Mi}
    limits: {memory: 256Mi}
  volumeMounts:
    {{- include "ssd.volumeMounts" . | nindent 4 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Pod annotations for Prometheus scraping by annotation. */}}
{{- define "ssd.scrapeAnnotations" -}}
{{- if .Values.telemetry.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .Values.telemetry.metrics.port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* gRPC probes of a service container: readiness on the role's health service name (off
during a drain), liveness and startup on "" (the server as a whole). Call with
(dict "port" 50052 "service" "ssd.v1.Target" "probes" .Values.target.probes). */}}
{{- define "ssd.probes" -}}
startupProbe:
  grpc: {port: {{ .port }}, service: ""}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ .probes.startupFailureThreshold }}
readinessProbe:
  grpc: {port: {{ .port }}, service: {{ .service | quote }}}
  periodSeconds: {{ .probes.readinessPeriodSeconds }}
  timeoutSeconds: 3
  failureThreshold: 1
  successThreshold: 1
livenessProbe:
  grpc: {port: {{ .port }}, service: ""}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: {{ .probes.livenessFailureThreshold }}
{{- end -}}

{{/* Tolerations/nodeSelector of a GPU-capable component (target or draft). */}}
{{- define "ssd.nodeSelector" -}}
{{- $sel := deepCopy (.values.nodeSelector | default dict) -}}
{{- if .root.Values.gpu.enabled -}}{{- $sel = merge $sel (.root.Values.gpu.nodeSelector | default dict) -}}{{- end -}}
{{- if $sel }}
nodeSelector:
  {{- toYaml $sel | nindent 2 }}
{{- end }}
{{- $tol := .values.tolerations | default list -}}
{{- if .root.Values.gpu.enabled -}}{{- $tol = concat $tol (.root.Values.gpu.tolerations | default list) -}}{{- end -}}
{{- if $tol }}
tolerations:
  {{- toYaml $tol | nindent 2 }}
{{- end }}
{{- end -}}

{{/* Resources, with the GPU request/limit added when gpu.enabled. Call with (dict "root" $ "values" .Values.target "gpus" 1). */}}
{{- define "ssd.resources" -}}
{{- $res := deepCopy (.values.resources | default dict) -}}
{{- if .root.Values.gpu.enabled -}}
{{- $name := .root.Values.gpu.resourceName -}}
{{- $req := deepCopy (get $res "requests" | default dict) -}}
{{- $lim := deepCopy (get $res "limits" | default dict) -}}
{{- $_ := set $req $name (int .gpus) -}}
{{- $_ := set $lim $name (int .gpus) -}}
{{- $_ := set $res "requests" $req -}}
{{- $_ := set $res "limits" $lim -}}
{{- end -}}
{{- toYaml $res -}}
{{- end -}}

{{/* NetworkPolicy ingress rule of the metrics port. */}}
{{- define "ssd.metricsIngress" -}}
- ports:
    - {port: metrics, protocol: TCP}
  {{- with .Values.networkPolicy.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* PromQL label matchers of this release's series: namespace plus autoscaling.extraMatchers. */}}
{{- define "ssd.promMatchers" -}}
namespace="{{ .Release.Namespace }}"{{ with .Values.autoscaling.extraMatchers }},{{ . }}{{ end }}
{{- end -}}

{{/* A float as a Kubernetes quantity in milli-units (0.5 -> 500m). */}}
{{- define "ssd.milli" -}}
{{- printf "%dm" (round (mulf . 1000.0) 0 | int) -}}
{{- end -}}

{{/* HPA behavior: slow scale-down, bounded scale-up. Call with .Values.autoscaling.draft or .target. */}}
{{- define "ssd.hpaBehavior" -}}
scaleUp:
  stabilizationWindowSeconds: 30
  selectPolicy: Max
  policies:
    - {type: Pods, value: {{ .scaleUpPodsPer30s | default 1 }}, periodSeconds: 30}
scaleDown:
  stabilizationWindowSeconds: {{ .scaleDownStabilizationSeconds }}
  selectPolicy: Min
  policies:
    - {type: Pods, value: {{ .scaleDownPodsPerMinute | default 1 }}, periodSeconds: 60}
{{- end -}}
