//! Pure builders: a TrainingJob in, the Kubernetes objects that run it out.
//!
//! Names are deterministic (`<job>-worker-<i>`, `<job>`, `<job>-spec`...), so a restarted
//! operator re-derives the same objects and never duplicates them.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMap, ConfigMapVolumeSource, Container, EnvVar, EnvVarSource, ObjectFieldSelector, Pod,
    PodSchedulingGate, PodSpec, SecretKeySelector, Service, ServiceAccount, ServicePort,
    ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use ringmaster_crds::keys::*;
use ringmaster_crds::{PlacementPolicy, TrainingJob};

use ringmaster_crds::keys::{RACK_ANNOTATION, ZONE_ANNOTATION};

use crate::pod::resources_with_gpus;

/// Everything a job needs besides its worker pods (created once, before the pods).
pub struct SupportObjects {
    pub config_map: ConfigMap,
    pub service: Service,
    pub service_account: ServiceAccount,
    pub role: Role,
    pub role_binding: RoleBinding,
}

/// Identity of a job the builders need; taken from the object once.
pub struct JobRef<'a> {
    pub job: &'a TrainingJob,
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
}

impl<'a> JobRef<'a> {
    /// Fails only for objects without name, namespace or uid, which the API server never returns.
    pub fn new(job: &'a TrainingJob) -> Option<Self> {
        Some(Self {
            job,
            name: job.metadata.name.as_deref()?,
            namespace: job.metadata.namespace.as_deref()?,
            owner: job.controller_owner_ref(&())?,
        })
    }

