{{/* Cross-field checks that values.schema.json cannot express clearly. */}}
{{- define "veil-core.validate" -}}
{{- $v := .Values -}}
{{- if and $v.autoscaling.enabled (gt (int64 $v.autoscaling.minReplicas) (int64 $v.autoscaling.maxReplicas)) }}
{{- fail (printf "autoscaling.minReplicas (%d) must not exceed autoscaling.maxReplicas (%d)" (int64 $v.autoscaling.minReplicas) (int64 $v.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and $v.autoscaling.enabled (not $v.autoscaling.queuedSteps.enabled) (not $v.autoscaling.cpu.enabled) }}
{{- fail "autoscaling.enabled needs autoscaling.queuedSteps.enabled or autoscaling.cpu.enabled" }}
{{- end }}
{{- if and $v.locker.enabled $v.locker.external.url }}
{{- fail "set either locker.enabled (in-chart Redis) or locker.external.url, not both" }}
{{- end }}
{{- if and $v.locker.external.url (not $v.locker.external.existingSecret) }}
{{- fail "locker.external.url needs locker.external.existingSecret (the Secret holding the Redis password)" }}
{{- end }}
{{- if and $v.identity.existingSecret $v.identity.privateKey }}
{{- fail "set either identity.existingSecret or identity.privateKey, not both" }}
{{- end }}
{{- $prev := $v.identity.previous }}
{{- if and $prev.existingSecret $prev.privateKey }}
{{- fail "set either identity.previous.existingSecret or identity.previous.privateKey, not both" }}
{{- end }}
{{- if and $prev.privateKey (eq (trim $prev.privateKey) (trim $v.identity.privateKey)) }}
{{- fail "identity.previous.privateKey is the current identity.privateKey: the previous key is the one being rotated out" }}
{{- end }}
{{- if and $prev.existingSecret (eq $prev.existingSecret (include "veil-core.identity.secretName" .)) (eq $prev.secretKey $v.identity.secretKey) }}
{{- fail "identity.previous names the same Secret and key as the current identity: the previous key is the one being rotated out" }}
{{- end }}
{{- $paths := list $v.identity.mountPath $v.enrollment.mountPath }}
{{- if include "veil-core.identity.previous.active" . }}
{{- $paths = append $paths $prev.mountPath }}
{{- end }}
{{- if include "veil-core.locker.active" . }}
{{- $paths = append $paths $v.locker.mountPath }}
{{- end }}
{{- if ne (len $paths) (len (uniq $paths)) }}
{{- fail (printf "identity.mountPath, identity.previous.mountPath, enrollment.mountPath and locker.mountPath must differ (got %s)" (join ", " $paths)) }}
{{- end }}
{{- $e := $v.enrollment }}
{{- if and $e.existingSecret $e.allowedEdges }}
{{- fail "set either enrollment.allowedEdges or enrollment.existingSecret, not both" }}
{{- end }}
{{- if not (or $e.existingSecret $e.allowedEdges) }}
{{- fail "no edge is enrolled, so this core would admit nobody: list each edge in enrollment.allowedEdges ({name, publicKey} with the key `veil edge identity` prints on the edge machine), or set enrollment.existingSecret to a Secret holding an allowed_edges.yaml file" }}
{{- end }}
{{- $names := list }}
{{- $keys := list }}
{{- range $e.allowedEdges }}
{{- if has .name $names }}
{{- fail (printf "enrollment.allowedEdges lists the name %q twice" .name) }}
{{- end }}
{{- if has (trim .publicKey) $keys }}
{{- fail (printf "enrollment.allowedEdges lists the key of %q twice (every edge needs its own key)" .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- $keys = append $keys (trim .publicKey) }}
{{- end }}
{{- if eq (int64 $v.metrics.port) (int64 $v.core.port) }}
{{- fail (printf "metrics.port (%d) must differ from core.port: /metrics is served on its own port" (int64 $v.metrics.port)) }}
{{- end }}
{{- if and (not $v.gpu.enabled) (eq $v.core.device "cuda") }}
{{- fail "core.device is \"cuda\" but gpu.enabled is false: set core.device to cpu or auto" }}
{{- end }}
{{- if and (eq $v.core.quantize "int8") (or (ne $v.core.device "cpu") (ne $v.core.engine "native") (not (has $v.core.dtype (list "auto" "float32")))) }}
{{- fail "core.quantize is int8, which runs on the native engine on a CPU in float32: set core.device to cpu, core.engine to native and core.dtype to auto or float32, or core.quantize to none" }}
{{- end }}
{{- $tp := int64 $v.core.tensorParallelSize }}
{{- if and (gt $tp 1) (ne $v.core.engine "vllm") }}
{{- fail (printf "core.tensorParallelSize is %d but core.engine is %q: only the vllm engine splits a model over GPUs (set core.engine to vllm, or tensorParallelSize to 1)" $tp $v.core.engine) }}
{{- end }}
{{- if and (eq $v.core.engine "vllm") $v.gpu.enabled (lt (int64 $v.gpu.count) $tp) }}
{{- fail (printf "core.tensorParallelSize (%d) needs as many GPUs per pod, but gpu.count is %d: raise gpu.count or lower core.tensorParallelSize" $tp (int64 $v.gpu.count)) }}
{{- end }}
{{- if and (eq $v.core.engine "vllm") (not $v.gpu.enabled) (not (or $v.image.tag $v.image.digest)) }}
{{- fail "core.engine is vllm but gpu.enabled is false: the -vllm image (docker/core-vllm.Dockerfile) is built on vLLM's CUDA image; for vLLM on CPU set image.tag or image.digest to an image with vLLM's CPU build" }}
{{- end }}
{{- end }}
