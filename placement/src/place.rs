//! One placement decision: filter every node, score the feasible ones, take the best
//! (ties to the lowest rank, or at random), choose the devices.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use crate::cluster::ClusterState;
use crate::filter::{self, FilterReason, Resolved};
use crate::gorand::GoRand;
use crate::policy::{Scored, Scorer};
use crate::request::{PodRequest, PodShape};

/// Where a pod goes: node index and name, and the GPU device indices it gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub node: usize,
    pub node_name: String,
    pub gpus: Vec<usize>,
    pub score: i64,
}

/// Free GPU capacity of one topology domain against what a gang needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainShortfall {
    pub domain: String,
    pub nodes: usize,
    pub free_milli: u64,
    pub whole_free: u64,
    pub needed_milli: u64,
}

/// Why nothing fit, with numbers a user can act on: how many nodes failed which check
/// and, for gangs, what each topology domain had free against what was needed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct Unplaceable {
    pub pod: String,
    pub nodes: usize,
    /// Nodes rejected per reason (first failing check of each node).
    pub rejected: Vec<(FilterReason, usize)>,
    pub domains: Vec<DomainShortfall>,
    /// Extra context, e.g. which gang member could not be placed.
    pub note: Option<String>,
}

impl fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: 0/{} nodes are available", self.pod, self.nodes)?;
        let mut sep = ": ";
        for (reason, n) in &self.rejected {
            write!(f, "{sep}{n} {reason}")?;
            sep = ", ";
        }
        if let Some(note) = &self.note {
            write!(f, "; {note}")?;
        }
        for d in &self.domains {
            write!(
                f,
                "; {}: {} nodes, {:.1} GPUs free ({} whole), {:.1} needed",
                d.domain,
                d.nodes,
                d.free_milli as f64 / 1000.0,
                d.whole_free,
                d.needed_milli as f64 / 1000.0
            )?;
        }
        Ok(())
    }
}

/// How equal best scores are resolved.
pub enum Tie<'a> {
    /// Lowest node rank (`ClusterState::rank`).
    Rank,
    /// Uniformly at random among the tied nodes, afresh each decision.
    Random(&'a mut GoRand),
}

/// Places pods one at a time with one scorer. It memoises deterministic scores per
/// (pod shape, node) while the node's generation is unchanged, so after the first pod of
/// a shape only nodes that changed since are scored again.
pub struct Placer<'s> {
    scorer: &'s dyn Scorer,
    shapes: HashMap<PodShape, usize>,
    memo: Vec<Vec<(u64, Scored)>>,
    feasible: Vec<usize>,
    scores: Vec<Scored>,
}

impl<'s> Placer<'s> {
    pub fn new(scorer: &'s dyn Scorer) -> Placer<'s> {
        Placer {
            scorer,
            shapes: HashMap::new(),
            memo: Vec::new(),
            feasible: Vec::new(),
            scores: Vec::new(),
        }
    }

    pub fn scorer(&self) -> &'s dyn Scorer {
        self.scorer
    }

    /// Chooses a node and devices for `pod`; does not change `state` (call `assume`).
    pub fn place(
        &mut self,
        state: &ClusterState,
        pod: &PodRequest,
        tie: Tie<'_>,
    ) -> Result<Placement, Unplaceable> {
        self.place_where(state, pod, tie, |_| true)
    }

    /// Like `place`, restricted to nodes for which `allowed` holds.
    pub fn place_where(
        &mut self,
        state: &ClusterState,
        pod: &PodRequest,
        tie: Tie<'_>,
        allowed: impl Fn(usize) -> bool,
    ) -> Result<Placement, Unplaceable> {
        if let Err(e) = pod.validate() {
            return Err(Unplaceable {
                pod: pod.name.clone(),
                nodes: state.nodes().len(),
                rejected: Vec::new(),
                domains: Vec::new(),
                note: Some(e.to_string()),
            });
        }
        let resolved = Resolved::new(pod);
        let mut rejected: BTreeMap<FilterReason, usize> = BTreeMap::new();
        self.feasible.clear();
        for (i, node) in state.nodes().iter().enumerate() {
            let verdict = if allowed(i) {
                filter::check(node, &resolved)
            } else {
                Err(FilterReason::OutsideDomain)
            };
            match verdict {
                Ok(()) => self.feasible.push(i),
                Err(reason) => *rejected.entry(reason).or_default() += 1,
            }
        }
        if self.feasible.is_empty() {
            return Err(Unplaceable {
                pod: pod.name.clone(),
                nodes: state.nodes().len(),
                rejected: rejected.into_iter().collect(),
                domains: Vec::new(),
                note: None,
            });
        }
        let (chosen, scored) = if self.feasible.len() == 1 {
            // The scheduler skips scoring when one node is feasible; devices may still
            // come from the policy's evaluation of that node.
            let i = self.feasible[0];
            let scored = if self.scorer.memoizable() {
                self.memoized(state, i, &resolved)
            } else {
                Scored::new(0)
            };
            (i, scored)
        } else {
            self.score_feasible(state, &resolved);
            let best = self.scores.iter().map(|s| s.score).max().unwrap_or(0);
            let tied = self
                .feasible
                .iter()
                .zip(&self.scores)
                .filter(|(_, s)| s.score == best);
            let (&i, &scored) = match tie {
                Tie::Rank => tied.min_by_key(|&(&i, _)| state.rank(i)),
                Tie::Random(rng) => {
                    let tied: Vec<_> = tied.collect();
                    Some(tied[rng.intn(tied.len())])
                }
            }
            .expect("at least one feasible node");
            (i, scored)
        };
        let node = state.node(chosen);
        Ok(Placement {
            node: chosen,
            node_name: node.name.clone(),
            gpus: self.scorer.pick_gpus(node, &resolved, scored),
            score: scored.score,
        })
    }

