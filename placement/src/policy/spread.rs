use super::{Scored, Scorer};
use crate::cluster::Node;
use crate::filter::Resolved;
use crate::request::GpuDemand;

/// Least allocated first: the mean free share of CPU, memory and (on GPU nodes) GPU
/// after placement, in 0..=1000. Sharing pods go to the emptiest device, so load spreads
/// over devices as well as nodes.
pub struct Spread;

impl Scorer for Spread {
    fn name(&self) -> &str {
        "spread"
    }

    fn score(&self, node: &Node, pod: &Resolved) -> Scored {
        let share = |free: u64, req: u64, cap: u64| {
            if cap == 0 {
                0.0
            } else {
                free.saturating_sub(req) as f64 / cap as f64
            }
        };
        let mut sum = share(node.cpu_free(), pod.pod.cpu_milli, node.cpu_milli)
            + share(node.memory_free(), pod.pod.memory_mib, node.memory_mib);
        let mut parts = 2.0;
        if node.gpu_count() > 0 {
            let cap = node.gpu_count() as u64 * 1000;
            sum += share(node.gpu_free_total(), pod.pod.gpu.total_milli(), cap);
            parts += 1.0;
        }
        let device = match pod.pod.gpu {
            GpuDemand::Share(m) => (0..node.gpu_count())
                .filter(|&i| node.gpu_free()[i] >= m)
                .max_by_key(|&i| (node.gpu_free()[i], std::cmp::Reverse(i))),
            _ => None,
        };
        Scored {
            score: (sum / parts * 1000.0) as i64,
            device,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;

    #[test]
    fn prefers_emptier_node_and_device() {
        let p = pod(1000, GpuDemand::Share(200));
        let busy = node_with(&[500, 500], 10_000, 2000);
        let idle = node_with(&[1000, 300], 10_000, 10_000);
        let a = Spread.score(&busy, &resolved(&p));
        let b = Spread.score(&idle, &resolved(&p));
        assert!(b.score > a.score);
        assert_eq!(b.device, Some(0));
        assert_eq!(a.device, Some(0));
    }
}
