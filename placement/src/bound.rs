//! An upper bound on the GPU allocation any scheduler can reach on a replayed arrival
//! sequence: the linear-programming relaxation over node types.
//!
//! Pods never leave in the replay, so at every event the allocation is the GPU demand
//! of a set of arrived pods that fits the cluster at once. The relaxation keeps, per
//! node *type* (equal CPU, memory, GPU count, model, labels, taints), only aggregate
//! capacity, and lets any arrived GPU pod be dropped:
//!
//! ```text
//! maximise   Σ gpu(c) · y[c,t]                  y[c,t] = pods of class c on type t (real)
//! subject to Σ_t y[c,t] ≤ arrived(c)             (= arrived(c) for CPU-only classes, see Rule)
//!            Σ_c cpu(c) · y[c,t] ≤ N(t) · cpu(t)  memory and milli-GPU alike
//!            Σ_c w_k(c) · y[c,t] ≤ N(t) · gpus(t) · (k − 1)   k = 2, 3, 4
//!            y[c,t] = 0 unless a pod of class c fits an empty node of type t
//! ```
//!
//! `w_k` counts what a device can hold: a share above 1000/k milli takes one of the at
//! most k − 1 such slots of its device, a whole GPU takes all k − 1. What it relaxes:
//! pods may be split across nodes and devices of a type (beyond the slot rows), the pod
//! order and the rule that a pod is placed whenever it fits are ignored (any GPU pod may
//! be dropped), and the pod-count limit (1001 in the trace) is ignored.
//!
//! The value reported is not the simplex's primal optimum but the dual objective at the
//! type prices it found, recomputed from the problem: by weak duality any non-negative
//! prices give an upper bound, so rounding inside the solver cannot make it invalid, and
//! one set of prices bounds every prefix of the sequence (only the counts change).

use crate::cluster::Node;
use crate::filter::{self, Resolved};
use crate::metrics::{Event, Measure, curve};
use crate::replay::{Workload, prepare};
use crate::request::{GpuDemand, MILLI, PodRequest};

/// Which arrived pods the relaxation may leave out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Any pod. A bound on every scheduler, even one that refuses pods.
    AnyDropped,
    /// Every arrived CPU-only pod that fits an empty node is placed; GPU pods may be
    /// dropped. A bound on every scheduler that places all CPU-only pods, which the
    /// paper's rule (place whenever some node fits) does until CPU runs out; the
    /// replay counts CPU-only failures so this can be checked per run.
    CpuOnlyPlaced,
}

/// Device slot rows: a share above 1000/k milli uses one of k − 1 slots per device.
const SLOT_KS: [u32; 3] = [2, 3, 4];

/// Objective weight of a CPU-only pod under `Rule::CpuOnlyPlaced`, in GPUs: larger than
/// any GPU pod (8 GPUs), so the LP places all of them first when they fit.
const FORCED_WEIGHT: f64 = 1000.0;

/// Nodes of one shape, with an empty representative.
#[derive(Clone, Debug)]
pub struct NodeType {
    pub node: Node,
    pub count: f64,
}

/// Pods of one shape (the representative's name is that of the first one seen).
#[derive(Clone, Debug)]
pub struct PodClass {
    pub pod: PodRequest,
}

/// The static part of the relaxation: types, classes and which class fits which type.
pub struct Problem {
    pub types: Vec<NodeType>,
    pub classes: Vec<PodClass>,
    fits: Vec<Vec<bool>>,
}

/// Per node type: prices of CPU (per milli), memory (per MiB), GPU (per milli) and of
/// each device slot row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Prices {
    cpu: Vec<f64>,
    mem: Vec<f64>,
    gpu: Vec<f64>,
    slots: Vec<[f64; SLOT_KS.len()]>,
}

fn same_type(a: &Node, b: &Node) -> bool {
    a.cpu_milli == b.cpu_milli
        && a.memory_mib == b.memory_mib
        && a.gpu_count() == b.gpu_count()
        && a.gpu_model == b.gpu_model
        && a.labels == b.labels
        && a.taints == b.taints
}

fn same_class(a: &PodRequest, b: &PodRequest) -> bool {
    PodRequest {
        name: String::new(),
        ..a.clone()
    } == PodRequest {
        name: String::new(),
        ..b.clone()
    }
}

/// Slot weight of a pod in the row for k: how many of a device's k − 1 slots it uses.
fn slot_weight(gpu: GpuDemand, k: u32) -> f64 {
    match gpu {
        GpuDemand::None => 0.0,
        GpuDemand::Share(m) if m * k > MILLI => 1.0,
        GpuDemand::Share(_) => 0.0,
        GpuDemand::Whole(n) => f64::from(n * (k - 1)),
    }
}