    fn meta(&self, name: String, extra_labels: BTreeMap<String, String>) -> ObjectMeta {
        let mut labels = BTreeMap::from([
            (MANAGED_BY.to_string(), MANAGED_BY_VALUE.to_string()),
            (JOB_NAME.to_string(), self.name.to_string()),
        ]);
        labels.extend(extra_labels);
        ObjectMeta {
            name: Some(name),
            namespace: Some(self.namespace.to_string()),
            labels: Some(labels),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

pub fn worker_name(job: &str, index: i32) -> String {
    format!("{job}-worker-{index}")
}
pub fn spec_config_map_name(job: &str) -> String {
    format!("{job}-spec")
}
pub fn token_secret_name(job: &str) -> String {
    format!("{job}-token")
}
pub fn trainer_account_name(job: &str) -> String {
    format!("{job}-trainer")
}

/// Selects every pod of a job (all attempts).
pub fn pod_selector(job: &str) -> String {
    format!("{JOB_NAME}={job},{MANAGED_BY}={MANAGED_BY_VALUE}")
}

pub fn support_objects(job: &JobRef) -> SupportObjects {
    // The spec alone: status and server metadata change on every write and would churn
    // the ConfigMap (and the trainer reads only the spec).
    let file = TrainingJob {
        metadata: ObjectMeta {
            name: Some(job.name.to_string()),
            namespace: Some(job.namespace.to_string()),
            ..ObjectMeta::default()
        },
        spec: job.job.spec.clone(),
        status: None,
    };
    let spec_yaml = serde_yaml::to_string(&file).expect("a TrainingJob serialises to YAML");
    let config_map = ConfigMap {
        metadata: job.meta(spec_config_map_name(job.name), BTreeMap::new()),
        data: Some(BTreeMap::from([(SPEC_FILE.to_string(), spec_yaml)])),
        ..ConfigMap::default()
    };
    // Headless, and publishing not-ready addresses: rank 0 must be resolvable before it
    // is Ready, since readiness waits for the rendezvous it serves.
    let service = Service {
        metadata: job.meta(job.name.to_string(), BTreeMap::new()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(BTreeMap::from([(
                JOB_NAME.to_string(),
                job.name.to_string(),
            )])),
            ports: Some(vec![ServicePort {
                name: Some("rendezvous".into()),
                port: job.job.spec.distribution.master_port,
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };
    let account = trainer_account_name(job.name);
    let service_account = ServiceAccount {
        metadata: job.meta(account.clone(), BTreeMap::new()),
        automount_service_account_token: Some(true),
        ..ServiceAccount::default()
    };
    // Least privilege for live progress: the trainer may read its own job and patch its
    // status, nothing else (resourceNames pins the one object).
    let role = Role {
        metadata: job.meta(account.clone(), BTreeMap::new()),
        rules: Some(vec![
            PolicyRule {
                api_groups: Some(vec![ringmaster_crds::GROUP.into()]),
                resources: Some(vec!["trainingjobs/status".into()]),
                resource_names: Some(vec![job.name.to_string()]),
                verbs: vec!["get".into(), "patch".into()],
                ..PolicyRule::default()
            },
            PolicyRule {
                api_groups: Some(vec![ringmaster_crds::GROUP.into()]),
                resources: Some(vec!["trainingjobs".into()]),
                resource_names: Some(vec![job.name.to_string()]),
                verbs: vec!["get".into()],
                ..PolicyRule::default()
            },
        ]),
    };
    let role_binding = RoleBinding {
        metadata: job.meta(account.clone(), BTreeMap::new()),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "Role".into(),
            name: account.clone(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: account,
            namespace: Some(job.namespace.to_string()),
            ..Subject::default()
        }]),
    };
    SupportObjects {
        config_map,
        service,
        service_account,
        role,
        role_binding,
    }
}

/// The pod of worker `index` for gang attempt `attempt`. Pods start behind the gang
/// scheduling gate; the operator lifts it once all of the gang's pods exist, so no
/// scheduler ever sees half a gang.
pub fn worker_pod(job: &JobRef, index: i32, attempt: i32) -> Pod {
    let spec = &job.job.spec;
    let dist = &spec.distribution;
    let overlay = &spec.template;
    let pod_name = worker_name(job.name, index);

    let mut labels = overlay.labels.clone();
    labels.extend([
        (REPLICA_INDEX.to_string(), index.to_string()),
        (ATTEMPT.to_string(), attempt.to_string()),
        (GANG.to_string(), job.name.to_string()),
    ]);
    let mut meta = job.meta(pod_name.clone(), labels);
    let mut annotations = overlay.annotations.clone();
    annotations.insert(GANG_SIZE.into(), dist.workers.to_string());
    annotations.insert(
        PLACEMENT.into(),
        match spec.scheduling.placement {
            PlacementPolicy::Pack => "pack",
            PlacementPolicy::Spread => "spread",
        }
        .into(),
    );
    if let Some(key) = &spec.scheduling.required_topology_key {
        annotations.insert(REQUIRED_TOPOLOGY_KEY.into(), key.clone());
    }
    if let Some(key) = &spec.scheduling.preferred_topology_key {
        annotations.insert(PREFERRED_TOPOLOGY_KEY.into(), key.clone());
    }
    meta.annotations = Some(annotations);

    let mut env = rendezvous_env(job, index);
    env.push(EnvVar {
        name: TOKEN_ENV.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: token_secret_name(job.name),
                key: TOKEN_KEY.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    });
    env.extend(overlay.env.iter().cloned());

    let mut volumes = spec.volumes.clone();
    volumes.push(Volume {
        name: "ringmaster-spec".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: spec_config_map_name(job.name),
            ..ConfigMapVolumeSource::default()
        }),
        ..Volume::default()
    });
    let mut volume_mounts = spec.volume_mounts.clone();
    volume_mounts.push(VolumeMount {
        name: "ringmaster-spec".into(),
        mount_path: SPEC_MOUNT_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    });

    let container = Container {
        name: TRAINER_CONTAINER.into(),
        image: Some(spec.image.clone()),
        command: Some(vec!["ringmaster".into()]),
        args: Some(vec![
            "train".into(),
            "--config".into(),
            format!("{SPEC_MOUNT_DIR}/{SPEC_FILE}"),
        ]),
        env: Some(env),
        resources: resources_with_gpus(spec.resources.as_ref(), dist.gpus_per_worker),
        volume_mounts: Some(volume_mounts),
        ports: Some(vec![k8s_openapi::api::core::v1::ContainerPort {
            name: Some("rendezvous".into()),
            container_port: dist.master_port,
            ..Default::default()
        }]),
        ..Container::default()
    };

    Pod {
        metadata: meta,
        spec: Some(PodSpec {
            containers: vec![container],
            restart_policy: Some("Never".into()),
            hostname: Some(pod_name),
            subdomain: Some(job.name.to_string()),
            scheduler_name: Some(spec.scheduling.scheduler_name.clone()),
            priority_class_name: spec.scheduling.priority_class_name.clone(),
            scheduling_gates: Some(vec![PodSchedulingGate {
                name: GANG_GATE.into(),
            }]),
            service_account_name: Some(
                overlay
                    .service_account_name
                    .clone()
                    .unwrap_or_else(|| trainer_account_name(job.name)),
            ),
            node_selector: Some(overlay.node_selector.clone()).filter(|m| !m.is_empty()),
            tolerations: Some(overlay.tolerations.clone()).filter(|t| !t.is_empty()),
            affinity: overlay.affinity.clone(),
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
        ..Pod::default()
    }
}

/// PyTorch-compatible rendezvous variables. `RANK` is the first rank in the pod; with
/// several processes per worker the trainer starts `LOCAL_WORLD_SIZE` ranks from there.
/// The location variables come from the downward API, resolved when the container starts
/// (after the bind): the node name, and the zone and rack the scheduler annotated the pod
/// with (an empty string when it did not, which the trainer reads as unknown).
fn rendezvous_env(job: &JobRef, index: i32) -> Vec<EnvVar> {
    let dist = &job.job.spec.distribution;
    let var = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..EnvVar::default()
    };
    let field = |name: &str, path: String| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path,
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };
    let annotation = |key: &str| format!("metadata.annotations['{key}']");
    vec![
        var("RANK", (index * dist.processes_per_worker).to_string()),
        var("WORLD_SIZE", job.job.spec.world_size().to_string()),
        var("LOCAL_RANK", "0".into()),
        var("LOCAL_WORLD_SIZE", dist.processes_per_worker.to_string()),
        var("NODE_RANK", index.to_string()),
        var("NNODES", dist.workers.to_string()),
        var(
            "MASTER_ADDR",
            format!(
                "{}.{}.{}.svc",
                worker_name(job.name, 0),
                job.name,
                job.namespace
            ),
        ),
        var("MASTER_PORT", dist.master_port.to_string()),
        var("RINGMASTER_JOB", job.name.into()),
        var("RINGMASTER_NAMESPACE", job.namespace.into()),
        field("RINGMASTER_NODE_NAME", "spec.nodeName".into()),
        field("RINGMASTER_ZONE", annotation(ZONE_ANNOTATION)),
        field("RINGMASTER_RACK", annotation(RACK_ANNOTATION)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn job(yaml: &str) -> TrainingJob {
        let mut job: TrainingJob = serde_yaml::from_str(yaml).unwrap();
        job.metadata.namespace = Some("ml".into());
        job.metadata.uid = Some("uid-1".into());
        job
    }

    const BASE: &str = r#"
apiVersion: ringmaster.dev/v1alpha1
kind: TrainingJob
metadata: {name: spam}
spec:
  model: {architecture: bert, source: /models/minilm, numClasses: 2}
  data: {train: /data/train.csv, format: csv}
  distribution: {workers: 3, gpusPerWorker: 2, processesPerWorker: 2}
  template:
    env: [{name: EXTRA, value: "1"}]
    nodeSelector: {pool: a100}
    annotations: {team: nlp}
    labels: {ringmaster.dev/gang: overridden}
  scheduling: {requiredTopologyKey: topology.kubernetes.io/zone, placement: spread}
"#;

    fn env_of(pod: &Pod) -> BTreeMap<String, String> {
        pod.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|e| Some((e.name.clone(), e.value.clone()?)))
            .collect()
    }

    /// Variables from the downward API: name to field path.
    fn field_env_of(pod: &Pod) -> BTreeMap<String, String> {
        pod.spec.as_ref().unwrap().containers[0]
            .env
            .as_ref()
            .unwrap()
            .iter()
            .filter_map(|e| {
                let path = &e.value_from.as_ref()?.field_ref.as_ref()?.field_path;
                Some((e.name.clone(), path.clone()))
            })
            .collect()
    }

    #[test]
    fn worker_pod_carries_gang_rendezvous_and_gpu_contract() {
        let job = job(BASE);
        let job_ref = JobRef::new(&job).unwrap();
        let pod = worker_pod(&job_ref, 2, 1);
        let meta = &pod.metadata;
        assert_eq!(meta.name.as_deref(), Some("spam-worker-2"));
        let labels = meta.labels.as_ref().unwrap();
        assert_eq!(
            labels[GANG], "spam",
            "the gang label cannot be overridden by the overlay"
        );
        assert_eq!(labels[REPLICA_INDEX], "2");
        assert_eq!(labels[ATTEMPT], "1");
        assert_eq!(labels[MANAGED_BY], "ringmaster");
        let annotations = meta.annotations.as_ref().unwrap();
        assert_eq!(annotations[GANG_SIZE], "3");
        assert_eq!(annotations[PLACEMENT], "spread");
        assert_eq!(
            annotations[REQUIRED_TOPOLOGY_KEY],
            "topology.kubernetes.io/zone"
        );
        assert_eq!(annotations["team"], "nlp");
        assert_eq!(
            meta.owner_references.as_ref().unwrap()[0].controller,
            Some(true)
        );

        let spec = pod.spec.as_ref().unwrap();
        assert_eq!(spec.scheduler_name.as_deref(), Some("ringmaster-scheduler"));
        assert_eq!(spec.hostname.as_deref(), Some("spam-worker-2"));
        assert_eq!(spec.subdomain.as_deref(), Some("spam"));
        assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
        assert_eq!(spec.scheduling_gates.as_ref().unwrap()[0].name, GANG_GATE);
        assert_eq!(spec.node_selector.as_ref().unwrap()["pool"], "a100");
        let limits = spec.containers[0]
            .resources
            .as_ref()
            .unwrap()
            .limits
            .as_ref()
            .unwrap();
        assert_eq!(limits[GPU_RESOURCE], Quantity("2".into()));

        let env = env_of(&pod);
        assert_eq!(env["RANK"], "4");
        assert_eq!(env["WORLD_SIZE"], "6");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(env["MASTER_ADDR"], "spam-worker-0.spam.ml.svc");
        assert_eq!(env["MASTER_PORT"], "29500");
        assert_eq!(env["EXTRA"], "1");

        let fields = field_env_of(&pod);
        assert_eq!(fields["RINGMASTER_NODE_NAME"], "spec.nodeName");
        assert_eq!(
            fields["RINGMASTER_ZONE"],
            "metadata.annotations['ringmaster.dev/zone']"
        );
        assert_eq!(
            fields["RINGMASTER_RACK"],
            "metadata.annotations['ringmaster.dev/rack']"
        );
    }

    #[test]
    fn cpu_job_has_no_gpu_resources() {
        let job = job(&BASE.replace(
            "gpusPerWorker: 2, processesPerWorker: 2",
            "gpusPerWorker: 0",
        ));
        let pod = worker_pod(&JobRef::new(&job).unwrap(), 0, 0);
        assert!(pod.spec.unwrap().containers[0].resources.is_none());
    }

    #[test]
    fn support_objects_scope_the_trainer_to_its_own_job() {
        let job = job(BASE);
        let objects = support_objects(&JobRef::new(&job).unwrap());
        let spec: TrainingJob =
            serde_yaml::from_str(&objects.config_map.data.unwrap()[SPEC_FILE]).unwrap();
        assert_eq!(
            spec.spec, job.spec,
            "the trainer reads back exactly the job's spec"
        );
        let svc = objects.service.spec.unwrap();
        assert_eq!(svc.cluster_ip.as_deref(), Some("None"));
        assert_eq!(svc.selector.unwrap()[JOB_NAME], "spam");
        for rule in objects.role.rules.unwrap() {
            assert_eq!(rule.resource_names.unwrap(), vec!["spam".to_string()]);
            assert!(!rule.verbs.contains(&"delete".to_string()));
        }
        assert_eq!(
            objects.role_binding.subjects.unwrap()[0].name,
            "spam-trainer"
        );
    }
}
