use super::fgd::{FragModel, best_device, sigmoid_score};
use super::{Scored, Scorer};
use crate::cluster::Node;
use crate::filter::Resolved;
use crate::request::GpuDemand;

/// Ours: FGD's fragmentation step, with the ties it leaves decided by packing for the
/// pods where that pays.
///
/// FGD's integer sigmoid maps most small changes of expected fragmentation to the same
/// score, so many nodes tie; in the paper's replay the fixed seeded node ranking decides,
/// and that ranking is worth about 5 points to FGD. fragpack decides those ties itself:
/// - a GPU share goes to the node whose GPUs are already the most allocated, so partial
///   pods fill used nodes and idle nodes stay whole;
/// - a CPU-only pod goes to the node with the fewest free milli-GPU, where the CPU it
///   takes strands the least GPU capacity (a node without free GPUs loses nothing);
/// - whole-GPU pods keep FGD's choice (a packing tie-break for them measured worse).
pub struct FragPack {
    model: FragModel,
}

impl FragPack {
    pub fn new(model: FragModel) -> FragPack {
        FragPack { model }
    }

    fn packed(&self, node: &Node, pod: &Resolved, device: Option<usize>) -> i64 {
        let frag = sigmoid_score(self.model.reduction(node, pod, device)) << 20;
        let tie_break = match pod.pod.gpu {
            GpuDemand::Whole(_) => 0,
            GpuDemand::Share(_) => node.gpu_used_total() * 1000 / (node.gpu_count() as u64 * 1000),
            GpuDemand::None => 0xF_FFFF - node.gpu_free_total().min(0xF_FFFF),
        };
        frag | tie_break as i64
    }
}

impl Scorer for FragPack {
    fn name(&self) -> &str {
        "fragpack"
    }

    fn score(&self, node: &Node, pod: &Resolved) -> Scored {
        match pod.pod.gpu {
            GpuDemand::Share(m) => {
                match best_device(node, m, |d| self.packed(node, pod, Some(d))) {
                    Some((d, s)) => Scored {
                        score: s,
                        device: Some(d),
                    },
                    None => Scored::new(0),
                }
            }
            _ => Scored::new(self.packed(node, pod, None)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Fgd;
    use crate::policy::testutil::*;

    fn model() -> FragModel {
        let pods: Vec<_> = (0..4)
            .map(|_| pod(1000, GpuDemand::Whole(1)))
            .chain([pod(1000, GpuDemand::Share(500)), pod(1000, GpuDemand::None)])
            .collect();
        FragModel::from_workload(&pods)
    }

    #[test]
    fn fgd_first_then_packs_partial_pods() {
        let ours = FragPack::new(model());
        let fgd = Fgd::new(model());
        let cpu = pod(1000, GpuDemand::None);
        let idle = node_with(&[1000; 4], 64_000, 64_000);
        let used = node_with(&[1000, 1000, 0, 0], 64_000, 64_000);
        let full = node_with(&[0, 0], 64_000, 64_000);
        let r = resolved(&cpu);
        // FGD sees no difference for a CPU-only pod; ours prefers the node with the
        // fewest free GPUs.
        assert_eq!(fgd.score(&idle, &r).score, fgd.score(&used, &r).score);
        assert!(ours.score(&used, &r).score > ours.score(&idle, &r).score);
        assert!(ours.score(&full, &r).score > ours.score(&used, &r).score);
        // Whole-GPU pods keep FGD's ordering and ties.
        let whole = pod(1000, GpuDemand::Whole(1));
        let w = resolved(&whole);
        assert_eq!(
            ours.score(&idle, &w).score >> 20,
            fgd.score(&idle, &w).score
        );
        assert_eq!(ours.score(&idle, &w).score, ours.score(&used, &w).score);
        // Shares: a better FGD score always wins over packing, the device is FGD's, and
        // among equal FGD scores the more allocated node wins.
        let share = pod(1000, GpuDemand::Share(500));
        let half = node_with(&[500, 1000, 1000, 1000], 64_000, 64_000);
        let s = resolved(&share);
        assert!(fgd.score(&half, &s).score > fgd.score(&used, &s).score);
        assert!(ours.score(&half, &s).score > ours.score(&used, &s).score);
        assert_eq!(ours.score(&half, &s).device, fgd.score(&half, &s).device);
        let idle2 = node_with(&[1000; 2], 64_000, 64_000);
        let used4 = node_with(&[1000, 1000, 1000, 0], 64_000, 64_000);
        assert_eq!(fgd.score(&idle2, &s).score, fgd.score(&used4, &s).score);
        assert!(ours.score(&used4, &s).score > ours.score(&idle2, &s).score);
    }
}