impl Problem {
    /// Groups `nodes` (taken empty) into types and `pods` into classes; `class_of[i]`
    /// is the class of `pods[i]`.
    pub fn new(nodes: &[Node], pods: &[PodRequest]) -> (Problem, Vec<usize>) {
        let mut types: Vec<NodeType> = Vec::new();
        for n in nodes {
            match types.iter_mut().find(|t| same_type(&t.node, n)) {
                Some(t) => t.count += 1.0,
                None => {
                    let mut empty = Node::new(
                        n.name.clone(),
                        n.cpu_milli,
                        n.memory_mib,
                        n.gpu_count(),
                        n.gpu_model.as_deref(),
                    )
                    .with_max_pods(n.max_pods);
                    empty.labels = n.labels.clone();
                    empty.taints = n.taints.clone();
                    types.push(NodeType {
                        node: empty,
                        count: 1.0,
                    });
                }
            }
        }
        let mut classes: Vec<PodClass> = Vec::new();
        // Classes with the same CPU and GPU demand, to keep the search short.
        let mut by_shape: std::collections::HashMap<(u64, GpuDemand), Vec<usize>> =
            Default::default();
        let class_of = pods
            .iter()
            .map(|p| {
                let bucket = by_shape.entry((p.cpu_milli, p.gpu)).or_default();
                match bucket.iter().find(|&&c| same_class(&classes[c].pod, p)) {
                    Some(&c) => c,
                    None => {
                        classes.push(PodClass { pod: p.clone() });
                        bucket.push(classes.len() - 1);
                        classes.len() - 1
                    }
                }
            })
            .collect();
        let fits = classes
            .iter()
            .map(|c| {
                let r = Resolved::new(&c.pod);
                types
                    .iter()
                    .map(|t| filter::check(&t.node, &r).is_ok())
                    .collect()
            })
            .collect();
        (
            Problem {
                types,
                classes,
                fits,
            },
            class_of,
        )
    }

    fn forced(&self, c: usize, rule: Rule) -> bool {
        rule == Rule::CpuOnlyPlaced
            && self.classes[c].pod.gpu == GpuDemand::None
            && self.fits[c].iter().any(|&f| f)
    }

    fn cost(&self, prices: &Prices, c: usize, t: usize) -> f64 {
        let p = &self.classes[c].pod;
        let mut cost = p.cpu_milli as f64 * prices.cpu[t]
            + p.memory_mib as f64 * prices.mem[t]
            + p.gpu.total_milli() as f64 * prices.gpu[t];
        for (i, &k) in SLOT_KS.iter().enumerate() {
            cost += slot_weight(p.gpu, k) * prices.slots[t][i];
        }
        cost
    }

    /// The dual objective at `prices` for `counts` arrived pods per class: an upper
    /// bound, in milli-GPU, on the allocation of those pods (weak duality), whatever
    /// the prices (negative ones are taken as 0).
    pub fn dual_value(&self, prices: &Prices, counts: &[u64], rule: Rule) -> f64 {
        let prices = Prices {
            cpu: prices.cpu.iter().map(|v| v.max(0.0)).collect(),
            mem: prices.mem.iter().map(|v| v.max(0.0)).collect(),
            gpu: prices.gpu.iter().map(|v| v.max(0.0)).collect(),
            slots: prices.slots.iter().map(|s| s.map(|v| v.max(0.0))).collect(),
        };
        let mut value = 0.0;
        for (t, ty) in self.types.iter().enumerate() {
            let n = &ty.node;
            let mut capacity = n.cpu_milli as f64 * prices.cpu[t]
                + n.memory_mib as f64 * prices.mem[t]
                + (n.gpu_count() as u64 * u64::from(MILLI)) as f64 * prices.gpu[t];
            for (i, &k) in SLOT_KS.iter().enumerate() {
                capacity += (n.gpu_count() as u64 * u64::from(k - 1)) as f64 * prices.slots[t][i];
            }
            value += ty.count * capacity;
        }
        for (c, &count) in counts.iter().enumerate() {
            if count == 0 {
                continue;
            }
            let costs = (0..self.types.len())
                .filter(|&t| self.fits[c][t])
                .map(|t| self.cost(&prices, c, t));
            // A class's dual: the best profit of one more pod over the types it fits.
            let u = if self.forced(c, rule) {
                -costs.fold(f64::INFINITY, f64::min)
            } else {
                let gain = self.classes[c].pod.gpu.total_milli() as f64;
                costs.fold(0.0_f64, |u, cost| u.max(gain - cost))
            };
            value += count as f64 * u;
        }
        value
    }

