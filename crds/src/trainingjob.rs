//! `TrainingJob`: data-parallel fine-tuning of a BERT or ResNet classifier.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, EnvVar, ResourceRequirements, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::Architecture;

/// A data-parallel fine-tuning run: a gang of workers that train one model together and
/// average gradients with a ring all-reduce. The same file runs on one machine with
/// `ringmaster launch -f job.yaml`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "ringmaster.dev",
    version = "v1alpha1",
    kind = "TrainingJob",
    namespaced,
    status = "TrainingJobStatus",
    shortname = "tj",
    category = "ringmaster",
    category = "all",
    doc = "A data-parallel fine-tuning job: a gang of workers training one model with a ring all-reduce.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase", description = "Lifecycle phase"),
    printcolumn(name = "Workers", type_ = "string", json_path = ".status.workersReady", description = "Workers running / total"),
    printcolumn(name = "Epoch", type_ = "string", json_path = ".status.progress.epochDisplay", description = "Current epoch / total"),
    printcolumn(name = "Loss", type_ = "number", json_path = ".status.progress.loss", description = "Latest training loss"),
    printcolumn(name = "Accuracy", type_ = "number", json_path = ".status.progress.validationAccuracy", description = "Latest validation accuracy"),
    printcolumn(name = "Restarts", type_ = "integer", json_path = ".status.restarts", priority = 1),
    printcolumn(name = "Samples/s", type_ = "number", json_path = ".status.progress.samplesPerSecond", priority = 1),
    printcolumn(name = "Model", type_ = "string", json_path = ".spec.model.source", priority = 1),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp"),
    validation = Rule::new(
        "!has(oldSelf.status) || !has(oldSelf.status.phase) || !(oldSelf.status.phase in ['Running', 'Restarting']) || (self.spec.model == oldSelf.spec.model && self.spec.data == oldSelf.spec.data && self.spec.training == oldSelf.spec.training && self.spec.distribution == oldSelf.spec.distribution)"
    ).message("spec.model, spec.data, spec.training and spec.distribution are immutable while the job is Running; set spec.runPolicy.suspend: true first, or create a new job").reason(Reason::FieldValueForbidden),
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.model.architecture == 'bert' ? self.data.format in ['csv', 'tsv', 'jsonl'] : self.data.format in ['imagefolder', 'idx']").message("spec.data.format must be csv, tsv or jsonl for bert and imagefolder or idx for resnet").field_path(".data.format"))]
#[x_kube(validation = Rule::new("!has(self.data.augmentation) || self.model.architecture == 'resnet'").message("spec.data.augmentation applies only to image models (spec.model.architecture: resnet)").field_path(".data.augmentation"))]
#[x_kube(validation = Rule::new("!has(self.model.layers) || self.model.architecture == 'bert'").message("spec.model.layers (a BERT student's layer count) applies only to bert").field_path(".model.layers"))]
#[x_kube(validation = Rule::new("!self.model.source.startsWith('random:') || (self.model.architecture == 'resnet' && self.model.source.matches('^random:resnet-?(18|34|50|101|152)$'))").message("spec.model.source random:resnetN (18, 34, 50, 101 or 152) initialises a resnet from scratch; bert starts from pretrained weights").field_path(".model.source"))]
#[x_kube(validation = Rule::new("!has(self.training.distillation) || !self.training.distillation.teacher.startsWith('random:')").message("spec.training.distillation.teacher needs trained weights, not random:").field_path(".training.distillation.teacher"))]
pub struct TrainingJobSpec {
    /// The model to fine-tune.
    pub model: ModelSpec,
    /// Where the training and validation data live and how to read them.
    pub data: DataSpec,
    /// Optimisation hyperparameters.
    #[serde(default)]
    pub training: TrainingSpec,
    /// How many workers, GPUs and processes, and which collective backend.
    #[serde(default)]
    pub distribution: DistributionSpec,
    /// Container image running the `ringmaster` trainer.
    #[serde(default = "default_image")]
    #[schemars(length(min = 1, max = 512))]
    pub image: String,
    /// CPU and memory for each worker container; GPUs come from `distribution.gpusPerWorker`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Volumes added to every worker pod (datasets, model caches, the output PVC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub volumes: Vec<Volume>,
    /// Where those volumes are mounted in the trainer container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub volume_mounts: Vec<VolumeMount>,
    /// Additions to every worker pod.
    #[serde(default)]
    pub template: PodOverlay,
    /// Where checkpoints, metrics and the best model are written.
    #[serde(default)]
    pub output: OutputSpec,
    /// Restarts, deadlines, clean-up and suspension.
    #[serde(default)]
    pub run_policy: RunPolicy,
    /// How the gang is placed.
    #[serde(default)]
    pub scheduling: SchedulingSpec,
}