    fn score_feasible(&mut self, state: &ClusterState, pod: &Resolved) {
        if !self.scorer.memoizable() {
            self.scorer
                .score_all(state, &self.feasible, pod, &mut self.scores);
            return;
        }
        let feasible = std::mem::take(&mut self.feasible);
        self.scores.clear();
        for &i in &feasible {
            let s = self.memoized(state, i, pod);
            self.scores.push(s);
        }
        self.feasible = feasible;
        self.scorer.normalize(&mut self.scores);
    }

    fn memoized(&mut self, state: &ClusterState, node: usize, pod: &Resolved) -> Scored {
        let next = self.shapes.len();
        let shape = *self.shapes.entry(pod.pod.shape()).or_insert(next);
        if shape == self.memo.len() {
            self.memo.push(Vec::new());
        }
        let row = &mut self.memo[shape];
        if row.len() < state.nodes().len() {
            row.resize(state.nodes().len(), (0, Scored::new(0)));
        }
        let n = state.node(node);
        let (generation, scored) = row[node];
        if generation == n.generation() {
            return scored;
        }
        let scored = self.scorer.score(n, pod);
        row[node] = (n.generation(), scored);
        scored
    }
}

/// One decision with ties to the node rank, without memoisation across calls.
pub fn place_pod(
    state: &ClusterState,
    pod: &PodRequest,
    scorer: &dyn Scorer,
) -> Result<Placement, Unplaceable> {
    Placer::new(scorer).place(state, pod, Tie::Rank)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Node;
    use crate::policy::{BestFit, GpuPacking};
    use crate::request::GpuDemand;

    fn cluster() -> ClusterState {
        ClusterState::new(vec![
            Node::new("a", 16_000, 65_536, 8, Some("G2")),
            Node::new("b", 16_000, 65_536, 2, Some("T4")),
            Node::new("c", 4000, 65_536, 0, None),
        ])
    }

    #[test]
    fn picks_best_score_then_rank() {
        let mut state = cluster();
        let p = PodRequest::new("p", 1000, 1024, GpuDemand::Whole(1));
        // BestFit prefers the 2-GPU node.
        assert_eq!(place_pod(&state, &p, &BestFit).unwrap().node_name, "b");
        // GpuPacking scores idle nodes max(33 - n, n): a=25, b=31.
        let placed = place_pod(&state, &p, &GpuPacking).unwrap();
        assert_eq!(
            (placed.node_name.as_str(), placed.gpus.clone()),
            ("b", vec![0])
        );
        // Equal scores go to the lowest rank.
        let cpu = PodRequest::new("c", 1000, 1024, GpuDemand::None);
        assert_eq!(place_pod(&state, &cpu, &GpuPacking).unwrap().node, 0);
        state.set_ranks(vec![2, 1, 0]);
        assert_eq!(place_pod(&state, &cpu, &GpuPacking).unwrap().node, 2);
    }

    #[test]
    fn unplaceable_counts_reasons() {
        let state = cluster();
        let p = PodRequest::new("big", 8000, 1024, GpuDemand::Whole(4)).with_gpu_models(&["T4"]);
        let err = place_pod(&state, &p, &BestFit).unwrap_err();
        assert_eq!(
            err.rejected,
            vec![
                (FilterReason::InsufficientCpu, 1),
                (FilterReason::GpuModelMismatch, 1),
                (FilterReason::InsufficientGpu, 1),
            ]
        );
        assert_eq!(
            err.to_string(),
            "big: 0/3 nodes are available: 1 insufficient cpu, 1 GPU model mismatch, \
             1 not enough free GPU on any device"
        );
        let huge = PodRequest::new("huge", 1, 1, GpuDemand::Whole(9));
        let err = place_pod(&state, &huge, &BestFit).unwrap_err();
        assert_eq!(
            err.rejected,
            vec![
                (FilterReason::NoGpus, 1),
                (FilterReason::InsufficientGpu, 2)
            ]
        );
        let invalid = PodRequest::new("zero", 1, 1, GpuDemand::Share(0));
        let err = place_pod(&state, &invalid, &BestFit).unwrap_err();
        assert!(err.to_string().contains("between 1 and 999"), "{err}");
    }

    #[test]
    fn memo_follows_generations() {
        let mut state = cluster();
        let mut placer = Placer::new(&GpuPacking);
        let p = PodRequest::new("p", 1000, 1024, GpuDemand::Share(500));
        let first = placer.place(&state, &p, Tie::Rank).unwrap();
        state.assume(first.node, &p, &first.gpus).unwrap();
        // The half-used GPU now scores higher than any idle node.
        let second = placer.place(&state, &p, Tie::Rank).unwrap();
        assert_eq!(
            (second.node, second.gpus.clone()),
            (first.node, first.gpus.clone())
        );
        assert_eq!(second.score, 95);
    }

    #[test]
    fn random_ties_spread_choices() {
        let state = ClusterState::new(
            (0..4)
                .map(|i| Node::new(format!("n{i}"), 1000, 1000, 1, Some("T4")))
                .collect(),
        );
        let p = PodRequest::new("p", 1, 1, GpuDemand::None);
        let mut rng = GoRand::new(3);
        let mut placer = Placer::new(&GpuPacking);
        let mut seen = [false; 4];
        for _ in 0..50 {
            seen[placer
                .place(&state, &p, Tie::Random(&mut rng))
                .unwrap()
                .node] = true;
        }
        assert_eq!(seen, [true; 4]);
    }
}
