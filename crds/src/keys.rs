//! Label, annotation and environment names shared by the operator, the scheduler and the
//! trainer (the contracts in DESIGN.md).

/// `app.kubernetes.io/managed-by: ringmaster` on every child object.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_VALUE: &str = "ringmaster";
/// The owning TrainingJob's name.
pub const JOB_NAME: &str = "ringmaster.dev/job-name";
/// The owning InferenceService's name, on its Deployment, Service, autoscaler and serving
/// pods (the Deployment's and the Service's selector).
pub const INFERENCE_SERVICE: &str = "ringmaster.dev/inference-service";
/// Pod-template annotation of serving pods: the model they serve, so that a new model
/// version rolls the Deployment.
pub const MODEL_VERSION: &str = "ringmaster.dev/model-version";
/// A worker's index in its gang (its pod is `<job>-worker-<index>`).
pub const REPLICA_INDEX: &str = "ringmaster.dev/replica-index";
/// Which gang restart created a pod, so pods of an older attempt are recognised.
pub const ATTEMPT: &str = "ringmaster.dev/attempt";
/// Gang membership: pods with the same value are placed all-or-nothing.
pub const GANG: &str = "ringmaster.dev/gang";
/// Annotation: how many members the gang has.
pub const GANG_SIZE: &str = "ringmaster.dev/gang-size";
/// Annotation: `pack` or `spread`.
pub const PLACEMENT: &str = "ringmaster.dev/placement";
/// Annotation: all gang members in one domain of this node label.
pub const REQUIRED_TOPOLOGY_KEY: &str = "ringmaster.dev/required-topology-key";
/// Annotation: the gang prefers the fewest domains of this node label.
pub const PREFERRED_TOPOLOGY_KEY: &str = "ringmaster.dev/preferred-topology-key";
/// Annotation written by the scheduler: GPU indices chosen on the node, e.g. `0,1`.
pub const GPU_INDICES: &str = "ringmaster.dev/gpu-indices";
/// Annotation: a fractional GPU request in milli-GPU (one GPU shared).
pub const GPU_MILLI: &str = "ringmaster.dev/gpu-milli";
/// Scheduling gate held on every worker pod until the whole gang exists.
pub const GANG_GATE: &str = "ringmaster.dev/gang-complete";
/// The ringmaster scheduler (gang placement, GPU-aware policies); training and serving pods
/// name it.
pub const SCHEDULER_NAME: &str = "ringmaster-scheduler";
/// Extended resource for GPUs.
pub const GPU_RESOURCE: &str = "nvidia.com/gpu";
/// Name of the trainer container in worker pods.
pub const TRAINER_CONTAINER: &str = "trainer";
/// Where the job spec ConfigMap is mounted in worker pods.
pub const SPEC_MOUNT_DIR: &str = "/etc/ringmaster";
/// File name of the job spec inside the ConfigMap and the mount.
pub const SPEC_FILE: &str = "trainingjob.yaml";
/// Key of the rendezvous token in the per-job Secret; exported as `RINGMASTER_TOKEN`.
pub const TOKEN_KEY: &str = "token";
pub const TOKEN_ENV: &str = "RINGMASTER_TOKEN";
/// Field manager the trainer uses for `status.progress` (the operator never writes it).
pub const TRAINER_FIELD_MANAGER: &str = "ringmaster-trainer";
/// Node label of the zone, copied onto bound pods as `ZONE_ANNOTATION`.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// Node label of the rack (the one topology keys name for racks), copied onto bound pods
/// as `RACK_ANNOTATION`.
pub const RACK_LABEL: &str = "ringmaster.dev/rack";
/// Pod annotations written at bind time; the worker pods read them through the downward
/// API (`RINGMASTER_ZONE`, `RINGMASTER_RACK`) so the trainer's ring follows placement.
pub const ZONE_ANNOTATION: &str = "ringmaster.dev/zone";
pub const RACK_ANNOTATION: &str = "ringmaster.dev/rack";