fn default_image() -> String {
    format!(
        "ghcr.io/ringmaster-dev/ringmaster:{}",
        env!("CARGO_PKG_VERSION")
    )
}

/// The model to fine-tune and its classification head.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.numClasses) || (has(self.labels) && size(self.labels) > 0)").message("set spec.model.numClasses or spec.model.labels"))]
#[x_kube(validation = Rule::new("!has(self.numClasses) || !has(self.labels) || size(self.labels) == 0 || size(self.labels) == self.numClasses").message("spec.model.labels must have exactly numClasses entries"))]
pub struct ModelSpec {
    /// Model family: `bert` (text classification) or `resnet` (image classification).
    pub architecture: Architecture,
    /// Pretrained weights: `hf://org/name[@revision]` (Hugging Face layout, from the local
    /// cache or `HF_HOME`, downloaded when missing), a directory path (local or on a
    /// mounted PVC) holding `model.safetensors` (+ `config.json`), an earlier run's output
    /// directory, or `random:resnet18` (34, 50, 101, 152) to train a ResNet from scratch.
    #[x_kube(validation = Rule::new("self.startsWith('hf://') ? self.matches('^hf://[A-Za-z0-9._-]+/[A-Za-z0-9._-]+(@[A-Za-z0-9._/-]+)?$') : size(self) > 0").message("spec.model.source must be hf://org/name[@revision] or a path"))]
    #[schemars(length(min = 1, max = 1024))]
    pub source: String,
    /// Number of output classes of the new head. May be left out when `labels` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 100000))]
    pub num_classes: Option<u32>,
    /// Class names, in label-index order. Dataset labels may be these names or indices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 100000))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub labels: Vec<String>,
    /// Parameter-name patterns (`*` wildcard, e.g. `embeddings.*`, `encoder.layer.0.*`)
    /// to freeze: they receive no gradient and are not all-reduced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub freeze: Vec<String>,
    /// How BERT turns token states into one vector: `cls` (pooler, like Hugging Face
    /// `BertForSequenceClassification`) or `mean` (mean over non-padding tokens).
    #[serde(default)]
    pub pooling: Pooling,
    /// Keep only the first this many encoder layers of a BERT source (a smaller student
    /// for distillation); all of them when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 128))]
    pub layers: Option<u32>,
}

/// Sentence pooling for BERT classification.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    #[default]
    Cls,
    Mean,
}

/// Dataset locations and format.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSpec {
    /// Training data: a file (csv/tsv/jsonl/idx) or a directory (imagefolder), local or on a
    /// mounted volume.
    #[schemars(length(min = 1, max = 1024))]
    pub train: String,
    /// Validation data in the same format. When left out, `validationSplit` of the training
    /// data is held out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 1024))]
    pub validation: Option<String>,
    /// Fraction of the training data held out for validation when `validation` is not set.
    #[serde(default = "default_validation_split")]
    #[schemars(range(min = 0.0, max = 0.5))]
    pub validation_split: f64,
    /// File format: `csv`, `tsv`, `jsonl` (text) or `imagefolder`, `idx` (images).
    pub format: DataFormat,
    /// Column or JSON key holding the text.
    #[serde(default = "default_text_field")]
    #[schemars(length(min = 1, max = 256))]
    pub text_field: String,
    /// Column or JSON key holding the label (a class name or index).
    #[serde(default = "default_label_field")]
    #[schemars(length(min = 1, max = 256))]
    pub label_field: String,
    /// Whether csv/tsv files start with a header row naming the fields.
    #[serde(default = "default_true")]
    pub header: bool,
    /// Side of the square images fed to the model, in pixels.
    #[serde(default = "default_image_size")]
    #[schemars(range(min = 8, max = 1024))]
    pub image_size: u32,
    /// Random augmentation of training images (image models only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<Augmentation>,
}

fn default_validation_split() -> f64 {
    0.1
}
fn default_text_field() -> String {
    "text".into()
}
fn default_label_field() -> String {
    "label".into()
}
fn default_true() -> bool {
    true
}
fn default_image_size() -> u32 {
    224
}

/// Dataset file formats.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    Csv,
    Tsv,
    Jsonl,
    Imagefolder,
    Idx,
}

