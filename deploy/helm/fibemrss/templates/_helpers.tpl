{{/* Names, labels and the per-role list of services. */}}

{{- define "fibemrss.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fibemrss.fullname" -}}
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

{{/*
The services of the chosen role, as a YAML list. Each entry:
  name:   Kubernetes name suffix and the app.kubernetes.io/component label
  key:    the values key of this service (image digests, tls, resources)
  module: the Python module the image runs (python -m services.<module>)
  singleton: exactly one replica, Recreate strategy (round state lives in PostgreSQL)
  identity: the role part of its certificate's identity "<identity>@<site>" (`fibemrss certs
            init`), the site being `central` or hospital.name
*/}}
{{- define "fibemrss.components" -}}
{{- if eq .Values.role "central" }}
- {name: aggregator, key: aggregator, module: aggregator, singleton: true, identity: aggregator}
{{- else if eq .Values.role "hospital" }}
- {name: emr-gateway, key: emrGateway, module: emr_gateway, singleton: false, identity: gateway}
- {name: hospital-agent, key: hospitalAgent, module: hospital_agent, singleton: true, identity: agent}
- {name: inference, key: inference, module: inference, singleton: false, identity: inference}
{{- else }}
{{- fail (printf "role must be \"central\" or \"hospital\", not %q" (toString .Values.role)) }}
{{- end }}
{{- end }}

{{/* Parsed list of components: (include "fibemrss.componentList" .) | fromYaml .items */}}
{{- define "fibemrss.componentList" -}}
items:
{{ include "fibemrss.components" . | indent 2 }}
{{- end }}

{{- define "fibemrss.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "fibemrss.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fibemrss
{{- end }}

{{/* Selector labels of one component; call with (dict "root" $ "c" $component). */}}
{{- define "fibemrss.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fibemrss.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .c.name }}
{{- end }}

{{- define "fibemrss.componentLabels" -}}
{{ include "fibemrss.labels" .root }}
app.kubernetes.io/component: {{ .c.name }}
{{- end }}

{{- define "fibemrss.image" -}}
{{- $root := .root }}
{{- $repo := printf "%s/fibemrss-%s" (trimSuffix "/" $root.Values.image.registry) .c.name }}
{{- $digest := index $root.Values.image.digests .c.key | default "" }}
{{- if $digest }}
{{- printf "%s@%s" $repo $digest }}
{{- else }}
{{- printf "%s:%s" $repo (default $root.Chart.AppVersion $root.Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Secret names: the existingSecret when given, else <fullname>-<suffix>. */}}
{{- define "fibemrss.tlsSecretName" -}}
{{- $t := index .root.Values.tls .c.key }}
{{- default (printf "%s-%s-tls" (include "fibemrss.fullname" .root) .c.name) $t.existingSecret }}
{{- end }}

{{/* The certificate identity (common name) a component's TLS Secret must hold, e.g.
gateway@cleveland or aggregator@central; call with (dict "root" $ "c" $component). */}}
{{- define "fibemrss.tlsIdentity" -}}
{{- printf "%s@%s" .c.identity (ternary "central" .root.Values.hospital.name (eq .c.name "aggregator")) }}
{{- end }}

{{- define "fibemrss.databaseSecretName" -}}
{{- default (printf "%s-database" (include "fibemrss.fullname" .)) .Values.database.existingSecret }}
{{- end }}

{{- define "fibemrss.pseudonymSecretName" -}}
{{- default (printf "%s-pseudonym-key" (include "fibemrss.fullname" .)) .Values.pseudonymKey.existingSecret }}
{{- end }}

{{/* Which HE context a component mounts: hospital-agent the hospital one, the aggregator the
public one, the others none. Call with (dict "root" $ "c" $component). */}}
{{- define "fibemrss.heContext" -}}
{{- if eq .c.name "hospital-agent" }}hospital{{ else if eq .c.name "aggregator" }}aggregator{{ end }}
{{- end }}

{{- define "fibemrss.heSecretName" -}}
{{- $which := .which }}
{{- $he := index .root.Values.heContext $which }}
{{- default (printf "%s-he-%s" (include "fibemrss.fullname" .root) $which) $he.existingSecret }}
{{- end }}

{{- define "fibemrss.postgresqlSecretName" -}}
{{- default (printf "%s-postgresql" (include "fibemrss.fullname" .)) .Values.postgresql.existingSecret }}
{{- end }}

{{/* DATABASE_URL of the bundled PostgreSQL (postgresql.enabled with an inline password). */}}
{{- define "fibemrss.bundledDatabaseUrl" -}}
{{- $pg := .Values.postgresql }}
{{- printf "postgresql://%s:%s@%s-postgresql:5432/%s" $pg.user (urlquery $pg.password) (include "fibemrss.fullname" .) $pg.database }}
{{- end }}

{{/* The Secret holding a component's own DATABASE_URL (its login, member of
fibemrss_<identity>); call with (dict "root" $ "c" $component). */}}
{{- define "fibemrss.roleDatabaseSecretName" -}}
{{- $r := index .root.Values.database.roles .c.key }}
{{- default (printf "%s-database-%s" (include "fibemrss.fullname" .root) .c.name) $r.existingSecret }}
{{- end }}

{{/* A component's own URL on the bundled PostgreSQL (test clusters): login
<user>_<identity>_login (never a group role's name), its password derived from the bundled
one, so nothing more needs setting. */}}
{{- define "fibemrss.bundledRoleDatabaseUrl" -}}
{{- $pg := .root.Values.postgresql }}
{{- $login := printf "%s_%s_login" $pg.user .c.identity }}
{{- $password := printf "%s|%s" $pg.password .c.identity | sha256sum | trunc 32 }}
{{- printf "postgresql://%s:%s@%s-postgresql:5432/%s" $login $password (include "fibemrss.fullname" .root) $pg.database }}
{{- end }}

{{- define "fibemrss.agentSecretsKeySecretName" -}}
{{- default (printf "%s-agent-secrets-key" (include "fibemrss.fullname" .)) .Values.agentSecretsKey.existingSecret }}
{{- end }}

{{/* "1" when this release serves a console: the hospital's (emr-gateway) or the federation's
(aggregator), with console.enabled. */}}
{{- define "fibemrss.consoleOn" -}}
{{- if .Values.console.enabled }}1{{ end }}
{{- end }}

{{/* The component serving the console: emr-gateway at a hospital, the aggregator centrally. */}}
{{- define "fibemrss.consoleComponent" -}}
{{- if eq .Values.role "central" }}aggregator{{ else }}emr-gateway{{ end }}
{{- end }}

{{/* Where people reach the console: console.url, else https://<console.ingress.host>. */}}
{{- define "fibemrss.consoleUrl" -}}
{{- if .Values.console.url }}{{ .Values.console.url }}{{ else if .Values.console.ingress.host }}https://{{ .Values.console.ingress.host }}{{ end }}
{{- end }}

{{/*
The ConfigMap of the federation CA's revocation list (key crl.pem); empty: none given.
*/}}
{{- define "fibemrss.revocationListConfigMap" -}}
{{- $crl := .Values.tls.revocationList -}}
{{- if $crl.existingConfigMap -}}
{{- $crl.existingConfigMap -}}
{{- else if $crl.crlPem -}}
{{- include "fibemrss.fullname" . }}-revocation-list
{{- end -}}
{{- end }}