    /// Solves the relaxation for `counts` and returns the type prices (the dual).
    pub fn solve(&self, counts: &[u64], rule: Rule) -> Result<Prices, String> {
        // Columns: (class, type) pairs that fit; units GPUs, cores and GiB keep the
        // tableau's magnitudes close.
        let (gpu_unit, cpu_unit, mem_unit) = (1000.0, 1000.0, 1024.0);
        let ntypes = self.types.len();
        let rows_per_type = 3 + SLOT_KS.len();
        let nclass = self.classes.len();
        let nrows = nclass + ntypes * rows_per_type;
        let mut columns: Vec<(Vec<(usize, f64)>, f64)> = Vec::new();
        for (c, class) in self.classes.iter().enumerate() {
            if counts[c] == 0 {
                continue;
            }
            let p = &class.pod;
            let objective = if self.forced(c, rule) {
                FORCED_WEIGHT
            } else {
                p.gpu.total_milli() as f64 / gpu_unit
            };
            if objective == 0.0 {
                continue;
            }
            for t in (0..ntypes).filter(|&t| self.fits[c][t]) {
                let base = nclass + t * rows_per_type;
                let mut col = vec![
                    (c, 1.0),
                    (base, p.cpu_milli as f64 / cpu_unit),
                    (base + 1, p.memory_mib as f64 / mem_unit),
                    (base + 2, p.gpu.total_milli() as f64 / gpu_unit),
                ];
                for (i, &k) in SLOT_KS.iter().enumerate() {
                    col.push((base + 3 + i, slot_weight(p.gpu, k)));
                }
                col.retain(|&(_, v)| v != 0.0);
                columns.push((col, objective));
            }
        }
        let mut rhs = vec![0.0; nrows];
        for (c, &n) in counts.iter().enumerate() {
            rhs[c] = n as f64;
        }
        for (t, ty) in self.types.iter().enumerate() {
            let base = nclass + t * rows_per_type;
            let n = &ty.node;
            let gpus = n.gpu_count() as f64;
            rhs[base] = ty.count * n.cpu_milli as f64 / cpu_unit;
            rhs[base + 1] = ty.count * n.memory_mib as f64 / mem_unit;
            rhs[base + 2] = ty.count * gpus;
            for (i, &k) in SLOT_KS.iter().enumerate() {
                rhs[base + 3 + i] = ty.count * gpus * f64::from(k - 1);
            }
        }
        let duals = simplex_max(&columns, &rhs)?;
        // Back to per-milli prices of the bound's units; the objective was in GPUs, so
        // prices scale by 1000 (milli-GPU per GPU) over the row's unit.
        let scale = gpu_unit;
        let mut prices = Prices::default();
        for t in 0..ntypes {
            let base = nclass + t * rows_per_type;
            prices.cpu.push(duals[base] * scale / cpu_unit);
            prices.mem.push(duals[base + 1] * scale / mem_unit);
            prices.gpu.push(duals[base + 2] * scale / gpu_unit);
            let mut slots = [0.0; SLOT_KS.len()];
            for (i, s) in slots.iter_mut().enumerate() {
                *s = duals[base + 3 + i] * scale;
            }
            prices.slots.push(slots);
        }
        Ok(prices)
    }

    /// The bound for `counts`: solve, then the certified dual value.
    pub fn bound(&self, counts: &[u64], rule: Rule) -> Result<f64, String> {
        let prices = self.solve(counts, rule)?;
        Ok(self.dual_value(&prices, counts, rule))
    }
}

