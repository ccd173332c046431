//! Pure builders: an InferenceService and its resolved model in, the Deployment, Service
//! and HorizontalPodAutoscaler that serve it out. All three are named after the service.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, Lifecycle,
    LifecycleHandler, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecurityContext, Service, ServicePort, ServiceSpec, SleepAction, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use ringmaster_crds::keys::{
    INFERENCE_SERVICE, MANAGED_BY, MANAGED_BY_VALUE, MODEL_VERSION, PLACEMENT, SCHEDULER_NAME,
};
use ringmaster_crds::{InferenceService, InferenceServiceSpec, ScalingMetric};

use super::model::Resolved;
use crate::pod::resources_with_gpus;
use crate::writes::SERVING_MANAGER;

/// The serving container's name.
pub const CONTAINER: &str = "server";
/// `ringmaster serve`'s probe endpoints (the Open Inference Protocol's health paths).
pub const LIVE_PATH: &str = "/v2/health/live";
pub const READY_PATH: &str = "/v2/health/ready";
/// The user of the ringmaster images.
const IMAGE_USER: i64 = 65532;
/// Writable scratch for a read-only root filesystem: temporary files and the Hugging Face
/// cache an `hf://` source downloads into.
const SCRATCH_VOLUME: &str = "ringmaster-scratch";
const SCRATCH_DIR: &str = "/tmp";
/// Model loading (a download, then warm-up) may take this long before liveness applies.
const STARTUP_PERIOD_SECONDS: i32 = 5;
const STARTUP_CHECKS: i32 = 120;
/// Seconds a stopping replica keeps serving while endpoints drop it, before SIGTERM
/// starts its drain.
const PRE_STOP_SLEEP_SECONDS: i64 = 5;

/// Identity of a service the builders need; taken from the object once.
pub struct IsvcRef<'a> {
    pub isvc: &'a InferenceService,
    pub name: &'a str,
    pub namespace: &'a str,
    pub owner: OwnerReference,
}

impl<'a> IsvcRef<'a> {
    /// Fails only for objects without name, namespace or uid, which the API server never returns.
    pub fn new(isvc: &'a InferenceService) -> Option<Self> {
        Some(Self {
            isvc,
            name: isvc.metadata.name.as_deref()?,
            namespace: isvc.metadata.namespace.as_deref()?,
            owner: isvc.controller_owner_ref(&())?,
        })
    }

    fn spec(&self) -> &InferenceServiceSpec {
        &self.isvc.spec
    }

    /// Selects the service's replicas (Deployment and Service); never changes, since a
    /// Deployment's selector is immutable.
    fn selector(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(INFERENCE_SERVICE.to_string(), self.name.to_string())])
    }

    fn labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.selector();
        labels.insert(MANAGED_BY.into(), MANAGED_BY_VALUE.into());
        labels
    }

    fn meta(&self) -> ObjectMeta {
        ObjectMeta {
            name: Some(self.name.to_string()),
            namespace: Some(self.namespace.to_string()),
            labels: Some(self.labels()),
            owner_references: Some(vec![self.owner.clone()]),
            ..ObjectMeta::default()
        }
    }
}

/// The in-cluster URL of the Service.
pub fn url(name: &str, namespace: &str) -> String {
    format!("http://{name}.{namespace}.svc.cluster.local")
}

/// Replica bounds as run. A minimum of 0 runs as 1: the autoscaler scales to zero only
/// with the HPAScaleToZero feature gate, which clusters do not enable by default.
pub fn replica_bounds(spec: &InferenceServiceSpec) -> (i32, i32) {
    let max = spec.replicas.max.max(1);
    (spec.replicas.min.clamp(1, max), max)
}

/// Whether an autoscaler sets the replica count (then the Deployment must not).
pub fn autoscaled(spec: &InferenceServiceSpec) -> bool {
    let (min, max) = replica_bounds(spec);
    min < max
}