/// Training-time image augmentation.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Augmentation {
    /// Random-resized-crop scale range lower bound (1.0 turns cropping off).
    #[serde(default = "default_crop_scale")]
    #[schemars(range(min = 0.05, max = 1.0))]
    pub min_crop_scale: f64,
    /// Flip images left-right with probability 0.5.
    #[serde(default = "default_true")]
    pub horizontal_flip: bool,
    /// Maximum relative brightness/contrast jitter (0 turns it off).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub color_jitter: f64,
    /// Rotate by a random angle of at most this many degrees either way (0 turns it off).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 45.0))]
    pub max_rotation_degrees: f64,
}

fn default_crop_scale() -> f64 {
    0.08
}

/// Optimisation hyperparameters.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.warmupRatio) || !has(self.warmupSteps)").message("set at most one of spec.training.warmupSteps and spec.training.warmupRatio"))]
#[x_kube(validation = Rule::new("self.learningRate > 0.0").message("spec.training.learningRate must be greater than 0").field_path(".learningRate"))]
pub struct TrainingSpec {
    /// Passes over the training data.
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1, max = 100000))]
    pub epochs: u32,
    /// Examples per worker process per step (the global batch is this x world size x
    /// gradientAccumulationSteps).
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 65536))]
    pub batch_size: u32,
    /// Peak learning rate.
    #[serde(default = "default_learning_rate")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub learning_rate: f64,
    /// `adamw` (decoupled weight decay, no decay on biases and norms) or `sgd` (with momentum).
    #[serde(default)]
    pub optimizer: Optimizer,
    /// Momentum for `sgd`.
    #[serde(default = "default_momentum")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub momentum: f64,
    /// Learning-rate schedule after warm-up: `constant`, `linear` decay to 0, or `cosine`.
    #[serde(default)]
    pub schedule: Schedule,
    /// Warm-up steps (linear from 0 to the peak learning rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100000000))]
    pub warmup_steps: Option<u64>,
    /// Warm-up as a fraction of all steps (alternative to warmupSteps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub warmup_ratio: Option<f64>,
    /// Decoupled weight decay.
    #[serde(default = "default_weight_decay")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value; 0 turns clipping off.
    #[serde(default = "default_max_grad_norm")]
    #[schemars(range(min = 0.0, max = 1000000.0))]
    pub max_grad_norm: f64,
    /// Micro-batches accumulated before each optimizer step.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1, max = 4096))]
    pub gradient_accumulation_steps: u32,
    /// Tokens per text example (longer texts are truncated). BERT only.
    #[serde(default = "default_max_seq_length")]
    #[schemars(range(min = 8, max = 512))]
    pub max_sequence_length: u32,
    /// Seed for initialisation, shuffling, dropout and augmentation.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Compute precision: `f32`, or `bf16` (bf16 compute with f32 master weights, GPU).
    #[serde(default)]
    pub precision: Precision,
    /// Save a checkpoint every this many optimizer steps (0: at the end of every epoch).
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000000))]
    pub checkpoint_interval_steps: u64,
    /// What to do when the loss or a gradient is NaN/Inf: `fail` (stop, naming the step and
    /// tensor) or `skip` (drop the step with a warning).
    #[serde(default)]
    pub non_finite: NonFinitePolicy,
    /// Knowledge distillation from a teacher model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distillation: Option<Distillation>,
    /// Counter class imbalance: `none`, `lossWeights` (each class weighs
    /// n / (classes x its count) in the loss) or `oversample` (every epoch draws examples
    /// with replacement, each class equally likely).
    #[serde(default)]
    pub class_balance: ClassBalance,
    /// Also evaluate every this many optimizer steps (0: only at the end of each epoch).
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000000))]
    pub eval_interval_steps: u64,
}

/// Class-imbalance handling.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ClassBalance {
    #[default]
    None,
    LossWeights,
    Oversample,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every training field has a default")
    }
}

fn default_epochs() -> u32 {
    3
}
fn default_batch_size() -> u32 {
    32
}
fn default_learning_rate() -> f64 {
    5e-5
}
fn default_momentum() -> f64 {
    0.9
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_max_grad_norm() -> f64 {
    1.0
}
fn default_one() -> u32 {
    1
}
fn default_max_seq_length() -> u32 {
    128
}
fn default_seed() -> u64 {
    42
}

/// Optimizers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Optimizer {
    #[default]
    Adamw,
    Sgd,
}

/// Learning-rate schedules.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    #[default]
    Linear,
    Cosine,
}

/// Compute precision.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

/// Handling of NaN/Inf losses and gradients.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    #[default]
    Fail,
    Skip,
}

