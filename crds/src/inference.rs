//! `InferenceService`: serves a fine-tuned classifier over HTTP with batching and autoscaling.

use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::common::Architecture;

/// An HTTP endpoint serving a classifier, often the best checkpoint of a TrainingJob.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ringmaster.dev",
    version = "v1alpha1",
    kind = "InferenceService",
    namespaced,
    status = "InferenceServiceStatus",
    shortname = "isvc",
    category = "ringmaster",
    category = "all",
    doc = "Serves a fine-tuned classifier over HTTP with dynamic batching and autoscaling.",
    scale = r#"{"specReplicasPath":".spec.replicas.min","statusReplicasPath":".status.replicas"}"#,
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason"
    ),
    printcolumn(
        name = "Replicas",
        type_ = "string",
        json_path = ".status.replicasDisplay",
        description = "Ready replicas / desired"
    ),
    printcolumn(name = "Model", type_ = "string", json_path = ".status.modelVersion"),
    printcolumn(name = "URL", type_ = "string", json_path = ".status.url"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceServiceSpec {
    /// What to serve.
    pub model: ServedModel,
    /// Replica bounds for the autoscaler.
    #[serde(default)]
    pub replicas: ReplicaRange,
    /// When to add or remove replicas.
    #[serde(default)]
    pub autoscaling: Autoscaling,
    /// Dynamic batching of concurrent requests.
    #[serde(default)]
    pub batching: Batching,
    /// Deprecated and ignored: every replica serves v2, v1 and `/predict` at once.
    #[serde(default)]
    pub protocol: Protocol,
    /// `nvidia.com/gpu` per replica; 0 serves on CPUs.
    #[serde(default)]
    #[schemars(range(min = 0, max = 8))]
    pub gpus: i32,
    /// CPU and memory per replica.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Container image running `ringmaster serve`.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// Container port of the HTTP server.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Node labels a replica's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the replicas tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,
}

fn default_image() -> String {
    format!(
        "ghcr.io/ringmaster-dev/ringmaster:{}",
        env!("CARGO_PKG_VERSION")
    )
}
fn default_port() -> i32 {
    8080
}

/// The served model: a weights directory, or the best checkpoint of a TrainingJob.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.source) != has(self.trainingJobRef)").message("set exactly one of spec.model.source and spec.model.trainingJobRef"))]
pub struct ServedModel {
    /// Model family: `bert` or `resnet`.
    pub architecture: Architecture,
    /// Weights: `hf://org/name[@revision]` or a directory with `model.safetensors` + `config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub source: Option<String>,
    /// Serve the best checkpoint of this TrainingJob (same namespace); the service rolls to
    /// a new version when the job reports a better one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_job_ref: Option<TrainingJobRef>,
    /// Class names in index order, returned instead of indices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100000))]
    pub labels: Vec<String>,
}

/// A TrainingJob in the same namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobRef {
    /// The TrainingJob's name.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Replica bounds.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.min <= self.max").message("spec.replicas.min must be <= spec.replicas.max"))]
pub struct ReplicaRange {
    /// Fewest replicas. 0 runs as 1: the HorizontalPodAutoscaler scales to zero only with
    /// the HPAScaleToZero feature gate, which clusters do not enable by default.
    #[serde(default = "default_one")]
    #[schemars(range(min = 0, max = 1000))]
    pub min: i32,
    /// Most replicas.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 1000))]
    pub max: i32,
}

impl Default for ReplicaRange {
    fn default() -> Self {
        Self { min: 1, max: 1 }
    }
}

fn default_one() -> i32 {
    1
}

/// Autoscaling target, used when `replicas.min < replicas.max` (a HorizontalPodAutoscaler).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Autoscaling {
    /// `concurrency`: in-flight requests per replica (the Pods metric
    /// `ringmaster_serve_in_flight_requests`); `rps`: requests per second per replica (the Pods
    /// metric `ringmaster_serve_requests_per_second`, a rate of
    /// `ringmaster_serve_requests_total`). Both come from the replicas' `/metrics` through a
    /// custom-metrics adapter such as prometheus-adapter, which the cluster must run. `cpu`:
    /// CPU use in percent of the replica's CPU request (metrics-server; set
    /// `resources.requests.cpu`).
    #[serde(default)]
    pub metric: ScalingMetric,
    /// Target value of the metric per replica (for `cpu`, percent of the CPU request).
    #[serde(default = "default_target")]
    #[schemars(range(min = 0.1, max = 100000.0))]
    pub target: f64,
    /// Seconds of low load before scaling down (the autoscaler's scale-down stabilization
    /// window).
    #[serde(default = "default_scale_down_delay")]
    #[schemars(range(min = 0, max = 86400))]
    pub scale_down_delay_seconds: i32,
}

impl Default for Autoscaling {
    fn default() -> Self {
        Self {
            metric: ScalingMetric::default(),
            target: default_target(),
            scale_down_delay_seconds: default_scale_down_delay(),
        }
    }
}

fn default_target() -> f64 {
    8.0
}
fn default_scale_down_delay() -> i32 {
    300
}

/// Autoscaling metrics.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ScalingMetric {
    #[default]
    Concurrency,
    Rps,
    Cpu,
}

/// Dynamic batching.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Batching {
    /// Most requests run through the model together.
    #[serde(default = "default_max_batch")]
    #[schemars(range(min = 1, max = 1024))]
    pub max_batch_size: u32,
    /// Longest a request waits for others to join its batch, in milliseconds.
    #[serde(default = "default_max_delay")]
    #[schemars(range(min = 0, max = 10000))]
    pub max_delay_ms: u32,
}

impl Default for Batching {
    fn default() -> Self {
        Self {
            max_batch_size: default_max_batch(),
            max_delay_ms: default_max_delay(),
        }
    }
}

fn default_max_batch() -> u32 {
    32
}
fn default_max_delay() -> u32 {
    5
}

/// Wire protocols. Deprecated: every `ringmaster serve` replica speaks the Open Inference
/// Protocol v2, KServe v1 and `POST /predict` at once, so this field is ignored (kept so
/// that existing objects stay valid; to be dropped in v1beta1).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// `POST /predict {"text": ...}` → `{"label", "score"}` (and `{"instances": [...]}`).
    #[default]
    Ringmaster,
    /// The KServe / Open Inference Protocol v2 (`/v2/models/{name}/infer`).
    KserveV2,
}

/// Observed state of an InferenceService.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct InferenceServiceStatus {
    /// In-cluster URL of the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Replicas that pass their readiness probe.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Replicas wanted now.
    #[serde(default)]
    pub replicas: i32,
    /// "ready/desired", for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas_display: Option<String>,
    /// The model being served (checkpoint path or source with revision).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
    /// Ready, ModelResolved, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// The generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}
