//! The one filter every policy shares: can this node host this pod at all?

use std::fmt;

use crate::cluster::{ModelId, Node};
use crate::request::{GpuDemand, MILLI, PodRequest, TaintEffect};

/// A pod with its GPU model names resolved once, so filtering and scoring compare ids.
#[derive(Clone, Debug)]
pub struct Resolved<'a> {
    pub pod: &'a PodRequest,
    /// Accepted models; empty means any.
    pub models: Vec<ModelId>,
}

impl<'a> Resolved<'a> {
    pub fn new(pod: &'a PodRequest) -> Resolved<'a> {
        Resolved {
            pod,
            models: ModelId::intern_all(&pod.gpu_models),
        }
    }

    /// CPU as the scorers see it: Kubernetes counts a zero CPU request as 100m.
    pub fn score_cpu(&self) -> u64 {
        if self.pod.cpu_milli == 0 {
            100
        } else {
            self.pod.cpu_milli
        }
    }

    pub fn accepts_model(&self, model: Option<ModelId>) -> bool {
        self.models.is_empty() || model.is_some_and(|m| self.models.contains(&m))
    }
}

/// Why a node was rejected, in the order the checks run (the first failure counts).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterReason {
    NoPodSlot,
    InsufficientCpu,
    InsufficientMemory,
    LabelMismatch,
    UntoleratedTaint,
    NoGpus,
    GpuModelMismatch,
    InsufficientGpu,
    OutsideDomain,
}

impl fmt::Display for FilterReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FilterReason::NoPodSlot => "too many pods",
            FilterReason::InsufficientCpu => "insufficient cpu",
            FilterReason::InsufficientMemory => "insufficient memory",
            FilterReason::LabelMismatch => "node selector/affinity mismatch",
            FilterReason::UntoleratedTaint => "untolerated taint",
            FilterReason::NoGpus => "no GPUs",
            FilterReason::GpuModelMismatch => "GPU model mismatch",
            FilterReason::InsufficientGpu => "not enough free GPU on any device",
            FilterReason::OutsideDomain => "outside the gang's topology domain",
        })
    }
}

/// Whether the node's free devices can take the GPU demand.
pub fn gpus_fit(free: &[u32], demand: GpuDemand) -> bool {
    match demand {
        GpuDemand::None => true,
        GpuDemand::Share(m) => free.iter().any(|&f| f >= m),
        GpuDemand::Whole(k) => free.iter().filter(|&&f| f == MILLI).count() >= k as usize,
    }
}