pub fn deployment(svc: &IsvcRef, model: &Resolved) -> Deployment {
    let spec = svc.spec();
    let (min, _) = replica_bounds(spec);
    let mut args = vec![
        "serve".to_string(),
        "--model".into(),
        model.uri.clone(),
        "--name".into(),
        svc.name.to_string(),
        "--port".into(),
        spec.port.to_string(),
        "--max-batch-size".into(),
        spec.batching.max_batch_size.to_string(),
        "--max-delay-ms".into(),
        spec.batching.max_delay_ms.to_string(),
    ];
    let labels = &spec.model.labels;
    if !labels.is_empty() {
        // `ringmaster serve` reads `a,b` or, for names with commas, a JSON array.
        let arg = if labels.iter().any(|l| l.contains(',')) {
            serde_json::to_string(labels).expect("strings serialise")
        } else {
            labels.join(",")
        };
        args.extend(["--labels".into(), arg]);
    }
    let http_get = |path: &str| {
        Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..HTTPGetAction::default()
        })
    };
    let mut volume_mounts = model.volume_mounts.clone();
    volume_mounts.push(VolumeMount {
        name: SCRATCH_VOLUME.into(),
        mount_path: SCRATCH_DIR.into(),
        ..VolumeMount::default()
    });
    let mut volumes = model.volumes.clone();
    volumes.push(Volume {
        name: SCRATCH_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource::default()),
        ..Volume::default()
    });

    let container = Container {
        name: CONTAINER.into(),
        image: Some(spec.image.clone()),
        command: Some(vec!["ringmaster".into()]),
        args: Some(args),
        env: Some(vec![EnvVar {
            name: "HF_HOME".into(),
            value: Some(format!("{SCRATCH_DIR}/huggingface")),
            ..EnvVar::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some("http".into()),
            container_port: spec.port,
            ..ContainerPort::default()
        }]),
        // Ready only once the model is loaded and warm; live as long as the server answers
        // (a busy server answers late, hence the longer timeout).
        readiness_probe: Some(Probe {
            http_get: http_get(READY_PATH),
            period_seconds: Some(5),
            ..Probe::default()
        }),
        liveness_probe: Some(Probe {
            http_get: http_get(LIVE_PATH),
            period_seconds: Some(10),
            timeout_seconds: Some(5),
            ..Probe::default()
        }),
        startup_probe: Some(Probe {
            http_get: http_get(READY_PATH),
            period_seconds: Some(STARTUP_PERIOD_SECONDS),
            failure_threshold: Some(STARTUP_CHECKS),
            ..Probe::default()
        }),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction {
                    seconds: PRE_STOP_SLEEP_SECONDS,
                }),
                ..LifecycleHandler::default()
            }),
            ..Lifecycle::default()
        }),
        resources: resources_with_gpus(spec.resources.as_ref(), spec.gpus),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Capabilities::default()
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(volume_mounts),
        ..Container::default()
    };

    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(svc.labels()),
            annotations: Some(BTreeMap::from([
                (MODEL_VERSION.to_string(), model.version.clone()),
                // Replicas of one service on different nodes: a node lost takes one.
                (PLACEMENT.to_string(), "spread".to_string()),
            ])),
            ..ObjectMeta::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            scheduler_name: Some(SCHEDULER_NAME.into()),
            // The server never calls the API server.
            automount_service_account_token: Some(false),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(IMAGE_USER),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            }),
            node_selector: Some(spec.node_selector.clone()).filter(|m| !m.is_empty()),
            tolerations: Some(spec.tolerations.clone()).filter(|t| !t.is_empty()),
            volumes: Some(volumes),
            ..PodSpec::default()
        }),
    };

    Deployment {
        metadata: svc.meta(),
        spec: Some(DeploymentSpec {
            // Left out under an autoscaler: applying a count would undo its every decision.
            replicas: (!autoscaled(spec)).then_some(min),
            selector: LabelSelector {
                match_labels: Some(svc.selector()),
                ..LabelSelector::default()
            },
            // A new replica is Ready before an old one stops: no request is dropped.
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            // Longer than the startup allowance, so a slow model load is not a stalled
            // rollout.
            progress_deadline_seconds: Some(STARTUP_PERIOD_SECONDS * STARTUP_CHECKS + 300),
            template,
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

/// Whether applying `wanted` (with no replica count: an autoscaler takes over) would let
/// the API server reset `live`'s count to 1. Server-side apply removes a field when its
/// only manager stops setting it; while the operator still owns `spec.replicas`, a second
/// manager must co-own the current count first (the documented hand-over to an HPA).
pub fn needs_replica_handover(wanted: &Deployment, live: &Deployment) -> bool {
    let releasing = wanted.spec.as_ref().is_some_and(|s| s.replicas.is_none());
    releasing
        && live.metadata.managed_fields.iter().flatten().any(|entry| {
            entry.manager.as_deref() == Some(SERVING_MANAGER)
                && entry.operation.as_deref() == Some("Apply")
                && entry.subresource.is_none()
                && entry
                    .fields_v1
                    .as_ref()
                    .and_then(|f| f.0.get("f:spec")?.get("f:replicas"))
                    .is_some()
        })
}

/// ClusterIP Service: port 80 and the server's own port, both to the container's `http`.
pub fn service(svc: &IsvcRef) -> Service {
    let port = svc.spec().port;
    let to_http = |name: String, port: i32| ServicePort {
        name: Some(name),
        port,
        target_port: Some(IntOrString::String("http".into())),
        ..ServicePort::default()
    };
    let mut ports = vec![to_http("http".into(), 80)];
    if port != 80 {
        ports.push(to_http(format!("http-{port}"), port));
    }
    Service {
        metadata: svc.meta(),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(svc.selector()),
            ports: Some(ports),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The autoscaler, when the replica bounds leave it something to decide.
pub fn autoscaler(svc: &IsvcRef) -> Option<HorizontalPodAutoscaler> {
    let spec = svc.spec();
    if !autoscaled(spec) {
        return None;
    }
    let (min, max) = replica_bounds(spec);
    let scaling = &spec.autoscaling;
    let per_pod = |name: &str| MetricSpec {
        type_: "Pods".into(),
        pods: Some(PodsMetricSource {
            metric: MetricIdentifier {
                name: name.into(),
                selector: None,
            },
            target: MetricTarget {
                type_: "AverageValue".into(),
                average_value: Some(quantity(scaling.target)),
                ..MetricTarget::default()
            },
        }),
        ..MetricSpec::default()
    };
    let metric = match scaling.metric {
        ScalingMetric::Concurrency => per_pod("ringmaster_serve_in_flight_requests"),
        ScalingMetric::Rps => per_pod("ringmaster_serve_requests_per_second"),
        ScalingMetric::Cpu => MetricSpec {
            type_: "Resource".into(),
            resource: Some(ResourceMetricSource {
                name: "cpu".into(),
                target: MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(scaling.target.round().max(1.0) as i32),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        },
    };
    Some(HorizontalPodAutoscaler {
        metadata: svc.meta(),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: svc.name.to_string(),
            },
            min_replicas: Some(min),
            max_replicas: max,
            metrics: Some(vec![metric]),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(scaling.scale_down_delay_seconds),
                    ..HPAScalingRules::default()
                }),
                ..HorizontalPodAutoscalerBehavior::default()
            }),
        }),
        ..HorizontalPodAutoscaler::default()
    })
}

