//! Gangs: all members placed or none, optionally inside one topology domain.

use std::collections::BTreeMap;

use crate::cluster::ClusterState;
use crate::place::{DomainShortfall, Placer, Tie, Unplaceable};
use crate::policy::Scorer;
use crate::request::{MILLI, PodRequest};

/// Keep a gang inside one value of a node label (zone, rack), or only prefer to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopologyConstraint {
    pub key: String,
    /// Required: one domain or nothing. Preferred: one domain if any fits, else as
    /// few domains as the greedy fill reaches.
    pub required: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GangRequest {
    pub name: String,
    pub members: Vec<PodRequest>,
    pub topology: Option<TopologyConstraint>,
}

/// One member's place: `member` indexes `GangRequest::members`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub member: usize,
    pub node: usize,
    pub node_name: String,
    pub gpus: Vec<usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GangPlacement {
    pub assignments: Vec<Assignment>,
    /// The single domain used, when the gang fit in one.
    pub domain: Option<String>,
}

impl GangPlacement {
    /// Records every member on `state`.
    pub fn assume(&self, gang: &GangRequest, state: &mut ClusterState) -> crate::Result<()> {
        for a in &self.assignments {
            state.assume(a.node, &gang.members[a.member], &a.gpus)?;
        }
        Ok(())
    }
}

/// Places a gang without changing `state`: members go largest first onto a scratch copy,
/// and a failure of any member fails the gang.
pub fn place_gang(
    state: &ClusterState,
    gang: &GangRequest,
    scorer: &dyn Scorer,
) -> Result<GangPlacement, Unplaceable> {
    place_gang_on(&mut state.clone(), gang, &mut Placer::new(scorer))
}

/// Places a gang and assumes its members on `state`, which is left unchanged when the
/// gang does not fit. One placer kept across the gangs of a scheduling pass reuses the
/// scores of every node no gang has changed (a pass over thousands of nodes otherwise
/// re-scores them all, and copies the cluster, for each gang).
pub fn place_gang_on(
    state: &mut ClusterState,
    gang: &GangRequest,
    placer: &mut Placer,
) -> Result<GangPlacement, Unplaceable> {
    for m in &gang.members {
        if let Err(e) = m.validate() {
            return Err(Unplaceable {
                pod: format!("gang {}", gang.name),
                nodes: state.nodes().len(),
                rejected: Vec::new(),
                domains: Vec::new(),
                note: Some(e.to_string()),
            });
        }
    }
    let mut order: Vec<usize> = (0..gang.members.len()).collect();
    order.sort_by_key(|&i| {
        let m = &gang.members[i];
        std::cmp::Reverse((m.gpu.total_milli(), m.cpu_milli))
    });
    let Some(topology) = &gang.topology else {
        return fill(state, placer, gang, &order, &|_| true)
            .map(|assignments| GangPlacement {
                assignments,
                domain: None,
            })
            .map_err(|e| with_gang(e, gang));
    };

    let needed: u64 = gang.members.iter().map(|m| m.gpu.total_milli()).sum();
    let domains = domains_of(state, &topology.key);
    // Tightest domain that could hold the gang first, so large domains stay free for
    // large gangs.
    let mut candidates: Vec<&Domain> = domains
        .values()
        .filter(|d| d.free_milli >= needed)
        .collect();
    candidates.sort_by_key(|d| (d.free_milli, d.name.clone()));
    let mut last_error = None;
    for d in candidates {
        let inside = |i: usize| d.nodes.binary_search(&i).is_ok();
        match fill(state, placer, gang, &order, &inside) {
            Ok(assignments) => {
                return Ok(GangPlacement {
                    assignments,
                    domain: Some(format!("{}={}", topology.key, d.name)),
                });
            }
            Err(e) => last_error = Some(e),
        }
    }
    if !topology.required {
        // Fill the domains already used before opening a new one.
        let mut used: Vec<bool> = vec![false; state.nodes().len()];
        let mut assignments = Vec::new();
        for &m in &order {
            let member = &gang.members[m];
            let first = placer
                .place_where(state, member, Tie::Rank, |i| used[i])
                .or_else(|_| placer.place(state, member, Tie::Rank));
            let p = match first {
                Ok(p) => p,
                Err(e) => {
                    undo(state, gang, &assignments);
                    return Err(with_gang(e, gang));
                }
            };
            state
                .assume(p.node, member, &p.gpus)
                .expect("placer only proposes fitting nodes");
            let label = state.node(p.node).labels.get(&topology.key);
            for (i, n) in state.nodes().iter().enumerate() {
                used[i] |= label.is_some() && n.labels.get(&topology.key) == label;
            }
            assignments.push(Assignment {
                member: m,
                node: p.node,
                node_name: p.node_name,
                gpus: p.gpus,
            });
        }
        return Ok(GangPlacement {
            assignments,
            domain: None,
        });
    }
    let mut err = last_error.map_or_else(
        || Unplaceable {
            pod: format!("gang {}", gang.name),
            nodes: state.nodes().len(),
            rejected: Vec::new(),
            domains: Vec::new(),
            note: Some(format!(
                "no {} domain has {:.1} free GPUs",
                topology.key,
                needed as f64 / f64::from(MILLI)
            )),
        },
        |e| with_gang(e, gang),
    );
    err.domains = domains
        .values()
        .map(|d| DomainShortfall {
            domain: format!("{}={}", topology.key, d.name),
            nodes: d.nodes.len(),
            free_milli: d.free_milli,
            whole_free: d.whole_free,
            needed_milli: needed,
        })
        .collect();
    Err(err)
}

