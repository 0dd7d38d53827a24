{{/* Chart name, truncated to a DNS label. */}}
{{- define "hoard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<release>-<chart>" unless the release name already holds the chart name. Kept short
enough for the "-controller-metrics" suffix. */}}
{{- define "hoard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "hoard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "hoard.labels" -}}
helm.sh/chart: {{ include "hoard.chart" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: hoard
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels (immutable): the controller finds agents by app.kubernetes.io/name=hoard-agent. */}}
{{- define "hoard.controller.selectorLabels" -}}
app.kubernetes.io/name: hoard-controller
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "hoard.agent.selectorLabels" -}}
app.kubernetes.io/name: hoard-agent
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent
{{- end }}

{{- define "hoard.controller.serviceAccountName" -}}
{{- if .Values.controller.serviceAccount.create }}
{{- default (printf "%s-controller" (include "hoard.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.controller.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "hoard.agent.serviceAccountName" -}}
{{- if .Values.agent.serviceAccount.create }}
{{- default (printf "%s-agent" (include "hoard.fullname" .)) .Values.agent.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.agent.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image reference: pass (dict "img" .Values.X.image "root" $) */}}
{{- define "hoard.image" -}}
{{- $tag := .img.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- if .img.digest }}
{{- printf "%s@%s" .img.repository .img.digest }}
{{- else }}
{{- printf "%s:%s" .img.repository $tag }}
{{- end }}
{{- end }}

{{/* Names of the two TLS Secrets (see templates/tls.yaml). */}}
{{- define "hoard.tls.controllerSecret" -}}
{{- if eq .Values.tls.mode "existingSecrets" }}
{{- required "tls.existingSecrets.controller is required with tls.mode=existingSecrets" .Values.tls.existingSecrets.controller }}
{{- else }}
{{- printf "%s-controller-tls" (include "hoard.fullname" .) }}
{{- end }}
{{- end }}

{{- define "hoard.tls.agentCASecret" -}}
{{- if eq .Values.tls.mode "existingSecrets" }}
{{- required "tls.existingSecrets.agentCA is required with tls.mode=existingSecrets" .Values.tls.existingSecrets.agentCA }}
{{- else }}
{{- printf "%s-agent-ca" (include "hoard.fullname" .) }}
{{- end }}
{{- end }}

{{/*
The generated TLS material (tls.mode=helm), as YAML:
  controller: {ca.crt: agent CA cert, tls.crt, tls.key: controller certificate}
  agentCA:    {tls.crt, tls.key: agent CA, ca.crt: controller CA cert}
Reused from the Secrets of an existing release (lookup) so upgrades keep the identities; made
once per render and remembered, so the Secrets and the pods' checksum annotations agree. The
controller CA's key is thrown away after signing: nothing in the cluster can mint another
controller certificate.
*/}}
{{- define "hoard.tls.generated" -}}
{{- if not (hasKey .Values "__hoardGeneratedTLS") }}
{{- $ns := .Release.Namespace }}
{{- $ctl := lookup "v1" "Secret" $ns (include "hoard.tls.controllerSecret" .) }}
{{- $aca := lookup "v1" "Secret" $ns (include "hoard.tls.agentCASecret" .) }}
{{- $out := dict }}
{{- if and $ctl $aca $ctl.data $aca.data (hasKey $ctl.data "tls.key") (hasKey $aca.data "tls.key") }}
{{- $_ := set $out "controller" (dict "ca.crt" (index $ctl.data "ca.crt" | b64dec) "tls.crt" (index $ctl.data "tls.crt" | b64dec) "tls.key" (index $ctl.data "tls.key" | b64dec)) }}
{{- $_ := set $out "agentCA" (dict "ca.crt" (index $aca.data "ca.crt" | b64dec) "tls.crt" (index $aca.data "tls.crt" | b64dec) "tls.key" (index $aca.data "tls.key" | b64dec)) }}
{{- else }}
{{- $days := int .Values.tls.helm.validityDays }}
{{- $controllerCA := genCA "hoard-controller-ca" $days }}
{{- $agentCA := genCA "hoard-agent-ca" $days }}
{{- $cert := genSignedCert .Values.tls.controllerIdentity nil (list .Values.tls.controllerIdentity) $days $controllerCA }}
{{- $_ := set $out "controller" (dict "ca.crt" $agentCA.Cert "tls.crt" $cert.Cert "tls.key" $cert.Key) }}
{{- $_ := set $out "agentCA" (dict "ca.crt" $controllerCA.Cert "tls.crt" $agentCA.Cert "tls.key" $agentCA.Key) }}
{{- end }}
{{- $_ := set .Values "__hoardGeneratedTLS" $out }}
{{- end }}
{{- toYaml (get .Values "__hoardGeneratedTLS") }}
{{- end }}

{{/* A checksum of the TLS material, as a pod annotation value, so pods restart when it changes. */}}
{{- define "hoard.tls.checksum" -}}
{{- if eq .Values.tls.mode "helm" }}
{{- include "hoard.tls.generated" . | sha256sum }}
{{- else }}
{{- toYaml .Values.tls | sha256sum }}
{{- end }}
{{- end }}
