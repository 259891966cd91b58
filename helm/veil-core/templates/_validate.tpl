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
{{- if and (not $v.gpu.enabled) (eq $v.core.device "cuda") }}
{{- fail "core.device is \"cuda\" but gpu.enabled is false: set core.device to cpu or auto" }}
{{- end }}
{{- end }}
