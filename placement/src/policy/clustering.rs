use super::{Scored, Scorer};
use crate::cluster::{GpuAffinity, Node};
use crate::filter::Resolved;

/// Keeps pods of one GPU kind together (`gpu_clustering_score.go`): nodes hosting only
/// the pod's kind first, then mixed nodes with it, then idle nodes, then the rest; within
/// a tier, fuller nodes first.
pub struct GpuClustering;

impl Scorer for GpuClustering {
    fn name(&self) -> &str {
        "gpuclustering"
    }

    fn score(&self, node: &Node, pod: &Resolved) -> Scored {
        let Some(kind) = GpuAffinity::of(pod.pod.gpu) else {
            return Scored::new(0);
        };
        let base = 25 * (8000 - node.gpu_free_total() as i64) / 8000;
        let hosted = node.affinities();
        let has_kind = hosted.iter().any(|&(k, n)| k == kind && n > 0);
        Scored::new(match (has_kind, hosted.len()) {
            (true, 1) => base + 75,
            (true, _) => base + 50,
            (false, 0) => base + 25,
            (false, _) => base,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterState;
    use crate::policy::testutil::*;
    use crate::request::{GpuDemand, PodRequest};

    #[test]
    fn tiers() {
        let mut state = ClusterState::new(vec![Node::new("n", 64_000, 1 << 20, 8, Some("G2"))]);
        let p = pod(1000, GpuDemand::Share(500));
        let s = |st: &ClusterState| GpuClustering.score(st.node(0), &resolved(&p)).score;
        assert_eq!(s(&state), 25);
        state.assume(0, &p, &[0]).unwrap();
        // base = 25 * 500 / 8000 = 1.
        assert_eq!(s(&state), 76);
        let w = PodRequest::new("w", 0, 0, GpuDemand::Whole(2));
        state.assume(0, &w, &[1, 2]).unwrap();
        assert_eq!(s(&state), 25 * 2500 / 8000 + 50);
        let other = pod(1, GpuDemand::Whole(1));
        assert_eq!(
            GpuClustering.score(state.node(0), &resolved(&other)).score,
            25 * 2500 / 8000
        );
        assert_eq!(
            GpuClustering
                .score(state.node(0), &resolved(&pod(1, GpuDemand::None)))
                .score,
            0
        );
    }
}
