//! Backfill with a starvation guard. Smaller gangs may go ahead of a gang that does not
//! fit; once that gang has waited `threshold`, the nodes it would use are reserved for
//! it: they get a `ringmaster.dev/reserved-for` NoSchedule taint in the engine's view,
//! which only the waiting gang tolerates, so nothing new lands there and they drain
//! until it fits. A gang that would not fit even on an empty cluster reserves nothing.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use ringmaster_placement::request::{Taint, TaintEffect, Toleration};
use ringmaster_placement::{ClusterState, GangRequest, Node, Scorer, place_gang};

use super::queue::GangKey;

/// The taint key of a reserved node in the engine's view (never written to the API).
pub const RESERVED_TAINT: &str = "ringmaster.dev/reserved-for";

/// Which gangs wait since when, and which nodes each starving gang holds.
#[derive(Debug, Default)]
pub struct Starvation {
    blocked_since: HashMap<GangKey, Instant>,
    reserved: HashMap<GangKey, Vec<String>>,
}

impl Starvation {
    /// The gang did not fit at `now`; returns how long it has been waiting.
    pub fn blocked(&mut self, key: &GangKey, now: Instant) -> Duration {
        now.saturating_duration_since(*self.blocked_since.entry(key.clone()).or_insert(now))
    }

    /// The gang was placed: it waits no more and holds nothing.
    pub fn placed(&mut self, key: &GangKey) {
        self.blocked_since.remove(key);
        self.reserved.remove(key);
    }

    /// Forgets gangs that are gone (deleted, bound by someone else).
    pub fn retain(&mut self, alive: &HashSet<&GangKey>) {
        self.blocked_since.retain(|k, _| alive.contains(k));
        self.reserved.retain(|k, _| alive.contains(k));
    }

    pub fn reservation(&self, key: &GangKey) -> Option<&[String]> {
        self.reserved.get(key).map(Vec::as_slice)
    }

    pub fn set_reservation(&mut self, key: &GangKey, nodes: Vec<String>) {
        if nodes.is_empty() {
            self.reserved.remove(key);
        } else {
            self.reserved.insert(key.clone(), nodes);
        }
    }

    /// Nodes reserved by gangs other than `key`.
    pub fn held_by_others(&self, key: &GangKey) -> HashSet<&str> {
        self.reserved
            .iter()
            .filter(|(k, _)| *k != key)
            .flat_map(|(_, nodes)| nodes.iter().map(String::as_str))
            .collect()
    }

    /// Taints every reserved node in `state` for its gang.
    pub fn apply(&self, state: &mut ClusterState) {
        for (key, nodes) in &self.reserved {
            for node in nodes {
                taint(state, node, key);
            }
        }
    }

    /// How many gangs hold reservations (a metric).
    pub fn reserving(&self) -> usize {
        self.reserved.len()
    }
}

fn reserved_taint(key: &GangKey) -> Taint {
    Taint {
        key: RESERVED_TAINT.into(),
        value: key.to_string(),
        effect: TaintEffect::NoSchedule,
    }
}

/// Marks `node` in `state` as reserved for the gang `key` (usage kept).
pub fn taint(state: &mut ClusterState, node: &str, key: &GangKey) {
    let Ok(index) = state.index_of(node) else {
        return;
    };
    let current = state.node(index);
    if current.taints.iter().any(|t| t.key == RESERVED_TAINT) {
        return;
    }
    let tainted = current.clone().with_taint(reserved_taint(key));
    state.add_node(tainted);
}

/// Lets the gang `key` use the nodes reserved for it.
pub fn tolerate_own(gang: &mut GangRequest, key: &GangKey) {
    for m in &mut gang.members {
        m.tolerations.push(Toleration {
            key: RESERVED_TAINT.into(),
            exists: false,
            value: key.to_string(),
            effect: Some(TaintEffect::NoSchedule),
        });
    }
}

