use super::{MAX_SPEC_CPU, MAX_SPEC_GPU, Scored, Scorer};
use crate::cluster::Node;
use crate::filter::Resolved;

/// Least leftover CPU and GPU after placement (`best_fit_score.go`), then the
/// simulator's integer min-max normalisation over the feasible nodes.
pub struct BestFit;

impl Scorer for BestFit {
    fn name(&self) -> &str {
        "bestfit"
    }

    fn score(&self, node: &Node, pod: &Resolved) -> Scored {
        let free = [node.cpu_free() as f64, node.gpu_free_total() as f64];
        let req = [pod.score_cpu() as f64, pod.pod.gpu.total_milli() as f64];
        let max = [MAX_SPEC_CPU, MAX_SPEC_GPU];
        let mut score = 0.0;
        for i in 0..2 {
            if free[i] < req[i] {
                return Scored::new(0);
            }
            score += (free[i] - req[i]) / max[i] * 0.5;
        }
        Scored::new(((1.0 - score) * 100.0) as i64)
    }

    fn normalize(&self, scores: &mut [Scored]) {
        normalize_min_max(scores);
    }
}

/// `plugin_utils.go` NormalizeScore: integer rescale to 0..=100, all 0 when flat.
pub(crate) fn normalize_min_max(scores: &mut [Scored]) {
    let lo = scores.iter().map(|s| s.score).min().unwrap_or(0);
    let hi = scores.iter().map(|s| s.score).max().unwrap_or(0);
    for s in scores {
        s.score = if hi == lo {
            0
        } else {
            (s.score - lo) * 100 / (hi - lo)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;
    use crate::request::GpuDemand;

    #[test]
    fn prefers_tighter_node_and_normalizes() {
        let p = pod(8000, GpuDemand::Whole(1));
        let tight = node_with(&[1000, 0], 64_000, 8000);
        let loose = node_with(&[1000; 8], 96_000, 96_000);
        let a = BestFit.score(&tight, &resolved(&p));
        let b = BestFit.score(&loose, &resolved(&p));
        // 1 - (0/128000*0.5 + 0/8000*0.5) = 1 -> 100.
        assert_eq!(a.score, 100);
        // 1 - (88000/128000*0.5 + 7000/8000*0.5) = 0.21875 -> 21.
        assert_eq!(b.score, 21);
        let mut all = [a, b, Scored::new(60)];
        BestFit.normalize(&mut all);
        assert_eq!(all.map(|s| s.score), [100, 0, (60 - 21) * 100 / (100 - 21)]);
        let mut flat = [Scored::new(7), Scored::new(7)];
        BestFit.normalize(&mut flat);
        assert_eq!(flat.map(|s| s.score), [0, 0]);
    }
}
