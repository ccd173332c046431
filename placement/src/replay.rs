//! The openb trace replay of the FGD paper, exactly as `data/traces/REPLAY.md` specifies:
//! GPU nodes only, name-sorted pods shuffled by Go's `math/rand`, inflation clones
//! appended, 10 reflector draws, the seeded node ranking, then one decision per pod with
//! no departures.

use std::path::Path;

use crate::cluster::{ClusterState, Node};
use crate::error::Result;
use crate::filter::{self, Resolved};
use crate::gang::{GangRequest, TopologyConstraint, place_gang_on};
use crate::gorand::GoRand;
use crate::metrics::Event;
use crate::place::{Placer, Tie};
use crate::policy::{self, FragModel};
use crate::request::{GpuDemand, PodRequest};
use crate::trace;

/// The paper's traces (`REPLAY.md` §1), in its table order.
pub const PAPER_TRACES: [&str; 17] = [
    "default",
    "cpu050",
    "cpu100",
    "cpu200",
    "cpu250",
    "gpushare40",
    "gpushare60",
    "gpushare80",
    "gpushare100",
    "gpuspec10",
    "gpuspec20",
    "gpuspec25",
    "gpuspec33",
    "multigpu20",
    "multigpu30",
    "multigpu40",
    "multigpu50",
];

/// Reflectors started after the seed, each drawing one `Float64` (`REPLAY.md` §3).
const REFLECTOR_DRAWS: usize = 10;

/// How equal best scores are broken.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TieMode {
    /// The paper's rule: the per-seed node ranking.
    Fixed,
    /// A fresh uniform choice among the tied nodes at every decision.
    Random,
}

/// One trace loaded once and replayed for many policies and seeds.
pub struct Workload {
    pub name: String,
    /// GPU nodes, sorted by name.
    pub nodes: Vec<Node>,
    /// Trace pods sorted by name (the simulator sorts before shuffling).
    pub pods: Vec<PodRequest>,
    /// Typical pods of the untuned trace, shared by FGD, ours and the metric.
    pub frag: FragModel,
}

impl Workload {
    pub fn load(trace_dir: &Path, name: &str) -> Result<Workload> {
        let dir = trace_dir.join("alibaba-gpu-v2023");
        let mut nodes = trace::read_nodes(&dir.join("openb_node_list_gpu_node.csv"))?;
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let mut pods = trace::read_pods(&dir.join(format!("openb_pod_list_{name}.csv")))?;
        pods.sort_by(|a, b| a.name.cmp(&b.name));
        let frag = FragModel::from_workload(&pods);
        Ok(Workload {
            name: name.to_string(),
            nodes,
            pods,
            frag,
        })
    }

    pub fn gpu_capacity_milli(&self) -> u64 {
        self.nodes.iter().map(|n| n.gpu_count() as u64 * 1000).sum()
    }
}

/// Options beyond the paper's rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayOptions {
    pub ties: TieMode,
    /// Place a multi-GPU pod that fits no single node as a gang of 1-GPU members inside
    /// one zone (nodes get a synthetic `zone` label, `ZONES` round-robin by name).
    pub gang_split: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            ties: TieMode::Fixed,
            gang_split: false,
        }
    }
}

/// Synthetic zones for the gang check.
pub const ZONES: usize = 8;

/// Result of one (policy, seed) run.
#[derive(Clone, Debug)]
pub struct Run {
    pub policy: String,
    pub seed: u64,
    pub events: Vec<Event>,
    pub pods: usize,
    pub failed: usize,
    /// Failed pods that ask for no GPU.
    pub failed_cpu_only: usize,
    /// Failed pods that no node of the cluster could host even when empty.
    pub impossible: usize,
    /// Multi-GPU pods placed as zone-confined gangs (with `gang_split`).
    pub gangs: usize,
    pub gang_gpus: u64,
}

/// Pod order, inflation and node ranks of one seed, with the stream positioned after
/// them (where the scheduler's own draws start).
pub struct Prepared {
    pub pods: Vec<PodRequest>,
    pub ranks: Vec<u32>,
    pub rng: GoRand,
}