struct Domain {
    name: String,
    nodes: Vec<usize>,
    free_milli: u64,
    whole_free: u64,
}

fn domains_of(state: &ClusterState, key: &str) -> BTreeMap<String, Domain> {
    let mut out: BTreeMap<String, Domain> = BTreeMap::new();
    for (i, n) in state.nodes().iter().enumerate() {
        let Some(value) = n.labels.get(key) else {
            continue;
        };
        let d = out.entry(value.clone()).or_insert_with(|| Domain {
            name: value.clone(),
            nodes: Vec::new(),
            free_milli: 0,
            whole_free: 0,
        });
        d.nodes.push(i);
        d.free_milli += n.gpu_free_total();
        d.whole_free += n.fully_free_gpus() as u64;
    }
    out
}

/// Places the members in `order` on `scratch`; on failure undoes them and reports the
/// member that did not fit.
fn fill(
    scratch: &mut ClusterState,
    placer: &mut Placer,
    gang: &GangRequest,
    order: &[usize],
    allowed: &dyn Fn(usize) -> bool,
) -> Result<Vec<Assignment>, Unplaceable> {
    let mut assignments = Vec::with_capacity(order.len());
    for &m in order {
        let member = &gang.members[m];
        match placer.place_where(scratch, member, Tie::Rank, allowed) {
            Ok(p) => {
                scratch
                    .assume(p.node, member, &p.gpus)
                    .expect("placer only proposes fitting nodes");
                assignments.push(Assignment {
                    member: m,
                    node: p.node,
                    node_name: p.node_name,
                    gpus: p.gpus,
                });
            }
            Err(mut e) => {
                undo(scratch, gang, &assignments);
                e.note = Some(format!(
                    "member {} ({} of {}) does not fit after {} placed",
                    member.name,
                    m + 1,
                    gang.members.len(),
                    assignments.len()
                ));
                return Err(e);
            }
        }
    }
    assignments.sort_by_key(|a| a.member);
    Ok(assignments)
}

fn undo(scratch: &mut ClusterState, gang: &GangRequest, assignments: &[Assignment]) {
    for a in assignments.iter().rev() {
        scratch
            .forget(a.node, &gang.members[a.member], &a.gpus)
            .expect("undoing our own assume");
    }
}

