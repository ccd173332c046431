//! Kubernetes Nodes and Pods to the engine's values: node capacity, pod requests, and a
//! `ClusterState` with every bound (or assumed) pod accounted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node as KubeNode, Pod, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use ringmaster_crds::keys::{
    GPU_INDICES, GPU_MILLI, GPU_RESOURCE, PLACEMENT, PREFERRED_TOPOLOGY_KEY, REQUIRED_TOPOLOGY_KEY,
};
use ringmaster_placement::request::{LabelOp, LabelRequirement, Taint, TaintEffect, Toleration};
use ringmaster_placement::{
    ClusterState, GangRequest, GpuDemand, Node, PodRequest, TopologyConstraint,
};

/// Node label carrying the GPU model (NVIDIA GPU feature discovery).
pub const GPU_MODEL_LABEL: &str = "nvidia.com/gpu.product";

/// Where a pod sits: set by the API server (`spec.nodeName`) or assumed by us before the
/// watch shows the binding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assumed {
    pub node: String,
    pub gpus: Vec<usize>,
}

/// A Kubernetes quantity as a number (`500m`, `64`, `512Gi`, `1e3`); None if malformed.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let factor = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0_f64.powi(3),
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        _ => return None,
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

fn quantity(map: Option<&BTreeMap<String, Quantity>>, key: &str) -> f64 {
    map.and_then(|m| m.get(key))
        .and_then(|q| parse_quantity(&q.0))
        .unwrap_or(0.0)
}

/// A schedulable node, or None when it is not Ready.
pub fn node_from_kube(node: &KubeNode) -> Option<Node> {
    let status = node.status.as_ref()?;
    let ready = status
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    if !ready {
        return None;
    }
    let alloc = status.allocatable.as_ref();
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let gpus = quantity(alloc, GPU_RESOURCE) as usize;
    let mut out = Node::new(
        node.metadata.name.clone()?,
        (quantity(alloc, "cpu") * 1000.0).round() as u64,
        (quantity(alloc, "memory") / (1024.0 * 1024.0)) as u64,
        gpus,
        labels.get(GPU_MODEL_LABEL).map(String::as_str),
    )
    .with_max_pods(quantity(alloc, "pods") as u32);
    for (k, v) in &labels {
        out = out.with_label(k, v);
    }
    let spec = node.spec.as_ref();
    for t in spec.and_then(|s| s.taints.as_ref()).into_iter().flatten() {
        if let Some(effect) = taint_effect(&t.effect) {
            out = out.with_taint(Taint {
                key: t.key.clone(),
                value: t.value.clone().unwrap_or_default(),
                effect,
            });
        }
    }
    // A cordoned node takes no new pods; as a taint, pods that tolerate it still may
    // (the DaemonSet convention).
    if spec.and_then(|s| s.unschedulable) == Some(true) {
        out = out.with_taint(Taint {
            key: "node.kubernetes.io/unschedulable".into(),
            value: String::new(),
            effect: TaintEffect::NoSchedule,
        });
    }
    Some(out)
}

fn taint_effect(effect: &str) -> Option<TaintEffect> {
    match effect {
        "NoSchedule" => Some(TaintEffect::NoSchedule),
        "PreferNoSchedule" => Some(TaintEffect::PreferNoSchedule),
        "NoExecute" => Some(TaintEffect::NoExecute),
        _ => None,
    }
}

