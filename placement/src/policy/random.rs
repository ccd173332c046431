use std::sync::Mutex;

use super::{Scored, Scorer};
use crate::cluster::{ClusterState, Node};
use crate::filter::Resolved;
use crate::gorand::GoRand;
use crate::request::GpuDemand;

/// A uniform choice among the feasible nodes (`random_score.go`) and, for sharing pods,
/// a uniform device among those that fit. Draws come from Go's stream in the simulator's
/// order, which matches the paper in distribution only (its feasible list order comes
/// from a parallel filter).
pub struct RandomScorer {
    rng: Mutex<GoRand>,
}

impl RandomScorer {
    pub fn new(rng: GoRand) -> RandomScorer {
        RandomScorer {
            rng: Mutex::new(rng),
        }
    }

    fn rng(&self) -> std::sync::MutexGuard<'_, GoRand> {
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Scorer for RandomScorer {
    fn name(&self) -> &str {
        "random"
    }

    fn score(&self, _node: &Node, _pod: &Resolved) -> Scored {
        Scored::new(0)
    }

    fn memoizable(&self) -> bool {
        false
    }

    fn score_all(&self, _: &ClusterState, feasible: &[usize], _: &Resolved, out: &mut Vec<Scored>) {
        let mut rng = self.rng();
        // The kube-scheduler's per-cycle draw precedes the plugin's.
        rng.intn(100);
        let winner = rng.intn(feasible.len());
        out.clear();
        out.extend((0..feasible.len()).map(|i| Scored::new(if i == winner { 100 } else { 0 })));
    }

    fn pick_gpus(&self, node: &Node, pod: &Resolved, _: Scored) -> Vec<usize> {
        let free = node.gpu_free();
        match pod.pod.gpu {
            GpuDemand::Share(m) => {
                let mut rng = self.rng();
                let mut seen = 0;
                let mut pick = None;
                for (i, &f) in free.iter().enumerate() {
                    if f >= m {
                        seen += 1;
                        if rng.intn(seen) == 0 {
                            pick = Some(i);
                        }
                    }
                }
                pick.into_iter().collect()
            }
            demand => super::best_gpus(free, demand),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterState;
    use crate::policy::testutil::*;

    #[test]
    fn exactly_one_winner_and_fitting_device() {
        let state = ClusterState::new(
            ["a", "b", "c"]
                .map(|name| {
                    let mut n = node_with(&[1000], 1000, 1000);
                    n.name = name.into();
                    n
                })
                .to_vec(),
        );
        let r = RandomScorer::new(GoRand::new(7));
        let p = pod(1, GpuDemand::Share(500));
        let mut out = Vec::new();
        let mut wins = [0; 3];
        for _ in 0..300 {
            r.score_all(&state, &[0, 1, 2], &resolved(&p), &mut out);
            assert_eq!(out.iter().filter(|s| s.score == 100).count(), 1);
            wins[out.iter().position(|s| s.score == 100).unwrap()] += 1;
        }
        assert!(wins.iter().all(|&w| w > 60), "{wins:?}");
        let n = node_with(&[100, 600, 1000, 200], 1000, 1000);
        for _ in 0..20 {
            let g = r.pick_gpus(&n, &resolved(&p), Scored::new(0));
            assert!(g == vec![1] || g == vec![2]);
        }
    }
}