/// Distillation: the student also matches a teacher's softened predictions.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Distillation {
    /// Teacher weights, same forms as `spec.model.source`; same architecture and labels.
    #[schemars(length(min = 1, max = 1024))]
    pub teacher: String,
    /// Softmax temperature applied to both teacher and student logits.
    #[serde(default = "default_temperature")]
    #[schemars(range(min = 0.1, max = 100.0))]
    pub temperature: f64,
    /// Weight of the distillation loss (1 - alpha weighs the label loss).
    #[serde(default = "default_alpha")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub alpha: f64,
}

fn default_temperature() -> f64 {
    2.0
}
fn default_alpha() -> f64 {
    0.5
}

/// Workers, devices and the collective backend.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.backend != 'nccl' || self.gpusPerWorker > 0").message("spec.distribution.backend nccl needs spec.distribution.gpusPerWorker >= 1").field_path(".backend"))]
#[x_kube(validation = Rule::new("self.gpusPerWorker == 0 || self.processesPerWorker <= self.gpusPerWorker").message("spec.distribution.processesPerWorker cannot exceed gpusPerWorker: NCCL runs one process per GPU").field_path(".processesPerWorker"))]
pub struct DistributionSpec {
    /// Worker pods in the gang (all scheduled together or not at all).
    #[serde(default = "default_one_i32")]
    #[schemars(range(min = 1, max = 4096))]
    pub workers: i32,
    /// `nvidia.com/gpu` per worker pod; 0 trains on CPUs.
    #[serde(default)]
    #[schemars(range(min = 0, max = 64))]
    pub gpus_per_worker: i32,
    /// Trainer processes (ranks) per worker pod, normally one per GPU.
    #[serde(default = "default_one_i32")]
    #[schemars(range(min = 1, max = 64))]
    pub processes_per_worker: i32,
    /// Gradient all-reduce: `auto` (NCCL with GPUs, TCP ring without), `nccl` or `tcp`.
    #[serde(default)]
    pub backend: Backend,
    /// Port of the rendezvous store served by rank 0 (`MASTER_PORT`).
    #[serde(default = "default_master_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub master_port: i32,
}

impl Default for DistributionSpec {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({}))
            .expect("every distribution field has a default")
    }
}

fn default_one_i32() -> i32 {
    1
}
fn default_master_port() -> i32 {
    29500
}

/// Collective backends.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    #[default]
    Auto,
    Nccl,
    Tcp,
}

/// Additions merged into every worker pod.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverlay {
    /// Extra environment variables for the trainer container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 128))]
    pub env: Vec<EnvVar>,
    /// Node labels a worker's node must have.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints the workers tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub tolerations: Vec<Toleration>,
    /// Node and pod affinity rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Extra pod annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra pod labels (ringmaster's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Service account the workers run as (default: a per-job account ringmaster creates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
}

/// Output location.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputSpec {
    /// Directory for checkpoints, `metrics.jsonl` and `best/`; put it on a shared volume to
    /// keep it after the pods are gone.
    #[serde(default = "default_output_path")]
    #[schemars(length(min = 1, max = 1024))]
    pub path: String,
    /// How many recent checkpoints to keep besides the best one.
    #[serde(default = "default_keep_checkpoints")]
    #[schemars(range(min = 1, max = 1000))]
    pub keep_checkpoints: u32,
    /// The validation metric that picks the model kept in `best/`: `accuracy`, `macroF1`
    /// or `loss` (lowest wins).
    #[serde(default)]
    pub best_metric: BestMetric,
}

impl Default for OutputSpec {
    fn default() -> Self {
        Self {
            path: default_output_path(),
            keep_checkpoints: default_keep_checkpoints(),
            best_metric: BestMetric::default(),
        }
    }
}

/// Validation metrics that can rank evaluations.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BestMetric {
    #[default]
    Accuracy,
    #[serde(rename = "macroF1")]
    MacroF1,
    Loss,
}

fn default_output_path() -> String {
    "/output".into()
}
fn default_keep_checkpoints() -> u32 {
    3
}

/// Restart, deadline and clean-up behaviour.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunPolicy {
    /// On a worker failure: `Never` fails the job; `OnFailure` restarts the whole gang;
    /// `ExitCode` restarts it only for retryable exit codes (128-255: killed by a signal,
    /// e.g. preemption or OOM) and fails on 1-127 (a bug or bad input).
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Gang restarts allowed before the job is Failed.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 1000))]
    pub backoff_limit: i32,
    /// Seconds the job may run (from its first start) before it is Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub active_deadline_seconds: Option<i64>,
    /// Delete the job this many seconds after it Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Pods deleted when the job finishes: `All`, `Running` (the ones still running), `None`.
    #[serde(default)]
    pub clean_pod_policy: CleanPodPolicy,
    /// `true` removes the worker pods and keeps the job; `false` recreates them.
    #[serde(default)]
    pub suspend: bool,
}

