//! Per-pod placement latency on a 1,500-node cluster: the 1,213 openb GPU nodes plus
//! 287 copies, half filled by the policy itself, then timed decisions on the default
//! trace's pods.

use std::fmt::Write as _;
use std::time::Instant;

use crate::cluster::{ClusterState, Node};
use crate::error::Result;
use crate::place::{Placer, Tie, place_pod};
use crate::policy::{self, POLICY_NAMES};
use crate::replay::{Workload, prepare};
use crate::simulate::SimulateArgs;
use crate::trace::default_dir;

pub const BENCH_NODES: usize = 1500;
const TIMED_PODS: usize = 2000;
const FILL: f64 = 0.5;

/// Latency figures of one policy, in microseconds per decision.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub policy: String,
    /// A new `Placer` per pod (nothing memoised across decisions).
    pub cold_mean_us: f64,
    pub cold_p99_us: f64,
    /// One `Placer` kept across pods (scores of unchanged nodes reused).
    pub warm_mean_us: f64,
    pub warm_p99_us: f64,
}

fn stats(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
    let p99 = v
        .get((v.len() * 99 / 100).min(v.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    (mean, p99)
}

pub fn bench_policy(workload: &Workload, nodes: &[Node], name: &str) -> Result<BenchResult> {
    let prepared = prepare(workload, 42, 1.3);
    let scorer = policy::by_name(name, &workload.frag, prepared.rng)?;
    let fill_target = (FILL
        * nodes
            .iter()
            .map(|n| n.gpu_count() as f64 * 1000.0)
            .sum::<f64>()) as u64;
    let mut pods = prepared.pods.iter().cycle();
    let mut timings = Vec::new();
    for warm in [false, true] {
        let mut state = ClusterState::new(nodes.to_vec());
        let mut placer = Placer::new(scorer.as_ref());
        while state.gpu_used_milli() < fill_target {
            let pod = pods.next().expect("cycle");
            if let Ok(p) = placer.place(&state, pod, Tie::Rank) {
                state.assume(p.node, pod, &p.gpus)?;
            }
        }
        let mut times = Vec::with_capacity(TIMED_PODS);
        for _ in 0..TIMED_PODS {
            let pod = pods.next().expect("cycle");
            let start = Instant::now();
            let placed = if warm {
                placer.place(&state, pod, Tie::Rank)
            } else {
                place_pod(&state, pod, scorer.as_ref())
            };
            times.push(start.elapsed().as_secs_f64() * 1e6);
            if let Ok(p) = placed {
                state.assume(p.node, pod, &p.gpus)?;
            }
        }
        timings.push(stats(times));
    }
    Ok(BenchResult {
        policy: name.to_string(),
        cold_mean_us: timings[0].0,
        cold_p99_us: timings[0].1,
        warm_mean_us: timings[1].0,
        warm_p99_us: timings[1].1,
    })
}

/// The 1,213 GPU nodes and copies of the first ones up to `BENCH_NODES`.
pub fn bench_nodes(workload: &Workload) -> Vec<Node> {
    let mut nodes = workload.nodes.clone();
    let extra: Vec<Node> = workload
        .nodes
        .iter()
        .take(BENCH_NODES.saturating_sub(nodes.len()))
        .map(|n| {
            let mut copy = n.clone();
            copy.name = format!("{}-copy", n.name);
            copy
        })
        .collect();
    nodes.extend(extra);
    nodes
}

/// `ringmaster-simulate --bench`: every policy named in `--policies`, as a text table.
pub fn run(args: &SimulateArgs) -> Result<String> {
    let dir = args.traces_dir.clone().unwrap_or_else(default_dir);
    let workload = Workload::load(&dir, "default")?;
    let nodes = bench_nodes(&workload);
    let names: Vec<String> = if args.policies == "all" {
        POLICY_NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        args.policies
            .split(',')
            .map(|s| s.trim().to_string())
            .collect()
    };
    let mut s = String::new();
    let _ = writeln!(
        s,
        "per-pod placement latency, {} nodes, {:.0}% GPU allocated, {TIMED_PODS} pods (microseconds)",
        nodes.len(),
        FILL * 100.0
    );
    let _ = writeln!(
        s,
        "{:<14} {:>10} {:>10} {:>10} {:>10}",
        "policy", "cold mean", "cold p99", "warm mean", "warm p99"
    );
    for name in &names {
        let r = bench_policy(&workload, &nodes, name)?;
        let _ = writeln!(
            s,
            "{:<14} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            r.policy, r.cold_mean_us, r.cold_p99_us, r.warm_mean_us, r.warm_p99_us
        );
    }
    Ok(s)
}
