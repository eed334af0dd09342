{{/*
Names, labels and the parsed pipeline configuration. Every template takes its names from here.
*/}}

{{- define "genai.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of object names: the release name, with "-genai" added unless it already says genai. */}}
{{- define "genai.fullname" -}}
{{- if contains "genai" .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-genai" .Release.Name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "genai.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable across upgrades. */}}
{{- define "genai.selectorLabels" -}}
app.kubernetes.io/name: {{ include "genai.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Standard labels; call with (dict "root" $ "component" "pod-launcher"). */}}
{{- define "genai.labels" -}}
{{- $root := .root -}}
helm.sh/chart: {{ include "genai.chart" $root }}
{{ include "genai.selectorLabels" $root }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
app.kubernetes.io/part-of: genai-pipelines
app.kubernetes.io/component: {{ .component }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The pipeline configuration (values/<cloud>/pipeline.yaml, passed with --set-file pipelineConfig=...)
as a dict. It is the one source of truth for the stage namespace, the stage service account, the
stage image, the GPU resource name and the spot node pools: this chart reads them from it instead
of repeating them. Missing keys take the defaults of dags/genai_dags/settings.py (a test keeps the
two in step).
*/}}
{{- define "genai.pipeline" -}}
{{- $parsed := dict -}}
{{- if .Values.pipelineConfig -}}
{{- $parsed = fromYaml .Values.pipelineConfig -}}
{{- end -}}
{{- $k := default dict (get $parsed "kubernetes") -}}
{{- $image := default dict (get $k "image") -}}
{{- $pools := default dict (get $k "node_pools") -}}
{{- $out := dict
  "error" (get $parsed "Error")
  "runtime" (default "local" (get $parsed "runtime"))
  "artifactRoot" (default "./artifacts" (get $parsed "artifact_root"))
  "namespace" (default "genai-stages" (get $k "namespace"))
  "serviceAccount" (default "genai-stage-runner" (get $k "service_account"))
  "imageRepository" (default "ghcr.io/genai-pipelines/stages" (get $image "repository"))
  "imageTag" (toString (default "0.1.0" (get $image "tag")))
  "imageDigest" (default "" (get $image "digest"))
  "imagePullPolicy" (default "IfNotPresent" (get $image "pull_policy"))
  "runAsUser" (default 10001 (get $k "run_as_user"))
  "gpuResource" (default "nvidia.com/gpu" (get $k "gpu_resource"))
  "labels" (default dict (get $k "labels"))
  "artifactVolumeClaim" (default "" (get $k "artifact_volume_claim"))
  "nodePools" $pools
  "stages" (default dict (get $parsed "stages"))
-}}
{{- toJson $out -}}
{{- end }}

{{/* The trainer's image exactly as the DAGs build it (settings.PipelineSettings.image_for):
     <repository>/trainer:<tag>, or the shared stage base <repository>@<digest> when a digest pins it. */}}
{{- define "genai.stageImage" -}}
{{- $p := include "genai.pipeline" . | fromJson -}}
{{- if $p.imageDigest -}}
{{- printf "%s@%s" $p.imageRepository $p.imageDigest -}}
{{- else -}}
{{- printf "%s/trainer:%s" $p.imageRepository $p.imageTag -}}
{{- end -}}
{{- end }}

{{- define "genai.airflowNamespace" -}}
{{- default .Release.Namespace .Values.airflow.namespace -}}
{{- end }}

{{/* Workload identity annotations of the stage service account, per cloud. */}}
{{- define "genai.workloadIdentityAnnotations" -}}
{{- $wi := .Values.workloadIdentity -}}
{{- if eq .Values.cloud "gke" }}
iam.gke.io/gcp-service-account: {{ $wi.gcpServiceAccount | quote }}
{{- else if and (eq .Values.cloud "eks") (eq $wi.awsMode "irsa") }}
eks.amazonaws.com/role-arn: {{ $wi.awsRoleArn | quote }}
{{- else if eq .Values.cloud "aks" }}
azure.workload.identity/client-id: {{ $wi.azureClientId | quote }}
{{- with $wi.azureTenantId }}
azure.workload.identity/tenant-id: {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}