pub fn prepare(workload: &Workload, seed: u64, tune: f64) -> Prepared {
    let mut rng = GoRand::new(seed as i64);
    rng.int();
    let mut pods = workload.pods.clone();
    rng.shuffle(&mut pods);
    let demand = |p: &PodRequest| p.gpu.total_milli();
    let mut total: u64 = workload.pods.iter().map(demand).sum();
    let target = tune * workload.gpu_capacity_milli() as f64;
    if (total as f64) < target {
        let mut i = 0;
        loop {
            let p = &workload.pods[rng.intn(workload.pods.len())];
            // The simulator's guard adds the per-GPU milli, not the pod's total.
            if (total + u64::from(p.gpu.devices_and_milli().1)) as f64 > target {
                break;
            }
            total += demand(p);
            let mut clone = p.clone();
            clone.name = format!("{}-tuned-{i}", p.name);
            pods.push(clone);
            i += 1;
        }
    } else {
        while total as f64 > target {
            let p = pods.remove(rng.intn(pods.len()));
            total -= demand(&p);
        }
    }
    for _ in 0..REFLECTOR_DRAWS {
        rng.float64();
    }
    let ranks = rng
        .perm(workload.nodes.len())
        .into_iter()
        .map(|r| r as u32)
        .collect();
    Prepared { pods, ranks, rng }
}

/// Where FGD-style policies get their typical pods from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// The whole untuned trace, known in advance (the paper's rule).
    Trace,
    /// Only the pods that have arrived so far (the arriving one included), as a
    /// scheduler learns them from the pods it has seen; refreshed on the schedule of
    /// [`next_refresh`].
    Online,
}

/// Policy names may end in `-online` for [`ModelSource::Online`]: `fragpack-online`.
pub fn split_policy(name: &str) -> (&str, ModelSource) {
    match name.strip_suffix("-online") {
        Some(base) => (base, ModelSource::Online),
        None => (name, ModelSource::Trace),
    }
}

/// Largest number of arrivals between two refreshes of an online model.
pub const ONLINE_MAX_STEP: usize = 1000;

/// After a model learned from `seen` pods, the pod count at which to learn it again:
/// each time the count doubles (the shape frequencies' sampling error shrinks like
/// 1/sqrt(n), so later pods change the model less), and at least every
/// `ONLINE_MAX_STEP` pods, so a workload that drifts is followed. That is about 20
/// rebuilds for 11,000 pods, each of which drops the placer's memoised scores.
pub fn next_refresh(seen: usize) -> usize {
    seen + seen.clamp(1, ONLINE_MAX_STEP)
}

/// Replays one policy on one seed at the paper's 130% inflation.
pub fn replay(workload: &Workload, policy: &str, seed: u64, options: ReplayOptions) -> Result<Run> {
    let Prepared { pods, ranks, rng } = prepare(workload, seed, 1.3);
    let mut tie_rng = rng.clone();
    let (base, source) = split_policy(policy);
    let mut state = ClusterState::new(workload.nodes.clone());
    state.set_ranks(ranks);
    let zone = |i: usize| format!("zone-{}", i % ZONES);
    if options.gang_split {
        for i in 0..workload.nodes.len() {
            let mut n = state.node(i).clone();
            n.labels.insert("zone".into(), zone(i));
            state.add_node(n);
        }
    }
    let mut frag: Vec<f64> = state
        .nodes()
        .iter()
        .map(|n| workload.frag.node_frag(n))
        .collect();
    let mut frag_total: f64 = frag.iter().sum();
    let mut run = Run {
        policy: policy.to_string(),
        seed,
        events: Vec::with_capacity(pods.len()),
        pods: pods.len(),
        failed: 0,
        failed_cpu_only: 0,
        impossible: 0,
        gangs: 0,
        gang_gpus: 0,
    };
    let (mut arrived, mut used) = (0u64, 0u64);
    // One segment of pods per typical-pod model: the whole run with the trace's model,
    // or the stretches between refreshes of an online one.
    let mut start = 0;
    while start < pods.len() {
        let (model, end) = match source {
            ModelSource::Trace => (workload.frag.clone(), pods.len()),
            ModelSource::Online => (
                FragModel::from_workload(&pods[..=start]),
                next_refresh(start + 1) - 1,
            ),
        };
        let end = end.min(pods.len());
        let scorer = policy::by_name(base, &model, rng.clone())?;
        let mut placer = Placer::new(scorer.as_ref());
        for pod in &pods[start..end] {
            arrived += pod.gpu.total_milli();
            let tie = match options.ties {
                TieMode::Fixed => Tie::Rank,
                TieMode::Random => Tie::Random(&mut tie_rng),
            };
            let mut touched = Vec::new();
            match placer.place(&state, pod, tie) {
                Ok(p) => {
                    state.assume(p.node, pod, &p.gpus)?;
                    used += pod.gpu.total_milli();
                    touched.push(p.node);
                }
                Err(_) => match pod.gpu {
                    GpuDemand::Whole(k) if options.gang_split && k > 1 => {
                        let gang = split_gang(pod, k);
                        match place_gang_on(&mut state, &gang, &mut placer) {
                            Ok(g) => {
                                used += pod.gpu.total_milli();
                                run.gangs += 1;
                                run.gang_gpus += u64::from(k);
                                touched.extend(g.assignments.iter().map(|a| a.node));
                            }
                            Err(_) => run.failed += 1,
                        }
                    }
                    _ => run.failed += 1,
                },
            }
            if touched.is_empty() {
                if pod.gpu == GpuDemand::None {
                    run.failed_cpu_only += 1;
                }
                let resolved = Resolved::new(pod);
                if !workload
                    .nodes
                    .iter()
                    .any(|n| filter::check(n, &resolved).is_ok())
                {
                    run.impossible += 1;
                }
            }
            for i in touched {
                let f = workload.frag.node_frag(state.node(i));
                frag_total += f - frag[i];
                frag[i] = f;
            }
            run.events.push(Event {
                arrived_milli: arrived,
                used_milli: used,
                frag_milli: frag_total,
            });
        }
        start = end;
    }
    Ok(run)
}