/// Dense-tableau simplex for `max cᵀx, Ax ≤ b, x ≥ 0` with `b ≥ 0` (so the slack basis
/// is feasible). `columns` holds the sparse columns of A with their c. Returns the
/// row duals (shadow prices), which is all the bound needs.
fn simplex_max(columns: &[(Vec<(usize, f64)>, f64)], b: &[f64]) -> Result<Vec<f64>, String> {
    const EPS: f64 = 1e-9;
    let m = b.len();
    let n = columns.len();
    let width = n + m + 1;
    // Row i of the tableau, then the reduced-cost row (entries c_j − z_j).
    let mut t = vec![0.0; (m + 1) * width];
    for (j, (col, _)) in columns.iter().enumerate() {
        for &(i, v) in col {
            t[i * width + j] = v;
        }
    }
    for i in 0..m {
        t[i * width + n + i] = 1.0;
        t[i * width + n + m] = b[i];
    }
    for (j, (_, c)) in columns.iter().enumerate() {
        t[m * width + j] = *c;
    }
    let mut basis: Vec<usize> = (n..n + m).collect();
    // Dantzig's rule, switching to Bland's (no cycling) after a run of degenerate pivots.
    let mut degenerate = 0;
    let limit = 50 * (n + m) + 1000;
    for _ in 0..limit {
        let cost = &t[m * width..m * width + n + m];
        let entering = if degenerate < 50 {
            cost.iter()
                .enumerate()
                .filter(|&(_, &r)| r > EPS)
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map(|(j, _)| j)
        } else {
            cost.iter().position(|&r| r > EPS)
        };
        let Some(e) = entering else {
            let duals = (0..m).map(|i| -t[m * width + n + i]).collect();
            return Ok(duals);
        };
        let mut leave: Option<(usize, f64)> = None;
        for i in 0..m {
            let a = t[i * width + e];
            if a > EPS {
                let ratio = t[i * width + n + m] / a;
                let better = match leave {
                    None => true,
                    Some((l, r)) => ratio < r - EPS || (ratio <= r + EPS && basis[i] < basis[l]),
                };
                if better {
                    leave = Some((i, ratio));
                }
            }
        }
        let Some((l, ratio)) = leave else {
            return Err(format!("simplex: column {e} is unbounded"));
        };
        degenerate = if ratio <= EPS { degenerate + 1 } else { 0 };
        let pivot = t[l * width + e];
        for x in &mut t[l * width..(l + 1) * width] {
            *x /= pivot;
        }
        let pivot_row: Vec<f64> = t[l * width..(l + 1) * width].to_vec();
        for i in 0..=m {
            if i == l {
                continue;
            }
            let f = t[i * width + e];
            if f != 0.0 {
                for (x, &p) in t[i * width..(i + 1) * width].iter_mut().zip(&pivot_row) {
                    *x -= f * p;
                }
            }
        }
        basis[l] = e;
    }
    Err(format!("simplex: no optimum after {limit} pivots"))
}

