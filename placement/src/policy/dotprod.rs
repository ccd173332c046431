use super::{MAX_SPEC_CPU, MAX_SPEC_GPU, Scored, Scorer};
use crate::cluster::Node;
use crate::filter::Resolved;

/// Smallest dot product of node-free and pod-request vectors, both scaled by the
/// largest node spec (`dot_product_score.go`, dimension merge, norm max).
pub struct DotProd;

impl Scorer for DotProd {
    fn name(&self) -> &str {
        "dotprod"
    }

    fn score(&self, node: &Node, pod: &Resolved) -> Scored {
        let cpu = pod.score_cpu();
        if node.cpu_free() < cpu {
            return Scored::new(0);
        }
        let n = [
            node.cpu_free() as f64 / MAX_SPEC_CPU,
            node.gpu_free_total() as f64 / MAX_SPEC_GPU,
        ];
        let p = [
            cpu as f64 / MAX_SPEC_CPU,
            pod.pod.gpu.total_milli() as f64 / MAX_SPEC_GPU,
        ];
        let mut dot = 0.0;
        for i in 0..2 {
            dot += n[i] * p[i];
        }
        let score = 1.0 - dot / 2.0;
        Scored::new((100.0 * score) as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;
    use crate::request::GpuDemand;

    #[test]
    fn prefers_less_free_capacity() {
        let p = pod(64_000, GpuDemand::Whole(4));
        let full = node_with(&[1000; 8], 128_000, 128_000);
        let half = node_with(&[1000, 1000, 1000, 1000, 0, 0, 0, 0], 128_000, 64_000);
        // 1 - (1*0.5 + 1*0.5)/2 = 0.5; 1 - (0.5*0.5 + 0.5*0.5)/2 = 0.75.
        assert_eq!(DotProd.score(&full, &resolved(&p)).score, 50);
        assert_eq!(DotProd.score(&half, &resolved(&p)).score, 75);
    }
}