/// The pod's resource request: the larger of the containers' sum and any init
/// container, GPUs from requests or limits, a share from the GPU_MILLI annotation.
pub fn pod_request(pod: &Pod) -> PodRequest {
    let name = format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.name.as_deref().unwrap_or_default()
    );
    let Some(spec) = pod.spec.as_ref() else {
        return PodRequest::new(name, 0, 0, GpuDemand::None);
    };
    let need = |r: Option<&ResourceRequirements>| -> (f64, f64, f64) {
        let requests = r.and_then(|r| r.requests.as_ref());
        let limits = r.and_then(|r| r.limits.as_ref());
        let gpus = quantity(requests, GPU_RESOURCE).max(quantity(limits, GPU_RESOURCE));
        (
            quantity(requests, "cpu"),
            quantity(requests, "memory"),
            gpus,
        )
    };
    let (mut cpu, mut mem, mut gpus) = (0.0, 0.0, 0.0);
    for c in &spec.containers {
        let (c_cpu, c_mem, c_gpu) = need(c.resources.as_ref());
        cpu += c_cpu;
        mem += c_mem;
        gpus += c_gpu;
    }
    for c in spec.init_containers.iter().flatten() {
        let (c_cpu, c_mem, c_gpu) = need(c.resources.as_ref());
        cpu = f64::max(cpu, c_cpu);
        mem = f64::max(mem, c_mem);
        gpus = f64::max(gpus, c_gpu);
    }
    let milli = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(GPU_MILLI))
        .and_then(|m| m.trim().parse::<u32>().ok());
    let gpu = match (gpus as u32, milli) {
        (0 | 1, Some(m)) if (1..1000).contains(&m) => GpuDemand::Share(m),
        (0, _) => GpuDemand::None,
        (k, _) => GpuDemand::Whole(k),
    };
    let mut req = PodRequest::new(
        name,
        (cpu * 1000.0).round() as u64,
        (mem / (1024.0 * 1024.0)).ceil() as u64,
        gpu,
    );
    req.node_selector = spec.node_selector.clone().unwrap_or_default();
    req.tolerations = spec
        .tolerations
        .iter()
        .flatten()
        .map(|t| Toleration {
            key: t.key.clone().unwrap_or_default(),
            exists: t.operator.as_deref() == Some("Exists"),
            value: t.value.clone().unwrap_or_default(),
            effect: t.effect.as_deref().and_then(taint_effect),
        })
        .collect();
    let terms = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| {
            a.required_during_scheduling_ignored_during_execution
                .as_ref()
        });
    req.affinity_terms = terms
        .map(|t| {
            t.node_selector_terms
                .iter()
                .map(|term| {
                    term.match_expressions
                        .iter()
                        .flatten()
                        .filter_map(|e| {
                            let values = e.values.clone().unwrap_or_default();
                            let op = match e.operator.as_str() {
                                "In" => LabelOp::In(values),
                                "NotIn" => LabelOp::NotIn(values),
                                "Exists" => LabelOp::Exists,
                                "DoesNotExist" => LabelOp::DoesNotExist,
                                _ => return None,
                            };
                            Some(LabelRequirement {
                                key: e.key.clone(),
                                op,
                            })
                        })
                        .collect()
                })
                .collect()
        })
        .unwrap_or_default();
    req
}

/// GPU indices from the GPU_INDICES annotation (`0,1`), if present and well formed.
pub fn annotated_gpus(pod: &Pod) -> Option<Vec<usize>> {
    let value = pod.metadata.annotations.as_ref()?.get(GPU_INDICES)?;
    value
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().parse().ok())
        .collect()
}

/// Devices for a pod bound without indices (by another scheduler): the first that fit.
fn pick_devices(free: &[u32], demand: GpuDemand) -> Vec<usize> {
    let (count, milli) = demand.devices_and_milli();
    free.iter()
        .enumerate()
        .filter(|(_, f)| **f >= milli)
        .map(|(i, _)| i)
        .take(count as usize)
        .collect()
}

/// Does the pod hold resources on a node (bound, not finished, not being deleted
/// without a node)?
pub fn holds_resources(pod: &Pod) -> bool {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    !matches!(phase, Some("Succeeded" | "Failed"))
}

