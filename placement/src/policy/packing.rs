use super::{Scored, Scorer};
use crate::cluster::Node;
use crate::filter::Resolved;
use crate::request::{GpuDemand, MILLI};

/// Shared GPUs first, then free GPUs of used nodes, then idle nodes
/// (`gpu_packing_score.go`). No normalisation.
pub struct GpuPacking;

impl Scorer for GpuPacking {
    fn name(&self) -> &str {
        "gpupacking"
    }

    fn score(&self, node: &Node, pod: &Resolved) -> Scored {
        let (mut need, milli) = pod.pod.gpu.devices_and_milli();
        if pod.pod.gpu == GpuDemand::None {
            return Scored::new(0);
        }
        let free = node.gpu_free();
        let fully_free = node.fully_free_gpus() as i64;
        if fully_free == free.len() as i64 {
            return Scored::new((33 - fully_free).max(fully_free));
        }
        let mut order: Vec<usize> = (0..free.len()).collect();
        order.sort_by_key(|&i| free[i]);
        let mut whole_taken = 0;
        let mut shared_ratio = 0i64;
        for i in order {
            if need == 0 {
                break;
            }
            if free[i] >= milli {
                need -= 1;
                shared_ratio += i64::from(free[i]) * 100 / i64::from(MILLI);
                if free[i] == MILLI {
                    whole_taken += 1;
                }
            }
        }
        if need != 0 {
            return Scored::new(0);
        }
        Scored::new(if whole_taken > 0 {
            (50 - whole_taken).max(33)
        } else {
            (100 - shared_ratio / 10).max(50)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;

    #[test]
    fn tiers() {
        let share = pod(1000, GpuDemand::Share(300));
        let idle = node_with(&[1000; 8], 64_000, 64_000);
        let used = node_with(&[1000, 1000, 0, 0], 64_000, 64_000);
        let shared = node_with(&[1000, 400, 0, 0], 64_000, 64_000);
        fn s(n: &Node, p: &crate::request::PodRequest) -> i64 {
            GpuPacking.score(n, &resolved(p)).score
        }
        assert_eq!(s(&idle, &share), 25);
        assert_eq!(s(&used, &share), 49);
        // Takes the 400 device: 100 - (40)/10 = 96.
        assert_eq!(s(&shared, &share), 96);
        assert_eq!(s(&used, &pod(0, GpuDemand::Whole(2))), 48);
        assert_eq!(s(&node_with(&[1000, 1000], 1, 1), &share), 31);
        assert_eq!(s(&idle, &pod(1, GpuDemand::None)), 0);
    }
}