/// A k-GPU pod as k one-GPU members sharing its CPU and memory, confined to one zone.
fn split_gang(pod: &PodRequest, k: u32) -> GangRequest {
    let members = (0..k)
        .map(|i| PodRequest {
            name: format!("{}-{i}", pod.name),
            cpu_milli: pod.cpu_milli.div_ceil(u64::from(k)),
            memory_mib: pod.memory_mib.div_ceil(u64::from(k)),
            gpu: GpuDemand::Whole(1),
            ..pod.clone()
        })
        .collect();
    GangRequest {
        name: pod.name.clone(),
        members,
        topology: Some(TopologyConstraint {
            key: "zone".into(),
            required: true,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 16 two-GPU nodes in 8 zones of two: a 4-GPU pod fits no node but fits each zone.
    fn small() -> Workload {
        let nodes: Vec<Node> = (0..16)
            .map(|i| Node::new(format!("n{i:02}"), 32_000, 1 << 20, 2, Some("T4")))
            .collect();
        let pods = vec![PodRequest::new("big", 8000, 1024, GpuDemand::Whole(4))];
        Workload {
            name: "small".into(),
            frag: FragModel::from_workload(&pods),
            nodes,
            pods,
        }
    }

    #[test]
    fn inflation_clones_until_130_percent() {
        let prepared = prepare(&small(), 42, 1.3);
        // 32 GPUs: clones of the 4-GPU pod are added while the total stays <= 41.6 GPUs
        // under the per-GPU guard (the last one overshoots to 44).
        assert_eq!(prepared.pods.len(), 11);
        assert!(prepared.pods[1].name.starts_with("big-tuned-"));
        let mut ranks = prepared.ranks.clone();
        ranks.sort();
        assert_eq!(ranks, (0..16).collect::<Vec<u32>>());
    }

    #[test]
    fn online_model_refreshes_on_doubling_then_every_step() {
        let mut at = vec![1];
        while *at.last().unwrap() < 5000 {
            at.push(next_refresh(*at.last().unwrap()));
        }
        assert_eq!(&at[..5], &[1, 2, 4, 8, 16]);
        assert_eq!(&at[at.len() - 3..], &[3024, 4024, 5024]);
        assert_eq!(
            split_policy("fragpack-online"),
            ("fragpack", ModelSource::Online)
        );
        assert_eq!(split_policy("fgd"), ("fgd", ModelSource::Trace));
    }

    #[test]
    fn gang_split_places_unfit_pods_inside_one_zone() {
        let w = small();
        let plain = replay(&w, "bestfit", 42, ReplayOptions::default()).unwrap();
        assert_eq!((plain.gangs, plain.failed, plain.impossible), (0, 11, 11));
        let options = ReplayOptions {
            gang_split: true,
            ..ReplayOptions::default()
        };
        let run = replay(&w, "bestfit", 42, options).unwrap();
        assert_eq!((run.gangs, run.gang_gpus, run.failed), (8, 32, 3));
        assert_eq!(run.events.last().unwrap().used_milli, 32_000);
    }
}