impl Default for RunPolicy {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every runPolicy field has a default")
    }
}

fn default_backoff_limit() -> i32 {
    3
}

/// Worker failure handling.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum RestartPolicy {
    Never,
    #[default]
    OnFailure,
    ExitCode,
}

/// Pods deleted at the end of a job.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum CleanPodPolicy {
    All,
    #[default]
    Running,
    None,
}

/// Gang placement preferences.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.requiredTopologyKey) || !has(self.preferredTopologyKey)").message("set at most one of spec.scheduling.requiredTopologyKey and preferredTopologyKey"))]
pub struct SchedulingSpec {
    /// Scheduler for the worker pods; `ringmaster-scheduler` places the gang all-or-nothing.
    #[serde(default = "default_scheduler_name")]
    #[schemars(length(min = 1, max = 253))]
    pub scheduler_name: String,
    /// PriorityClass of the worker pods (higher goes first in the gang queue).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// `pack` fills busy nodes first (keeps whole nodes free for big jobs); `spread`
    /// balances load (least allocated node first).
    #[serde(default)]
    pub placement: PlacementPolicy,
    /// All workers must land in one domain of this node label (e.g.
    /// `topology.kubernetes.io/zone` or `ringmaster.dev/rack`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317))]
    pub required_topology_key: Option<String>,
    /// Prefer the fewest domains of this node label, but accept more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 317))]
    pub preferred_topology_key: Option<String>,
}

impl Default for SchedulingSpec {
    fn default() -> Self {
        serde_json::from_value(serde_json::json!({})).expect("every scheduling field has a default")
    }
}

fn default_scheduler_name() -> String {
    crate::keys::SCHEDULER_NAME.into()
}

/// Node-choice policies.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PlacementPolicy {
    #[default]
    Pack,
    Spread,
}

/// Observed state of a TrainingJob.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// Pending, Running, Restarting, Succeeded, Failed or Suspended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,
    /// Created, Scheduled, Running, Restarting, Succeeded, Failed, Suspended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// "running/total" workers, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workers_ready: Option<String>,
    /// Worker pods by state.
    #[serde(default)]
    pub workers: WorkerCounts,
    /// Whole-gang restarts so far.
    #[serde(default)]
    pub restarts: i32,
    /// When the workers first all ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Live training progress reported by rank 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The generation the operator last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Job lifecycle phases.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum JobPhase {
    Pending,
    Running,
    Restarting,
    Succeeded,
    Failed,
    Suspended,
}

impl JobPhase {
    pub fn is_finished(self) -> bool {
        matches!(self, JobPhase::Succeeded | JobPhase::Failed)
    }
}

/// Worker pods by state.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkerCounts {
    #[serde(default)]
    pub pending: i32,
    #[serde(default)]
    pub running: i32,
    #[serde(default)]
    pub succeeded: i32,
    #[serde(default)]
    pub failed: i32,
}

/// Training progress, written by the trainer while it runs.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Current epoch (1-based).
    #[serde(default)]
    pub epoch: u32,
    /// Epochs in the run.
    #[serde(default)]
    pub total_epochs: u32,
    /// "epoch/total", for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_display: Option<String>,
    /// Optimizer steps taken.
    #[serde(default)]
    pub step: u64,
    /// Optimizer steps in the run.
    #[serde(default)]
    pub total_steps: u64,
    /// Latest training loss (running mean over the last reporting interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Accuracy on the validation set at the last evaluation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_accuracy: Option<f64>,
    /// Training throughput over all ranks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_second: Option<f64>,
    /// Gradient all-reduce bus bandwidth (nccl-tests definition), GB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allreduce_bus_bandwidth_gbps: Option<f64>,
    /// Path of the best model so far (by `spec.output.bestMetric`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_checkpoint: Option<String>,
    /// The all-reduce ring as the trainer built it: ranks in ring order, grouped by
    /// location (`0,2,1,3 (z1/node-a: 0,2 | z1/node-b: 1,3)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_order: Option<String>,
    /// When the trainer last reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_update_time: Option<Time>,
}

impl TrainingJobSpec {
    /// Ranks in the job: workers x processes per worker.
    pub fn world_size(&self) -> i32 {
        self.distribution.workers * self.distribution.processes_per_worker
    }

    /// Number of classes of the head: `numClasses`, or the number of labels.
    pub fn num_classes(&self) -> usize {
        self.model
            .num_classes
            .map(|n| n as usize)
            .unwrap_or(self.model.labels.len())
    }
}