/// The nodes the gang would use once they drain: the gang is placed on empty copies of
/// the nodes (`empty`, same names as in `state`), the freest nodes first, growing the
/// set until it fits; `previous` is kept while the gang still fits on it, so a
/// reservation stays put while its nodes drain. None when it fits nowhere even empty.
pub fn nodes_to_reserve(
    state: &ClusterState,
    empty: &[Node],
    gang: &GangRequest,
    scorer: &dyn Scorer,
    previous: Option<&[String]>,
    taken: &HashSet<&str>,
) -> Option<Vec<String>> {
    let fits = |nodes: Vec<Node>| -> Option<Vec<String>> {
        let placement = place_gang(&ClusterState::new(nodes), gang, scorer).ok()?;
        let mut used: Vec<String> = placement
            .assignments
            .into_iter()
            .map(|a| a.node_name)
            .collect();
        used.sort();
        used.dedup();
        Some(used)
    };
    if let Some(previous) = previous {
        let kept: Vec<Node> = empty
            .iter()
            .filter(|n| previous.contains(&n.name) && !taken.contains(n.name.as_str()))
            .cloned()
            .collect();
        if let Some(used) = fits(kept) {
            return Some(used);
        }
    }
    let free = |n: &Node| {
        state
            .index_of(&n.name)
            .map_or(0, |i| state.node(i).gpu_free_total())
    };
    let mut candidates: Vec<&Node> = empty
        .iter()
        .filter(|n| !taken.contains(n.name.as_str()))
        .collect();
    candidates.sort_by(|a, b| free(b).cmp(&free(a)).then(a.name.cmp(&b.name)));
    let mut size = 1;
    loop {
        let size_now = size.min(candidates.len());
        if let Some(used) = fits(
            candidates[..size_now]
                .iter()
                .map(|n| (*n).clone())
                .collect(),
        ) {
            return Some(used);
        }
        if size_now == candidates.len() {
            return None;
        }
        size *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringmaster_placement::policy::{self, FragModel};
    use ringmaster_placement::{GpuDemand, PodRequest, gorand::GoRand};

    fn empty_nodes(n: usize) -> Vec<Node> {
        (0..n)
            .map(|i| Node::new(format!("n{i}"), 64_000, 65_536, 8, None))
            .collect()
    }

    fn gang(name: &str, size: usize, gpus: u32) -> GangRequest {
        GangRequest {
            name: name.into(),
            members: (0..size)
                .map(|i| PodRequest::new(format!("{name}-{i}"), 100, 64, GpuDemand::Whole(gpus)))
                .collect(),
            topology: None,
        }
    }

    fn key(name: &str) -> GangKey {
        GangKey {
            namespace: "ns".into(),
            name: name.into(),
        }
    }

    /// Three 8-GPU nodes; n0 and n1 run 4 GPUs each of earlier work, n2 runs 6.
    fn busy() -> ClusterState {
        let mut state = ClusterState::new(empty_nodes(3));
        let work = PodRequest::new("w", 100, 64, GpuDemand::Whole(1));
        for (node, used) in [(0, 4), (1, 4), (2, 6)] {
            for g in 0..used {
                state.assume(node, &work, &[g]).unwrap();
            }
        }
        state
    }

    #[test]
    fn small_gangs_backfill_until_the_big_one_reserves_the_freest_nodes() {
        let scorer =
            policy::by_name("bestfit", &FragModel::from_workload(&[]), GoRand::new(1)).unwrap();
        let mut state = busy();
        let big = gang("big", 2, 8);
        let small = gang("small", 2, 1);
        assert!(
            place_gang(&state, &big, scorer.as_ref()).is_err(),
            "big is blocked"
        );

        // Before the threshold: no reservation, the small gang backfills.
        let mut starving = Starvation::default();
        let t0 = Instant::now();
        assert_eq!(starving.blocked(&key("big"), t0), Duration::ZERO);
        assert!(place_gang(&state, &small, scorer.as_ref()).is_ok());

        // After it: the two freest nodes are held for big, and only big may use them.
        let waited = starving.blocked(&key("big"), t0 + Duration::from_secs(5));
        assert_eq!(waited, Duration::from_secs(5));
        let nodes = nodes_to_reserve(
            &state,
            &empty_nodes(3),
            &big,
            scorer.as_ref(),
            None,
            &HashSet::new(),
        )
        .expect("big fits an empty cluster");
        assert_eq!(nodes, ["n0", "n1"]);
        starving.set_reservation(&key("big"), nodes);
        starving.apply(&mut state);
        let small_now = place_gang(&state, &small, scorer.as_ref()).expect("n2 has 2 free GPUs");
        assert!(small_now.assignments.iter().all(|a| a.node_name == "n2"));
        let third = gang("third", 1, 1);
        let mut after = state.clone();
        small_now.assume(&small, &mut after).unwrap();
        let why = place_gang(&after, &third, scorer.as_ref())
            .unwrap_err()
            .to_string();
        assert!(why.contains("2 untolerated taint"), "{why}");

        // The earlier work drains from the reserved nodes; big (tolerating its own
        // reservation) fits there.
        let mut drained = ClusterState::new(empty_nodes(3));
        starving.apply(&mut drained);
        let mut big_own = big.clone();
        tolerate_own(&mut big_own, &key("big"));
        assert!(
            place_gang(&drained, &big, scorer.as_ref()).is_err(),
            "reserved for big only"
        );
        assert!(place_gang(&drained, &big_own, scorer.as_ref()).is_ok());
        starving.placed(&key("big"));
        assert_eq!(starving.reserving(), 0);
    }

    #[test]
    fn reservations_stay_put_exclude_others_and_skip_impossible_gangs() {
        let scorer =
            policy::by_name("bestfit", &FragModel::from_workload(&[]), GoRand::new(1)).unwrap();
        let state = busy();
        let empty = empty_nodes(3);
        let big = gang("big", 1, 8);
        let prev = vec!["n2".to_string()];
        let kept = nodes_to_reserve(
            &state,
            &empty,
            &big,
            scorer.as_ref(),
            Some(&prev),
            &HashSet::new(),
        );
        assert_eq!(kept.unwrap(), ["n2"], "the earlier reservation is kept");
        let taken = HashSet::from(["n0", "n1"]);
        let other = nodes_to_reserve(&state, &empty, &big, scorer.as_ref(), None, &taken);
        assert_eq!(
            other.unwrap(),
            ["n2"],
            "nodes held by another gang are not shared"
        );
        let huge = gang("huge", 1, 9);
        assert!(
            nodes_to_reserve(
                &state,
                &empty,
                &huge,
                scorer.as_ref(),
                None,
                &HashSet::new()
            )
            .is_none()
        );
        let mut starving = Starvation::default();
        starving.set_reservation(&key("a"), vec!["n0".into()]);
        starving.blocked(&key("a"), Instant::now());
        assert_eq!(starving.held_by_others(&key("b")), HashSet::from(["n0"]));
        assert!(starving.held_by_others(&key("a")).is_empty());
        starving.retain(&HashSet::new());
        assert_eq!(starving.reserving(), 0);
    }
}