pub fn check(node: &Node, pod: &Resolved) -> Result<(), FilterReason> {
    let req = pod.pod;
    if node.pods() >= node.max_pods {
        return Err(FilterReason::NoPodSlot);
    }
    if node.cpu_free() < req.cpu_milli {
        return Err(FilterReason::InsufficientCpu);
    }
    if node.memory_free() < req.memory_mib {
        return Err(FilterReason::InsufficientMemory);
    }
    let selected = req
        .node_selector
        .iter()
        .all(|(k, v)| node.labels.get(k) == Some(v))
        && (req.affinity_terms.is_empty()
            || req
                .affinity_terms
                .iter()
                .any(|term| term.iter().all(|r| r.matches(&node.labels))));
    if !selected {
        return Err(FilterReason::LabelMismatch);
    }
    let tolerated = node
        .taints
        .iter()
        .filter(|t| t.effect != TaintEffect::PreferNoSchedule)
        .all(|t| req.tolerations.iter().any(|tol| tol.tolerates(t)));
    if !tolerated {
        return Err(FilterReason::UntoleratedTaint);
    }
    if req.gpu == GpuDemand::None {
        return Ok(());
    }
    if node.gpu_count() == 0 {
        return Err(FilterReason::NoGpus);
    }
    if !pod.accepts_model(node.model()) {
        return Err(FilterReason::GpuModelMismatch);
    }
    if !gpus_fit(node.gpu_free(), req.gpu) {
        return Err(FilterReason::InsufficientGpu);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterState;
    use crate::request::{LabelOp, LabelRequirement, Taint, Toleration};

    fn node() -> Node {
        Node::new("n", 8000, 16_384, 2, Some("A10"))
            .with_label("zone", "a")
            .with_label("rack", "r1")
    }

    fn check_pod(node: &Node, pod: &PodRequest) -> Result<(), FilterReason> {
        check(node, &Resolved::new(pod))
    }

    #[test]
    fn resources() {
        let n = node();
        let ok = PodRequest::new("p", 8000, 16_384, GpuDemand::Whole(2));
        assert_eq!(check_pod(&n, &ok), Ok(()));
        let cpu = PodRequest::new("p", 8001, 0, GpuDemand::None);
        assert_eq!(check_pod(&n, &cpu), Err(FilterReason::InsufficientCpu));
        let mem = PodRequest::new("p", 0, 16_385, GpuDemand::None);
        assert_eq!(check_pod(&n, &mem), Err(FilterReason::InsufficientMemory));
        let gpus = PodRequest::new("p", 0, 0, GpuDemand::Whole(3));
        assert_eq!(check_pod(&n, &gpus), Err(FilterReason::InsufficientGpu));
        let cpu_node = Node::new("c", 8000, 16_384, 0, None);
        let share = PodRequest::new("p", 0, 0, GpuDemand::Share(100));
        assert_eq!(check_pod(&cpu_node, &share), Err(FilterReason::NoGpus));
        let full = node().with_max_pods(0);
        assert_eq!(check_pod(&full, &ok), Err(FilterReason::NoPodSlot));
    }

    #[test]
    fn per_device_gpu_fit() {
        let mut state = ClusterState::new(vec![node()]);
        let p = PodRequest::new("p", 0, 0, GpuDemand::Share(600));
        state.assume(0, &p, &[0]).unwrap();
        state.assume(0, &p, &[1]).unwrap();
        // 800 milli are free in total, but no device has 500 of them.
        let half = PodRequest::new("h", 0, 0, GpuDemand::Share(500));
        assert_eq!(
            check_pod(state.node(0), &half),
            Err(FilterReason::InsufficientGpu)
        );
        let small = PodRequest::new("s", 0, 0, GpuDemand::Share(400));
        assert_eq!(check_pod(state.node(0), &small), Ok(()));
    }

    #[test]
    fn gpu_model() {
        let n = node();
        let any = PodRequest::new("p", 0, 0, GpuDemand::Share(100));
        let a10 = any.clone().with_gpu_models(&["T4", "A10"]);
        let v100 = any.clone().with_gpu_models(&["V100M32"]);
        assert_eq!(check_pod(&n, &any), Ok(()));
        assert_eq!(check_pod(&n, &a10), Ok(()));
        assert_eq!(check_pod(&n, &v100), Err(FilterReason::GpuModelMismatch));
        // A CPU-only pod ignores the model constraint.
        let cpu = PodRequest::new("c", 1, 1, GpuDemand::None).with_gpu_models(&["V100M32"]);
        assert_eq!(check_pod(&n, &cpu), Ok(()));
    }

    #[test]
    fn selectors_and_affinity() {
        let n = node();
        let base = PodRequest::new("p", 0, 0, GpuDemand::None);
        assert_eq!(
            check_pod(&n, &base.clone().with_selector("zone", "a")),
            Ok(())
        );
        assert_eq!(
            check_pod(&n, &base.clone().with_selector("zone", "b")),
            Err(FilterReason::LabelMismatch)
        );
        let mut aff = base.clone();
        let req = |key: &str, op| LabelRequirement {
            key: key.into(),
            op,
        };
        aff.affinity_terms = vec![
            vec![req("zone", LabelOp::In(vec!["b".into()]))],
            vec![
                req("rack", LabelOp::NotIn(vec!["r2".into()])),
                req("zone", LabelOp::Exists),
                req("gpu", LabelOp::DoesNotExist),
            ],
        ];
        assert_eq!(check_pod(&n, &aff), Ok(()));
        aff.affinity_terms.remove(1);
        assert_eq!(check_pod(&n, &aff), Err(FilterReason::LabelMismatch));
    }

    #[test]
    fn taints_and_tolerations() {
        let taint = Taint {
            key: "gpu".into(),
            value: "true".into(),
            effect: TaintEffect::NoSchedule,
        };
        let n = node().with_taint(taint);
        let soft = node().with_taint(Taint {
            key: "x".into(),
            value: "".into(),
            effect: TaintEffect::PreferNoSchedule,
        });
        let pod = PodRequest::new("p", 0, 0, GpuDemand::None);
        assert_eq!(check_pod(&n, &pod), Err(FilterReason::UntoleratedTaint));
        assert_eq!(check_pod(&soft, &pod), Ok(()));
        let equal = Toleration {
            key: "gpu".into(),
            exists: false,
            value: "true".into(),
            effect: Some(TaintEffect::NoSchedule),
        };
        assert_eq!(
            check_pod(&n, &pod.clone().with_toleration(equal.clone())),
            Ok(())
        );
        let wrong_value = Toleration {
            value: "false".into(),
            ..equal.clone()
        };
        assert_eq!(
            check_pod(&n, &pod.clone().with_toleration(wrong_value)),
            Err(FilterReason::UntoleratedTaint)
        );
        let wrong_effect = Toleration {
            effect: Some(TaintEffect::NoExecute),
            ..equal
        };
        assert_eq!(
            check_pod(&n, &pod.clone().with_toleration(wrong_effect)),
            Err(FilterReason::UntoleratedTaint)
        );
        let everything = Toleration {
            key: String::new(),
            exists: true,
            value: String::new(),
            effect: None,
        };
        assert_eq!(check_pod(&n, &pod.with_toleration(everything)), Ok(()));
    }
}
