//! Scorers: one file per policy, all behind [`Scorer`], all over the same filter.
//!
//! Scores are integers, higher is better; the placer takes the maximum and breaks ties
//! by node rank. The paper's policies (`REPLAY.md` §8) truncate to 0..=100, which is
//! what creates ties; ours uses a wider range on purpose.

mod bestfit;
mod clustering;
mod dotprod;
mod fgd;
mod fragpack;
mod packing;
mod random;
mod spread;

pub use bestfit::BestFit;
pub use clustering::GpuClustering;
pub use dotprod::DotProd;
pub use fgd::{Fgd, FragModel, TypicalPod};
pub use fragpack::{FragPack, Ties};
pub use packing::GpuPacking;
pub use random::RandomScorer;
pub use spread::Spread;

use crate::cluster::{ClusterState, Node};
use crate::error::{Error, Result};
use crate::filter::Resolved;
use crate::gorand::GoRand;
use crate::request::{GpuDemand, MILLI};

/// A node's score for a pod, and the device a sharing pod should use when the policy
/// chose one while scoring (FGD evaluates every device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scored {
    pub score: i64,
    pub device: Option<usize>,
}

impl Scored {
    pub fn new(score: i64) -> Scored {
        Scored {
            score,
            device: None,
        }
    }
}

pub trait Scorer: Send + Sync {
    fn name(&self) -> &str;

    /// Scores one node that passed the filter.
    fn score(&self, node: &Node, pod: &Resolved) -> Scored;

    /// Rescales the scores of all feasible nodes of one decision (BestFit's min-max).
    fn normalize(&self, _scores: &mut [Scored]) {}

    /// True when `score` depends only on the node's state and the pod's shape, so the
    /// placer may reuse it while the node's generation is unchanged.
    fn memoizable(&self) -> bool {
        true
    }

    /// Scores every feasible node of one decision, in the order given.
    fn score_all(
        &self,
        state: &ClusterState,
        feasible: &[usize],
        pod: &Resolved,
        out: &mut Vec<Scored>,
    ) {
        out.clear();
        out.extend(feasible.iter().map(|&i| self.score(state.node(i), pod)));
        self.normalize(out);
    }

    /// Devices the pod gets on the chosen node.
    fn pick_gpus(&self, node: &Node, pod: &Resolved, scored: Scored) -> Vec<usize> {
        match (pod.pod.gpu, scored.device) {
            (GpuDemand::Share(_), Some(d)) => vec![d],
            (demand, _) => best_gpus(node.gpu_free(), demand),
        }
    }
}

/// The simulator's `best` device choice: whole GPUs take the lowest-index fully free
/// devices; a share takes the device with the least free milli that still fits (lowest
/// index among equals), keeping emptier devices whole.
pub fn best_gpus(free: &[u32], demand: GpuDemand) -> Vec<usize> {
    match demand {
        GpuDemand::None => Vec::new(),
        GpuDemand::Whole(k) => (0..free.len())
            .filter(|&i| free[i] == MILLI)
            .take(k as usize)
            .collect(),
        GpuDemand::Share(m) => (0..free.len())
            .filter(|&i| free[i] >= m)
            .min_by_key(|&i| (free[i], i))
            .into_iter()
            .collect(),
    }
}

/// Policies by their command-line names.
pub const POLICY_NAMES: [&str; 9] = [
    "random",
    "dotprod",
    "gpuclustering",
    "gpupacking",
    "bestfit",
    "fgd",
    "fragpack",
    "fragbalance",
    "spread",
];

/// Builds a policy by name. FGD and ours need the workload's typical pods; `rng` feeds
/// Random's draws.
pub fn by_name(name: &str, typical: &FragModel, rng: GoRand) -> Result<Box<dyn Scorer>> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "random" => Box::new(RandomScorer::new(rng)),
        "dotprod" => Box::new(DotProd),
        "gpuclustering" => Box::new(GpuClustering),
        "gpupacking" => Box::new(GpuPacking),
        "bestfit" => Box::new(BestFit),
        "fgd" => Box::new(Fgd::new(typical.clone())),
        "fragpack" => Box::new(FragPack::new(typical.clone(), Ties::Pack)),
        "fragbalance" => Box::new(FragPack::new(typical.clone(), Ties::Balance)),
        "spread" => Box::new(Spread),
        other => {
            return Err(Error::UnknownPolicy(
                other.to_string(),
                POLICY_NAMES.join(", "),
            ));
        }
    })
}

/// Whether a policy scores with the workload's typical pods (so a model source matters).
pub fn uses_model(name: &str) -> bool {
    matches!(name, "fgd" | "fragpack" | "fragbalance")
}

/// The paper's display name of a policy, as in `analysis_allo_discrete.csv`.
pub fn paper_label(name: &str) -> Option<&'static str> {
    Some(match name {
        "random" => "01-Random",
        "dotprod" => "02-DotProd",
        "gpuclustering" => "03-GpuClustering",
        "gpupacking" => "04-GpuPacking",
        "bestfit" => "05-BestFit",
        "fgd" => "06-FGD",
        _ => return None,
    })
}

/// The paper normalises specs by its largest node: 128 cores, 8 GPUs.
pub(crate) const MAX_SPEC_CPU: f64 = 128_000.0;
pub(crate) const MAX_SPEC_GPU: f64 = 8000.0;

#[cfg(test)]
pub(crate) mod testutil {
    use crate::cluster::Node;
    use crate::filter::Resolved;
    use crate::request::{GpuDemand, PodRequest};

    /// A node with the given free milli per device and CPU left.
    pub fn node_with(free: &[u32], cpu_milli: u64, cpu_left: u64) -> Node {
        let mut state = crate::cluster::ClusterState::new(vec![Node::new(
            "n",
            cpu_milli,
            1 << 20,
            free.len(),
            Some("T4"),
        )]);
        for (i, &f) in free.iter().enumerate() {
            if f < 1000 {
                let p = PodRequest::new("x", 0, 0, GpuDemand::Share(1000 - f));
                state.assume(0, &p, &[i]).unwrap();
            }
        }
        let cpu = PodRequest::new("c", cpu_milli - cpu_left, 0, GpuDemand::None);
        state.assume(0, &cpu, &[]).unwrap();
        state.node(0).clone()
    }

    pub fn pod(cpu: u64, gpu: GpuDemand) -> PodRequest {
        PodRequest::new("p", cpu, 0, gpu)
    }

    pub fn resolved(p: &PodRequest) -> Resolved<'_> {
        Resolved::new(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_device_choice() {
        let free = [1000, 300, 600, 1000, 600];
        assert_eq!(best_gpus(&free, GpuDemand::Share(500)), vec![2]);
        assert_eq!(best_gpus(&free, GpuDemand::Share(200)), vec![1]);
        assert_eq!(best_gpus(&free, GpuDemand::Whole(2)), vec![0, 3]);
        assert!(best_gpus(&free, GpuDemand::None).is_empty());
    }

    #[test]
    fn names_round_trip() {
        let model = FragModel::default();
        for name in POLICY_NAMES {
            assert_eq!(by_name(name, &model, GoRand::new(1)).unwrap().name(), name);
        }
        assert!(by_name("nope", &model, GoRand::new(1)).is_err());
    }
}