fn with_gang(mut e: Unplaceable, gang: &GangRequest) -> Unplaceable {
    e.pod = format!("gang {}", gang.name);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Node;
    use crate::policy::{BestFit, GpuPacking};
    use crate::request::GpuDemand;

    fn zoned() -> ClusterState {
        ClusterState::new(vec![
            Node::new("a1", 64_000, 1 << 20, 8, Some("G2")).with_label("zone", "a"),
            Node::new("a2", 64_000, 1 << 20, 8, Some("G2")).with_label("zone", "a"),
            Node::new("b1", 64_000, 1 << 20, 8, Some("G2")).with_label("zone", "b"),
            Node::new("b2", 64_000, 1 << 20, 4, Some("G2")).with_label("zone", "b"),
        ])
    }

    fn gang(n: usize, gpus: u32, key: Option<(&str, bool)>) -> GangRequest {
        GangRequest {
            name: "g".into(),
            members: (0..n)
                .map(|i| PodRequest::new(format!("g-{i}"), 1000, 1024, GpuDemand::Whole(gpus)))
                .collect(),
            topology: key.map(|(k, required)| TopologyConstraint {
                key: k.into(),
                required,
            }),
        }
    }

    #[test]
    fn all_or_nothing() {
        let state = zoned();
        // 4 x 8 GPUs: only three nodes have 8.
        let err = place_gang(&state, &gang(4, 8, None), &GpuPacking).unwrap_err();
        assert!(err.note.unwrap().contains("after 3 placed"));
        let ok = place_gang(&state, &gang(3, 8, None), &GpuPacking).unwrap();
        assert_eq!(ok.assignments.len(), 3);
        let mut nodes: Vec<_> = ok.assignments.iter().map(|a| a.node).collect();
        nodes.sort();
        assert_eq!(nodes, vec![0, 1, 2]);
        let mut after = state.clone();
        ok.assume(&gang(3, 8, None), &mut after).unwrap();
        assert_eq!(after.gpu_used_milli(), 24_000);
        // The input state is untouched by a failed or successful placement.
        assert_eq!(state.gpu_used_milli(), 0);
    }

    #[test]
    fn placing_on_the_state_assumes_a_fit_and_leaves_a_misfit_untouched() {
        let mut state = zoned();
        let mut placer = Placer::new(&BestFit);
        // A required zone no domain can hold; four 8-GPU members on three 8-GPU nodes,
        // plain and with a preferred zone (three placed before the fourth fails).
        for g in [
            gang(5, 4, Some(("zone", true))),
            gang(4, 8, None),
            gang(4, 8, Some(("zone", false))),
        ] {
            assert!(place_gang_on(&mut state, &g, &mut placer).is_err());
            assert_eq!(state.gpu_used_milli(), 0, "{} left members behind", g.name);
        }
        let placed = place_gang_on(&mut state, &gang(2, 8, None), &mut placer).unwrap();
        assert_eq!(state.gpu_used_milli(), 16_000);
        // The same placer, reused: the next gang sees the first one's nodes as full.
        let next = place_gang_on(&mut state, &gang(1, 8, None), &mut placer).unwrap();
        let taken: Vec<usize> = placed.assignments.iter().map(|a| a.node).collect();
        assert!(!taken.contains(&next.assignments[0].node));
        assert!(place_gang_on(&mut state, &gang(1, 8, None), &mut placer).is_err());
        assert_eq!(state.gpu_used_milli(), 24_000);
    }

    #[test]
    fn required_topology_confines_to_one_zone() {
        let state = zoned();
        // 12 GPUs: zone b (8 + 4) holds it exactly and is the tightest fit.
        let g = gang(3, 4, Some(("zone", true)));
        let placed = place_gang(&state, &g, &BestFit).unwrap();
        assert_eq!(placed.domain.as_deref(), Some("zone=b"));
        assert!(placed.assignments.iter().all(|a| a.node >= 2));
        // 20 GPUs fit the cluster but no zone.
        let big = gang(5, 4, Some(("zone", true)));
        let err = place_gang(&state, &big, &BestFit).unwrap_err();
        assert_eq!(err.domains.len(), 2);
        assert_eq!(err.domains[0].free_milli, 16_000);
        assert_eq!(err.domains[0].needed_milli, 20_000);
        assert_eq!(
            err.to_string(),
            "gang g: 0/4 nodes are available; no zone domain has 20.0 free GPUs; \
             zone=a: 2 nodes, 16.0 GPUs free (16 whole), 20.0 needed; \
             zone=b: 2 nodes, 12.0 GPUs free (12 whole), 20.0 needed"
        );
        assert!(place_gang(&state, &gang(5, 4, None), &BestFit).is_ok());
    }

    #[test]
    fn preferred_topology_falls_back_to_few_domains() {
        let state = zoned();
        let g = gang(5, 4, Some(("zone", false)));
        let placed = place_gang(&state, &g, &BestFit).unwrap();
        assert_eq!(placed.domain, None);
        assert_eq!(placed.assignments.len(), 5);
        let fits = gang(2, 8, Some(("zone", false)));
        assert_eq!(
            place_gang(&state, &fits, &BestFit)
                .unwrap()
                .domain
                .as_deref(),
            Some("zone=a")
        );
    }
}