/// The bound at `pct`% arrived demand for one seed, on the paper's metric: each event
/// of the bucket (and of its neighbours, which the metric falls back to) gets the bound
/// of its arrived pods, and the bucket is averaged exactly like an allocation curve.
/// Two LPs are solved (at the first and last event of that window); each event takes
/// the lower of the two certified values.
pub fn bound_at(workload: &Workload, seed: u64, pct: usize, rule: Rule) -> Result<f64, String> {
    let prepared = prepare(workload, seed, 1.3);
    let (problem, class_of) = Problem::new(&workload.nodes, &prepared.pods);
    let total_gpus = workload.gpu_capacity_milli() / u64::from(MILLI);
    let bucket = |arrived: u64| (arrived as f64 / total_gpus as f64 / 10.0).round_ties_even();
    let in_window = |arrived: u64| (bucket(arrived) - pct as f64).abs() <= 1.0;
    let mut counts = vec![0u64; problem.classes.len()];
    let mut arrived = 0u64;
    // Counts and arrived demand at each event of the window.
    let mut window: Vec<(Vec<u64>, u64)> = Vec::new();
    for (pod, &c) in prepared.pods.iter().zip(&class_of) {
        counts[c] += 1;
        arrived += pod.gpu.total_milli();
        if in_window(arrived) {
            window.push((counts.clone(), arrived));
        }
    }
    let (Some(first), Some(last)) = (window.first(), window.last()) else {
        return Err(format!(
            "{} seed {seed}: no event arrives near {pct}%",
            workload.name
        ));
    };
    let prices = [
        problem.solve(&first.0, rule)?,
        problem.solve(&last.0, rule)?,
    ];
    let capacity = workload.gpu_capacity_milli() as f64;
    let events: Vec<Event> = window
        .iter()
        .map(|(counts, arrived)| {
            let b = prices
                .iter()
                .map(|p| problem.dual_value(p, counts, rule))
                .fold(capacity, f64::min);
            Event {
                arrived_milli: *arrived,
                // Allocations are whole milli-GPU, so the floor still bounds them.
                used_milli: b.floor().max(0.0) as u64,
                frag_milli: 0.0,
            }
        })
        .collect();
    curve(&events, total_gpus, Measure::Allocation, pct)[pct]
        .ok_or_else(|| format!("{} seed {seed}: empty {pct}% bucket", workload.name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound(nodes: &[Node], pods: &[PodRequest], rule: Rule) -> f64 {
        let (problem, class_of) = Problem::new(nodes, pods);
        let mut counts = vec![0; problem.classes.len()];
        for c in class_of {
            counts[c] += 1;
        }
        problem.bound(&counts, rule).unwrap()
    }

    fn gpu_pod(cpu: u64, gpu: GpuDemand) -> PodRequest {
        PodRequest::new("p", cpu, 1024, gpu)
    }

    #[test]
    fn cpu_limits_gpu_pods() {
        // 2 GPUs but 8 cores; pods of 1 GPU and 6 cores: only 8/6 of a pod fits by CPU.
        let nodes = [Node::new("n", 8000, 1 << 20, 2, Some("T4"))];
        let pods = vec![gpu_pod(6000, GpuDemand::Whole(1)); 2];
        let b = bound(&nodes, &pods, Rule::AnyDropped);
        assert!((b - 4000.0 / 3.0).abs() < 1e-6, "{b}");
    }

    #[test]
    fn gpu_model_limits_pods() {
        // Three 1-GPU pods that need a V100: only the V100 node's GPU counts.
        let nodes = [
            Node::new("t4", 64_000, 1 << 20, 1, Some("T4")),
            Node::new("v100", 64_000, 1 << 20, 1, Some("V100")),
        ];
        let pods = vec![gpu_pod(1000, GpuDemand::Whole(1)).with_gpu_models(&["V100"]); 3];
        let b = bound(&nodes, &pods, Rule::AnyDropped);
        assert!((b - 1000.0).abs() < 1e-6, "{b}");
    }

    #[test]
    fn cpu_only_pods_take_cpu_when_they_must_be_placed() {
        // 8 cores, 2 GPUs; a 4-core CPU-only pod and two 1-GPU pods of 3 cores.
        let nodes = [Node::new("n", 8000, 1 << 20, 2, Some("T4"))];
        let mut pods = vec![gpu_pod(3000, GpuDemand::Whole(1)); 2];
        pods.push(gpu_pod(4000, GpuDemand::None));
        // Dropping the CPU-only pod leaves room for both GPU pods.
        assert!((bound(&nodes, &pods, Rule::AnyDropped) - 2000.0).abs() < 1e-6);
        // Placing it leaves 4 cores: 4/3 of a GPU pod.
        let b = bound(&nodes, &pods, Rule::CpuOnlyPlaced);
        assert!((b - 4000.0 / 3.0).abs() < 1e-6, "{b}");
    }

    #[test]
    fn shares_over_half_take_a_device_each() {
        // Three 600-milli shares on 2 GPUs: the milli-GPU row allows 1800, but a device
        // holds only one share over half.
        let nodes = [Node::new("n", 64_000, 1 << 20, 2, Some("T4"))];
        let pods = vec![gpu_pod(1000, GpuDemand::Share(600)); 3];
        let b = bound(&nodes, &pods, Rule::AnyDropped);
        assert!((b - 1200.0).abs() < 1e-6, "{b}");
        // Shares that pair up fill both devices.
        let pods = vec![gpu_pod(1000, GpuDemand::Share(500)); 5];
        assert!((bound(&nodes, &pods, Rule::AnyDropped) - 2000.0).abs() < 1e-6);
    }

    #[test]
    fn pods_larger_than_any_node_count_nothing() {
        let nodes = [Node::new("n", 64_000, 1 << 20, 2, Some("T4"))];
        let pods = vec![gpu_pod(1000, GpuDemand::Whole(4))];
        assert!(bound(&nodes, &pods, Rule::CpuOnlyPlaced).abs() < 1e-6);
    }

    #[test]
    fn any_prices_give_an_upper_bound() {
        // Zero prices: every arrived GPU pod counts, plus nothing for capacity.
        let nodes = [Node::new("n", 8000, 1 << 20, 2, Some("T4"))];
        let pods = vec![gpu_pod(6000, GpuDemand::Whole(1)); 2];
        let (problem, _) = Problem::new(&nodes, &pods);
        let zero = Prices {
            cpu: vec![0.0],
            mem: vec![0.0],
            gpu: vec![0.0],
            slots: vec![[0.0; SLOT_KS.len()]],
        };
        assert_eq!(problem.dual_value(&zero, &[2], Rule::AnyDropped), 2000.0);
        // The GPU price 1: the capacity, 2000.
        let gpu = Prices {
            gpu: vec![1.0],
            ..zero
        };
        assert_eq!(problem.dual_value(&gpu, &[2], Rule::AnyDropped), 2000.0);
    }
}
