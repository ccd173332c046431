use super::fgd::{FragModel, best_device, sigmoid_score};
use super::{Scored, Scorer};
use crate::cluster::Node;
use crate::filter::Resolved;
use crate::request::GpuDemand;

/// Ours: FGD's fragmentation step, with the ties it leaves decided by the policy itself
/// instead of the node ranking.
///
/// FGD's integer sigmoid maps most small changes of expected fragmentation to the same
/// score, so many nodes tie; in the paper's replay the fixed seeded node ranking decides,
/// and that ranking is worth about 5 points to FGD. Both variants keep FGD's score as the
/// primary key (`fgd << 20 | tie_break`), so FGD's order is never overridden, and send a
/// CPU-only pod to the node with the fewest free milli-GPU, where the CPU it takes
/// strands the least GPU capacity (a node without free GPUs loses nothing). They differ
/// for GPU pods:
/// - `fragpack` ([`Ties::Pack`]): a share goes to the node whose GPUs are already the
///   most allocated (partial pods fill used nodes, idle nodes stay whole); whole-GPU pods
///   keep FGD's choice (a packing tie-break for them measured worse);
/// - `fragbalance` ([`Ties::Balance`]): every GPU pod goes to the node whose CPU left
///   after it is closest to what its free GPUs left need, at the typical GPU pod's CPU
///   per GPU (learned with the typical pods). A node short of CPU strands its GPUs, a
///   node with CPU to spare wastes it on GPU nodes the CPU-only pods do not need.
pub struct FragPack {
    model: FragModel,
    ties: Ties,
    /// milli-CPU per GPU of the typical GPU pods (frequency-weighted), for `Balance`.
    cpu_per_gpu: f64,
}

/// How `FragPack` breaks FGD's ties for GPU pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ties {
    Pack,
    Balance,
}

/// Largest tie-break value (20 bits under FGD's score).
const TIE_MAX: u64 = 0xF_FFFF;

impl FragPack {
    pub fn new(model: FragModel, ties: Ties) -> FragPack {
        let gpu_pods = model.typical().iter().filter(|t| t.gpu_milli > 0);
        let (cpu, gpu) = gpu_pods.fold((0.0, 0.0), |(c, g), t| {
            (
                c + t.freq * t.cpu_milli as f64,
                g + t.freq * f64::from(t.gpu_milli * t.gpu_count) / 1000.0,
            )
        });
        FragPack {
            cpu_per_gpu: if gpu > 0.0 { cpu / gpu } else { 0.0 },
            model,
            ties,
        }
    }

    /// Higher when the CPU left (milli) matches the GPUs left at `cpu_per_gpu`; one
    /// step per 10 milli-CPU of mismatch.
    fn balance(&self, cpu_left: u64, gpus_left: f64) -> u64 {
        let mismatch = (cpu_left as f64 - gpus_left * self.cpu_per_gpu).abs();
        TIE_MAX - ((mismatch / 10.0) as u64).min(TIE_MAX)
    }

    fn packed(&self, node: &Node, pod: &Resolved, device: Option<usize>) -> i64 {
        let frag = sigmoid_score(self.model.reduction(node, pod, device)) << 20;
        let cpu_left = node.cpu_free().saturating_sub(pod.pod.cpu_milli);
        let tie_break = match (pod.pod.gpu, self.ties) {
            (GpuDemand::None, _) => TIE_MAX - node.gpu_free_total().min(TIE_MAX),
            (GpuDemand::Whole(_), Ties::Pack) => 0,
            (GpuDemand::Share(_), Ties::Pack) => {
                node.gpu_used_total() * 1000 / (node.gpu_count() as u64 * 1000)
            }
            (GpuDemand::Whole(k), Ties::Balance) => {
                // Whole GPUs left: partly used devices take no more whole-GPU pods.
                let left = node.fully_free_gpus().saturating_sub(k as usize);
                self.balance(cpu_left, left as f64)
            }
            (GpuDemand::Share(m), Ties::Balance) => {
                let left = node.gpu_free_total().saturating_sub(u64::from(m));
                self.balance(cpu_left, left as f64 / 1000.0)
            }
        };
        frag | tie_break as i64
    }
}

impl Scorer for FragPack {
    fn name(&self) -> &str {
        match self.ties {
            Ties::Pack => "fragpack",
            Ties::Balance => "fragbalance",
        }
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
        let ours = FragPack::new(model(), Ties::Pack);
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

    #[test]
    fn balance_keeps_cpu_for_the_gpus_left() {
        // Typical GPU pods: 1 GPU with 4 cores, and half a GPU with 2 cores: 6 cores
        // over 1.5 GPUs, 4 cores per GPU.
        let pods = vec![
            pod(4000, GpuDemand::Whole(1)),
            pod(2000, GpuDemand::Share(500)),
        ];
        let ours = FragPack::new(FragModel::from_workload(&pods), Ties::Balance);
        assert!((ours.cpu_per_gpu - 4000.0).abs() < 1e-9);
        let whole = pod(4000, GpuDemand::Whole(1));
        let w = resolved(&whole);
        // After the pod: 2 GPUs and 8 cores left (balanced) vs 2 GPUs and 36 cores.
        let lean = node_with(&[1000; 3], 64_000, 12_000);
        let fat = node_with(&[1000; 3], 64_000, 40_000);
        let fgd = Fgd::new(FragModel::from_workload(&pods));
        assert_eq!(fgd.score(&lean, &w).score, fgd.score(&fat, &w).score);
        assert!(ours.score(&lean, &w).score > ours.score(&fat, &w).score);
        // Too little CPU for the GPUs left loses as well: 2 GPUs and 1 core left.
        let starved = node_with(&[1000; 3], 64_000, 5_000);
        assert!(ours.score(&lean, &w).score > ours.score(&starved, &w).score);
        // FGD's score still comes first.
        assert_eq!(
            ours.score(&lean, &w).score >> 20,
            fgd.score(&lean, &w).score
        );
        assert_eq!(ours.name(), "fragbalance");
    }
}