/// A quantity in milli-units at most, the precision the autoscaler works in.
fn quantity(value: f64) -> Quantity {
    let milli = (value * 1000.0).round() as i64;
    Quantity(if milli % 1000 == 0 {
        (milli / 1000).to_string()
    } else {
        format!("{milli}m")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};

    fn isvc(spec: &str) -> InferenceService {
        let mut isvc: InferenceService = serde_yaml::from_str(&format!(
            "apiVersion: ringmaster.dev/v1alpha1\nkind: InferenceService\nmetadata: {{name: spam}}\nspec:\n{spec}"
        ))
        .unwrap();
        isvc.metadata.namespace = Some("ml".into());
        isvc.metadata.uid = Some("uid-1".into());
        isvc
    }

    fn served(uri: &str) -> Resolved {
        Resolved {
            uri: uri.into(),
            version: format!("v-{uri}"),
            volumes: Vec::new(),
            volume_mounts: Vec::new(),
        }
    }

    const SPEC: &str = "  model: {architecture: bert, source: 'hf://org/m', labels: [ham, spam]}
  replicas: {min: 2, max: 5}
  autoscaling: {metric: concurrency, target: 2.5, scaleDownDelaySeconds: 60}
  batching: {maxBatchSize: 16, maxDelayMs: 7}
  gpus: 1
  port: 9000
";

    #[test]
    fn deployment_runs_the_server_with_the_serving_contract() {
        let isvc = isvc(SPEC);
        let svc = IsvcRef::new(&isvc).unwrap();
        let d = deployment(&svc, &served("hf://org/m"));
        assert_eq!(
            d.metadata.owner_references.as_ref().unwrap()[0].controller,
            Some(true)
        );
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, None, "the autoscaler owns the count");
        let rolling = spec.strategy.unwrap().rolling_update.unwrap();
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
        let template = spec.template;
        let annotations = template.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations[MODEL_VERSION], "v-hf://org/m");
        assert_eq!(annotations[PLACEMENT], "spread");
        let pod = template.spec.unwrap();
        assert_eq!(pod.scheduler_name.as_deref(), Some(SCHEDULER_NAME));
        let c = &pod.containers[0];
        assert_eq!(c.command.as_ref().unwrap(), &["ringmaster"]);
        assert_eq!(
            c.args.as_ref().unwrap().join(" "),
            "serve --model hf://org/m --name spam --port 9000 --max-batch-size 16 \
             --max-delay-ms 7 --labels ham,spam"
        );
        assert_eq!(c.ports.as_ref().unwrap()[0].container_port, 9000);
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some(READY_PATH));
        assert_eq!(ready.port, IntOrString::String("http".into()));
        let limits = c.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert_eq!(limits["nvidia.com/gpu"], Quantity("1".into()));
        assert_eq!(
            c.security_context
                .as_ref()
                .unwrap()
                .read_only_root_filesystem,
            Some(true)
        );
    }

    #[test]
    fn labels_with_commas_reach_the_server_as_json() {
        let isvc = isvc(&SPEC.replace("[ham, spam]", "[ham, 'spam, probably']"));
        let svc = IsvcRef::new(&isvc).unwrap();
        let args = deployment(&svc, &served("m"))
            .spec
            .unwrap()
            .template
            .spec
            .unwrap()
            .containers[0]
            .args
            .clone()
            .unwrap();
        let at = args.iter().position(|a| a == "--labels").unwrap();
        assert_eq!(args[at + 1], r#"["ham","spam, probably"]"#);
    }

    #[test]
    fn fixed_replicas_are_set_and_need_no_autoscaler() {
        let isvc = isvc(&SPEC.replace("{min: 2, max: 5}", "{min: 3, max: 3}"));
        let svc = IsvcRef::new(&isvc).unwrap();
        assert_eq!(
            deployment(&svc, &served("m")).spec.unwrap().replicas,
            Some(3)
        );
        assert!(autoscaler(&svc).is_none());
        // Scale to zero runs as one replica, and a range of [0, 1] is then no range.
        let zero = isvc_with_bounds(0, 1);
        assert_eq!(replica_bounds(&zero.spec), (1, 1));
        assert!(!autoscaled(&zero.spec));
        let zero = isvc_with_bounds(0, 4);
        let hpa = autoscaler(&IsvcRef::new(&zero).unwrap())
            .unwrap()
            .spec
            .unwrap();
        assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(1), 4));
    }

    fn isvc_with_bounds(min: i32, max: i32) -> InferenceService {
        isvc(&SPEC.replace("{min: 2, max: 5}", &format!("{{min: {min}, max: {max}}}")))
    }

    #[test]
    fn autoscaler_targets_the_chosen_metric() {
        let isvc = isvc(SPEC);
        let hpa = autoscaler(&IsvcRef::new(&isvc).unwrap())
            .unwrap()
            .spec
            .unwrap();
        assert_eq!((hpa.min_replicas, hpa.max_replicas), (Some(2), 5));
        assert_eq!(hpa.scale_target_ref.name, "spam");
        let pods = hpa.metrics.unwrap()[0].pods.clone().unwrap();
        assert_eq!(pods.metric.name, "ringmaster_serve_in_flight_requests");
        assert_eq!(pods.target.average_value, Some(Quantity("2500m".into())));
        assert_eq!(
            hpa.behavior
                .unwrap()
                .scale_down
                .unwrap()
                .stabilization_window_seconds,
            Some(60)
        );
        let cpu = self::isvc(&SPEC.replace("concurrency, target: 2.5", "cpu, target: 70"));
        let hpa = autoscaler(&IsvcRef::new(&cpu).unwrap())
            .unwrap()
            .spec
            .unwrap();
        let resource = hpa.metrics.unwrap()[0].resource.clone().unwrap();
        assert_eq!(resource.name, "cpu");
        assert_eq!(resource.target.average_utilization, Some(70));
    }

    #[test]
    fn service_exposes_port_80_and_the_servers_port() {
        let isvc = isvc(SPEC);
        let spec = service(&IsvcRef::new(&isvc).unwrap()).spec.unwrap();
        let ports: Vec<(i32, String)> = spec
            .ports
            .unwrap()
            .into_iter()
            .map(|p| (p.port, p.name.unwrap()))
            .collect();
        assert_eq!(ports, [(80, "http".into()), (9000, "http-9000".into())]);
        assert_eq!(spec.selector.unwrap()[INFERENCE_SERVICE], "spam");
    }

    #[test]
    fn replicas_are_handed_over_only_while_the_operator_owns_them() {
        let isvc = isvc(SPEC);
        let wanted = deployment(&IsvcRef::new(&isvc).unwrap(), &served("m"));
        let owned_by = |manager: &str| Deployment {
            metadata: ObjectMeta {
                managed_fields: Some(vec![ManagedFieldsEntry {
                    manager: Some(manager.into()),
                    operation: Some("Apply".into()),
                    fields_v1: Some(FieldsV1(serde_json::json!({"f:spec": {"f:replicas": {}}}))),
                    ..ManagedFieldsEntry::default()
                }]),
                ..ObjectMeta::default()
            },
            ..Deployment::default()
        };
        assert!(needs_replica_handover(&wanted, &owned_by(SERVING_MANAGER)));
        assert!(!needs_replica_handover(&wanted, &owned_by("someone-else")));
        let fixed = self::isvc(&SPEC.replace("{min: 2, max: 5}", "{min: 3, max: 3}"));
        let fixed = deployment(&IsvcRef::new(&fixed).unwrap(), &served("m"));
        assert!(!needs_replica_handover(&fixed, &owned_by(SERVING_MANAGER)));
    }
}