/// The cluster as the engine sees it: every Ready node, minus every pod that holds
/// resources on it (bound in the watch, or assumed by uid and not yet seen bound).
pub fn build_state<'a>(
    nodes: impl IntoIterator<Item = &'a KubeNode>,
    pods: impl IntoIterator<Item = &'a Pod>,
    assumed: &HashMap<String, Assumed>,
) -> ClusterState {
    let mut state = ClusterState::new(nodes.into_iter().filter_map(node_from_kube).collect());
    for pod in pods {
        if !holds_resources(pod) {
            continue;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let bound = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        let (node, gpus) = match (bound, assumed.get(&uid)) {
            (Some(node), Some(a)) if a.node == node => (node, Some(a.gpus.clone())),
            (Some(node), _) => (node, annotated_gpus(pod)),
            (None, Some(a)) => (a.node.clone(), Some(a.gpus.clone())),
            (None, None) => continue,
        };
        account(&mut state, &node, &pod_request(pod), gpus);
    }
    state
}

/// Takes a pod's resources from its node; pods on unknown nodes or overcommitted
/// devices are skipped (another scheduler's problem, not ours to crash on).
pub fn account(state: &mut ClusterState, node: &str, req: &PodRequest, gpus: Option<Vec<usize>>) {
    let Ok(index) = state.index_of(node) else {
        return;
    };
    let gpus = gpus
        .filter(|g| g.len() == req.gpu.devices_and_milli().0 as usize)
        .unwrap_or_else(|| pick_devices(state.node(index).gpu_free(), req.gpu));
    if let Err(e) = state.assume(index, req, &gpus) {
        tracing::debug!(pod = %req.name, node, error = %e, "bound pod does not fit its node");
    }
}

/// The engine's request for a gang: one `PodRequest` per pending member, the topology
/// from the first member that names one (required wins over preferred), and the policy:
/// `spread` for `placement: spread`, else `default_policy`.
pub fn gang_request(
    name: &str,
    members: &[Arc<Pod>],
    default_policy: &str,
) -> (GangRequest, String) {
    let annotation = |key: &str| {
        members
            .iter()
            .find_map(|p| p.metadata.annotations.as_ref()?.get(key).cloned())
            .filter(|v| !v.trim().is_empty())
    };
    let topology = match (
        annotation(REQUIRED_TOPOLOGY_KEY),
        annotation(PREFERRED_TOPOLOGY_KEY),
    ) {
        (Some(key), _) => Some(TopologyConstraint {
            key,
            required: true,
        }),
        (None, Some(key)) => Some(TopologyConstraint {
            key,
            required: false,
        }),
        (None, None) => None,
    };
    let policy = match annotation(PLACEMENT).as_deref().map(str::trim) {
        Some("spread") => "spread".to_string(),
        _ => default_policy.to_string(),
    };
    let gang = GangRequest {
        name: name.to_string(),
        members: members.iter().map(|p| pod_request(p)).collect(),
        topology,
    };
    (gang, policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("64"), Some(64.0));
        assert_eq!(
            parse_quantity("512Gi"),
            Some(512.0 * 1024.0 * 1024.0 * 1024.0)
        );
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("2k"), Some(2000.0));
        assert_eq!(parse_quantity("1x"), None);
    }

    fn pod(yaml: &str) -> Pod {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn requests_and_shares() {
        let p = pod(r#"
metadata: {name: a, namespace: n, annotations: {ringmaster.dev/gpu-milli: "250"}}
spec:
  nodeSelector: {pool: x}
  containers:
  - {name: c, resources: {requests: {cpu: 500m, memory: 1Gi}, limits: {nvidia.com/gpu: "1"}}}
  - {name: d, resources: {requests: {cpu: "1"}}}
"#);
        let r = pod_request(&p);
        assert_eq!(
            (r.cpu_milli, r.memory_mib, r.gpu),
            (1500, 1024, GpuDemand::Share(250))
        );
        assert_eq!(r.node_selector.get("pool").map(String::as_str), Some("x"));
        let whole = pod(
            "{metadata: {name: b}, spec: {containers: [{name: c, resources: {limits: {nvidia.com/gpu: '2'}}}]}}",
        );
        assert_eq!(pod_request(&whole).gpu, GpuDemand::Whole(2));
    }

    #[test]
    fn state_accounts_bound_and_assumed_pods() {
        let node: KubeNode = serde_yaml::from_str(
            r#"
metadata: {name: n1, labels: {nvidia.com/gpu.product: H200}}
status:
  allocatable: {cpu: "64", memory: 512Gi, pods: "110", nvidia.com/gpu: "8"}
  conditions: [{type: Ready, status: "True"}]
"#,
        )
        .unwrap();
        let bound = pod(r#"
metadata: {name: a, uid: u1, annotations: {ringmaster.dev/gpu-indices: "6,7"}}
spec: {nodeName: n1, containers: [{name: c, resources: {limits: {nvidia.com/gpu: "2"}}}]}
"#);
        let unannotated = pod(r#"
metadata: {name: b, uid: u2}
spec: {nodeName: n1, containers: [{name: c, resources: {limits: {nvidia.com/gpu: "1"}}}]}
"#);
        let pending = pod(r#"
metadata: {name: c, uid: u3}
spec: {containers: [{name: c, resources: {limits: {nvidia.com/gpu: "1"}}}]}
"#);
        let assumed = HashMap::from([(
            "u3".to_string(),
            Assumed {
                node: "n1".into(),
                gpus: vec![3],
            },
        )]);
        let state = build_state([&node], [&bound, &unannotated, &pending], &assumed);
        let free = state.node(0).gpu_free();
        assert_eq!(free, &[0, 1000, 1000, 0, 1000, 1000, 0, 0]);
        assert_eq!(state.node(0).gpu_model.as_deref(), Some("H200"));
    }

    #[test]
    fn gang_policy_and_topology() {
        let a = Arc::new(pod(r#"
metadata: {name: a, annotations: {ringmaster.dev/placement: spread, ringmaster.dev/required-topology-key: zone}}
spec: {containers: []}
"#));
        let (g, policy) = gang_request("g", &[a.clone(), a], "fragpack");
        assert_eq!(policy, "spread");
        assert_eq!(g.members.len(), 2);
        let t = g.topology.unwrap();
        assert!(t.required && t.key == "zone");
        let b = Arc::new(pod("{metadata: {name: b}, spec: {containers: []}}"));
        let (g, policy) = gang_request("g", &[b], "fgd");
        assert_eq!((policy.as_str(), g.topology), ("fgd", None));
    }

    #[test]
    fn not_ready_nodes_are_skipped() {
        let node: KubeNode = serde_yaml::from_str(
            "{metadata: {name: n}, status: {conditions: [{type: Ready, status: 'False'}]}}",
        )
        .unwrap();
        assert!(node_from_kube(&node).is_none());
    }
}
