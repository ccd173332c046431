//! A reference from below: an offline packer that knows every pod arrived up to an
//! event and packs them at once.
//!
//! Its allocation is feasible under the replay's filter (it places through
//! [`ClusterState::assume`] on nodes that pass [`filter::check`], or where the crate's
//! [`Placer`] puts them), so it is a lower bound on the best allocation of those pods,
//! reachable by a scheduler that knew the whole arrival sequence. Pods never leave, so
//! a packing of the pods arrived by one event is also feasible at every later event.
//!
//! Candidates ([`pack_best`]), the best of which is kept:
//!
//! * order: GPU pods by decreasing GPU demand, then decreasing CPU
//!   ([`CpuOrder::Decreasing`]), or multi-GPU pods first and the rest by increasing CPU
//!   per GPU ([`CpuOrder::PerGpu`]); CPU-only pods first or last ([`CpuOnly`]);
//! * placement ([`Shares`]): best-fit pod by pod (a share to the device it leaves with
//!   the least free milli, a whole-GPU pod to the node it leaves with the least free
//!   GPU, ties by the node's free GPU, free CPU, node order); or whole-GPU pods
//!   best-fit and then the shares device by device, each device filled by a bounded
//!   knapsack on milli-GPU; or (with the trace's typical pods) every pod where
//!   `fragbalance` puts it, on the decreasing order with CPU-only pods last.
//!
//! Packings that fail more CPU-only pods than the best candidate in that respect are
//! discarded (the `bound` rule places every CPU-only pod); of the rest the one with the
//! most allocated GPU is kept.

use crate::cluster::{ClusterState, Node};
use crate::filter::{self, Resolved};
use crate::metrics::{Event, Measure, curve};
use crate::place::{Placer, Tie};
use crate::policy::{FragModel, FragPack, Scorer, Ties};
use crate::replay::{Workload, prepare};
use crate::request::{GpuDemand, MILLI, PodRequest};

/// Where CPU-only pods go in the packing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuOnly {
    First,
    Last,
}

/// Secondary order of GPU pods of equal GPU demand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuOrder {
    /// By GPU demand, then CPU decreasing.
    Decreasing,
    /// Multi-GPU pods first, then by CPU per GPU increasing (the pods that strand the
    /// least CPU per GPU first), then GPU demand decreasing.
    PerGpu,
}

/// How shares are placed after the whole-GPU pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shares {
    /// Pod by pod in the sorted order, each best-fit.
    BestFit,
    /// Device by device: each free device gets the set of share sizes (of the shares
    /// left that pass the filter there) that fills it most, a bounded knapsack on
    /// milli-GPU; each chosen size is the pod of that size with the least CPU.
    FillDevices,
    /// Every pod (not only shares) where `fragbalance` puts it, ties to node order:
    /// the online policy's choices on the offline order.
    FragBalance,
}

/// Result of one packing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packing {
    pub used_milli: u64,
    pub failed: usize,
    pub failed_cpu_only: usize,
}

fn same_request(a: &PodRequest, b: &PodRequest) -> bool {
    a.cpu_milli == b.cpu_milli
        && a.memory_mib == b.memory_mib
        && a.gpu == b.gpu
        && a.gpu_models == b.gpu_models
        && a.node_selector == b.node_selector
        && a.affinity_terms == b.affinity_terms
        && a.tolerations == b.tolerations
}

/// Best-fit choice on one node that passed the filter: (key, devices); lower key wins.
fn choose(node: &Node, pod: &PodRequest, cpu_only: CpuOnly) -> ((u64, u64, u64), Vec<usize>) {
    let cpu_left = node.cpu_free() - pod.cpu_milli;
    let gpu_left = node.gpu_free_total() - pod.gpu.total_milli();
    match pod.gpu {
        GpuDemand::None => match cpu_only {
            // Placed after the GPU pods: fill CPU where it is left.
            CpuOnly::Last => ((cpu_left, gpu_left, 0), Vec::new()),
            // Placed before them: where CPU is most plentiful per GPU, so the GPU pods
            // that come later keep theirs.
            CpuOnly::First => {
                let per_gpu = cpu_left * u64::from(MILLI) / (node.gpu_count() as u64 * 1000 + 1);
                ((u64::MAX - per_gpu, u64::MAX - cpu_left, 0), Vec::new())
            }
        },
        GpuDemand::Share(m) => {
            let (g, free) = node
                .gpu_free()
                .iter()
                .enumerate()
                .filter(|&(_, &f)| f >= m)
                .min_by_key(|&(g, &f)| (f, g))
                .expect("filter checked a device fits");
            ((u64::from(free - m), gpu_left, cpu_left), vec![g])
        }
        GpuDemand::Whole(k) => {
            let devices: Vec<usize> = node
                .gpu_free()
                .iter()
                .enumerate()
                .filter(|&(_, &f)| f == MILLI)
                .map(|(g, _)| g)
                .take(k as usize)
                .collect();
            ((0, gpu_left, cpu_left), devices)
        }
    }
}

/// Packs `pods` offline onto `nodes` (taken as they are) in the given order.
pub fn pack(
    nodes: &[Node],
    pods: &[PodRequest],
    cpu_only: CpuOnly,
    cpu_order: CpuOrder,
    shares: Shares,
) -> Packing {
    pack_with(nodes, pods, cpu_only, cpu_order, shares, None)
}

fn pack_with(
    nodes: &[Node],
    pods: &[PodRequest],
    cpu_only: CpuOnly,
    cpu_order: CpuOrder,
    shares: Shares,
    scorer: Option<&dyn Scorer>,
) -> Packing {
    let mut placer = scorer.map(Placer::new);
    let mut order: Vec<&PodRequest> = pods.iter().collect();
    order.sort_by(|a, b| {
        let group = |p: &PodRequest| match (p.gpu, cpu_only) {
            (GpuDemand::None, CpuOnly::First) => 0,
            (GpuDemand::None, CpuOnly::Last) => 2,
            _ => 1,
        };
        // Under `PerGpu`, multi-GPU pods first (most GPUs first), then the others by
        // CPU per GPU, least first.
        let per_gpu = |p: &PodRequest| match (cpu_order, p.gpu) {
            (CpuOrder::PerGpu, GpuDemand::Whole(k)) if k >= 2 => (0, u64::from(u32::MAX - k)),
            (CpuOrder::PerGpu, g) if g != GpuDemand::None => {
                (1, p.cpu_milli * u64::from(MILLI) / g.total_milli())
            }
            _ => (0, 0),
        };
        let cpu = |p: &PodRequest| match cpu_order {
            CpuOrder::Decreasing => std::cmp::Reverse(p.cpu_milli),
            CpuOrder::PerGpu => std::cmp::Reverse(u64::MAX - p.cpu_milli),
        };
        group(a)
            .cmp(&group(b))
            .then(per_gpu(a).cmp(&per_gpu(b)))
            .then(b.gpu.total_milli().cmp(&a.gpu.total_milli()))
            .then(
                b.gpu
                    .devices_and_milli()
                    .0
                    .cmp(&a.gpu.devices_and_milli().0),
            )
            .then(if a.gpu == GpuDemand::None {
                b.cpu_milli.cmp(&a.cpu_milli)
            } else {
                cpu(a).cmp(&cpu(b))
            })
            .then(b.memory_mib.cmp(&a.memory_mib))
            .then(a.gpu_models.cmp(&b.gpu_models))
            .then(a.name.cmp(&b.name))
    });
    let mut state = ClusterState::new(nodes.to_vec());
    let mut packing = Packing {
        used_milli: 0,
        failed: 0,
        failed_cpu_only: 0,
    };
    // The state only fills, so a request that failed fails again.
    let mut last_failed: Option<&PodRequest> = None;
    let is_share = |p: &PodRequest| matches!(p.gpu, GpuDemand::Share(_));
    // Under `FillDevices` the shares are placed once every other GPU pod is.
    let mut filled = shares != Shares::FillDevices;
    let fill = |state: &mut ClusterState, packing: &mut Packing| {
        let left: Vec<&PodRequest> = pods.iter().filter(|p| is_share(p)).collect();
        let placed = fill_devices(state, &left);
        packing.failed += left.len() - placed;
    };
    for pod in order {
        if !filled && pod.gpu == GpuDemand::None && cpu_only == CpuOnly::Last {
            fill(&mut state, &mut packing);
            filled = true;
        }
        if shares == Shares::FillDevices && is_share(pod) {
            continue;
        }
        let placed = if last_failed.is_some_and(|f| same_request(f, pod)) {
            false
        } else if let Some(placer) = placer.as_mut() {
            match placer.place(&state, pod, Tie::Rank) {
                Ok(p) => {
                    state
                        .assume(p.node, pod, &p.gpus)
                        .expect("the placer's choice fits");
                    true
                }
                Err(_) => false,
            }
        } else {
            let r = Resolved::new(pod);
            let best = state
                .nodes()
                .iter()
                .enumerate()
                .filter(|(_, n)| filter::check(n, &r).is_ok())
                .map(|(i, n)| {
                    let (key, devices) = choose(n, pod, cpu_only);
                    (key, i, devices)
                })
                .min_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
            match best {
                Some((_, i, devices)) => {
                    state
                        .assume(i, pod, &devices)
                        .expect("a node that passed the filter takes the pod");
                    true
                }
                None => false,
            }
        };
        if !placed {
            last_failed = Some(pod);
            packing.failed += 1;
            if pod.gpu == GpuDemand::None {
                packing.failed_cpu_only += 1;
            }
        }
    }
    if !filled {
        fill(&mut state, &mut packing);
    }
    packing.used_milli = state.gpu_used_milli();
    packing
}

/// Places `shares` device by device ([`Shares::FillDevices`]); returns how many.
fn fill_devices(state: &mut ClusterState, shares: &[&PodRequest]) -> usize {
    // Shares by size, least CPU first; `used` marks the placed ones.
    let mut by_size: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
    for (i, p) in shares.iter().enumerate() {
        if let GpuDemand::Share(m) = p.gpu {
            by_size.entry(m).or_default().push(i);
        }
    }
    for list in by_size.values_mut() {
        list.sort_by_key(|&i| (shares[i].cpu_milli, shares[i].memory_mib, i));
    }
    let sizes: Vec<u32> = by_size.keys().copied().collect();
    let lists: Vec<Vec<usize>> = by_size.into_values().collect();
    let mut used = vec![false; shares.len()];
    let mut placed = 0;
    let resolved: Vec<Resolved> = shares.iter().map(|p| Resolved::new(p)).collect();
    // The first unused share of size index `k` that passes the filter on `node`.
    let candidate = |state: &ClusterState, used: &[bool], node: usize, k: usize| {
        lists[k]
            .iter()
            .copied()
            .find(|&i| !used[i] && filter::check(state.node(node), &resolved[i]).is_ok())
    };
    for node in 0..state.nodes().len() {
        for g in 0..state.node(node).gpu_count() {
            loop {
                let free = state.node(node).gpu_free()[g];
                // Sizes that some share left could take on this node, with how many.
                let avail: Vec<(u32, usize)> = (0..sizes.len())
                    .filter(|&k| sizes[k] <= free)
                    .filter(|&k| candidate(state, &used, node, k).is_some())
                    .map(|k| {
                        let left = lists[k].iter().filter(|&&i| !used[i]).count();
                        (k as u32, left.min((free / sizes[k]) as usize))
                    })
                    .collect();
                if avail.is_empty() {
                    break;
                }
                // Bounded knapsack on milli: best[s] = the last size taken to reach s.
                let cap = free as usize;
                let mut reach: Vec<Option<(usize, usize)>> = vec![None; cap + 1];
                let mut ok = vec![false; cap + 1];
                ok[0] = true;
                for (j, &(k, count)) in avail.iter().enumerate() {
                    let m = sizes[k as usize] as usize;
                    for _ in 0..count {
                        for s in (m..=cap).rev() {
                            if !ok[s] && ok[s - m] {
                                ok[s] = true;
                                reach[s] = Some((j, s - m));
                            }
                        }
                    }
                }
                let mut s = (0..=cap).rev().find(|&s| ok[s]).unwrap_or(0);
                if s == 0 {
                    break;
                }
                let mut chosen = Vec::new();
                while let Some((j, prev)) = reach[s] {
                    chosen.push(avail[j].0 as usize);
                    s = prev;
                }
                // Largest first; stop when one no longer fits (CPU or memory ran out)
                // and plan again for what is left on the device.
                chosen.sort_by(|a, b| sizes[*b].cmp(&sizes[*a]));
                let mut progress = false;
                for k in chosen {
                    let Some(i) = candidate(state, &used, node, k) else {
                        continue;
                    };
                    if state.node(node).gpu_free()[g] < sizes[k] {
                        continue;
                    }
                    state
                        .assume(node, shares[i], &[g])
                        .expect("a share that passed the filter fits its device");
                    used[i] = true;
                    placed += 1;
                    progress = true;
                }
                if !progress {
                    break;
                }
            }
        }
    }
    placed
}

/// The best of the orders tried (see the module comment); with `typical`, also
/// `fragbalance`'s choices on the decreasing order, CPU-only pods last.
pub fn pack_best(nodes: &[Node], pods: &[PodRequest], typical: Option<&FragModel>) -> Packing {
    let mut packings = Vec::new();
    if let Some(typical) = typical {
        let scorer = FragPack::new(typical.clone(), Ties::Balance);
        packings.push(pack_with(
            nodes,
            pods,
            CpuOnly::Last,
            CpuOrder::Decreasing,
            Shares::FragBalance,
            Some(&scorer),
        ));
    }
    for cpu_only in [CpuOnly::First, CpuOnly::Last] {
        for cpu_order in [CpuOrder::Decreasing, CpuOrder::PerGpu] {
            for shares in [Shares::BestFit, Shares::FillDevices] {
                packings.push(pack(nodes, pods, cpu_only, cpu_order, shares));
            }
        }
    }
    let least_failed = packings
        .iter()
        .map(|p| p.failed_cpu_only)
        .min()
        .expect("some packing");
    packings
        .into_iter()
        .filter(|p| p.failed_cpu_only == least_failed)
        .max_by_key(|p| p.used_milli)
        .expect("some packing")
}

/// The offline packer at `pct`% arrived demand for one seed, on the paper's metric. The
/// arrived pods are packed at the first and the last event of the bucket (or of the
/// neighbouring window the metric falls back to); every event of the bucket takes the
/// best packing of an evaluated event at or before it (pods only arrive, so that
/// packing is feasible there too), and the bucket is averaged like an allocation curve.
/// Returns the value and the CPU-only pods the kept packings failed (the larger).
pub fn offline_at(workload: &Workload, seed: u64, pct: usize) -> Result<(f64, usize), String> {
    let prepared = prepare(workload, seed, 1.3);
    let total_gpus = workload.gpu_capacity_milli() / u64::from(MILLI);
    let bucket =
        |arrived: u64| (arrived as f64 / total_gpus as f64 / 10.0).round_ties_even() as i64;
    let mut arrived = 0u64;
    // (index after the event's pod, arrived demand) of the events in the bucket.
    let mut exact: Vec<(usize, u64)> = Vec::new();
    let mut near: Vec<(usize, u64)> = Vec::new();
    for (i, pod) in prepared.pods.iter().enumerate() {
        arrived += pod.gpu.total_milli();
        let b = bucket(arrived);
        if b == pct as i64 {
            exact.push((i + 1, arrived));
        }
        if (b - pct as i64).abs() <= 1 {
            near.push((i + 1, arrived));
        }
    }
    let window = if exact.is_empty() { near } else { exact };
    let (Some(&first), Some(&last)) = (window.first(), window.last()) else {
        return Err(format!(
            "{} seed {seed}: no event arrives near {pct}%",
            workload.name
        ));
    };
    let at_first = pack_best(
        &workload.nodes,
        &prepared.pods[..first.0],
        Some(&workload.frag),
    );
    let at_last = if last == first {
        at_first
    } else {
        pack_best(
            &workload.nodes,
            &prepared.pods[..last.0],
            Some(&workload.frag),
        )
    };
    let events: Vec<Event> = window
        .iter()
        .map(|&(n, arrived_milli)| {
            let used = if n == last.0 {
                at_first.used_milli.max(at_last.used_milli)
            } else {
                at_first.used_milli
            };
            Event {
                arrived_milli,
                used_milli: used,
                frag_milli: 0.0,
            }
        })
        .collect();
    let value = curve(&events, total_gpus, Measure::Allocation, pct)[pct]
        .ok_or_else(|| format!("{} seed {seed}: empty {pct}% bucket", workload.name))?;
    Ok((value, at_first.failed_cpu_only.max(at_last.failed_cpu_only)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterState;
    use crate::place::place_pod;
    use crate::policy::BestFit;

    fn pod(name: &str, cpu: u64, gpu: GpuDemand) -> PodRequest {
        PodRequest::new(name, cpu, 1024, gpu)
    }

    #[test]
    fn offline_order_beats_arrival_order() {
        // Two 1-GPU nodes. Arrival: a 500 share, a 600 share, then a whole GPU.
        // Online best-fit puts both shares on separate GPUs (500 + 600 > 1000), and the
        // whole-GPU pod finds no free device: 1100 milli. Offline, the whole GPU goes
        // first and the 600 share on the other device: 1600 milli.
        let nodes = vec![
            Node::new("a", 64_000, 1 << 20, 1, Some("T4")),
            Node::new("b", 64_000, 1 << 20, 1, Some("T4")),
        ];
        let pods = vec![
            pod("p1", 1000, GpuDemand::Share(500)),
            pod("p2", 1000, GpuDemand::Share(600)),
            pod("p3", 1000, GpuDemand::Whole(1)),
        ];
        // Online, in arrival order, with the crate's own placement.
        let mut state = ClusterState::new(nodes.clone());
        for p in &pods {
            if let Ok(placed) = place_pod(&state, p, &BestFit) {
                state.assume(placed.node, p, &placed.gpus).unwrap();
            }
        }
        let online = state.gpu_used_milli();
        assert_eq!(online, 1100);
        let offline = pack_best(&nodes, &pods, None);
        assert_eq!(offline.used_milli, 1600);
        assert_eq!(offline.failed, 1);
        // With fragbalance's choices among the candidates too.
        let typical = FragModel::from_workload(&pods);
        let offline = pack_best(&nodes, &pods, Some(&typical));
        assert_eq!(offline.used_milli, 1600);
        // A packing is feasible: the pods it places never exceed the cluster.
        for cpu_only in [CpuOnly::First, CpuOnly::Last] {
            for cpu_order in [CpuOrder::Decreasing, CpuOrder::PerGpu] {
                for shares in [Shares::BestFit, Shares::FillDevices] {
                    let p = pack(&nodes, &pods, cpu_only, cpu_order, shares);
                    assert!(p.used_milli <= 2000);
                }
            }
        }
    }

    #[test]
    fn cpu_only_pods_first_keep_them_placed() {
        // One node of 8 cores and 2 GPUs; two 1-GPU pods of 4 cores and a 4-core
        // CPU-only pod. CPU-only last fails it; first places it and one GPU pod.
        let nodes = vec![Node::new("n", 8000, 1 << 20, 2, Some("T4"))];
        let pods = vec![
            pod("g1", 4000, GpuDemand::Whole(1)),
            pod("g2", 4000, GpuDemand::Whole(1)),
            pod("c", 4000, GpuDemand::None),
        ];
        let last = pack(
            &nodes,
            &pods,
            CpuOnly::Last,
            CpuOrder::Decreasing,
            Shares::BestFit,
        );
        assert_eq!((last.used_milli, last.failed_cpu_only), (2000, 1));
        let best = pack_best(&nodes, &pods, None);
        assert_eq!((best.used_milli, best.failed_cpu_only), (1000, 0));
    }

    #[test]
    fn shares_are_best_fit_on_devices() {
        // Two GPUs; 700, 300 and 600 shares, then a 400: decreasing order puts 700 and
        // 600 on separate devices, then 400 beside 600 and 300 beside 700: all fit.
        let nodes = vec![Node::new("n", 64_000, 1 << 20, 2, Some("T4"))];
        let pods = vec![
            pod("a", 1000, GpuDemand::Share(300)),
            pod("b", 1000, GpuDemand::Share(700)),
            pod("c", 1000, GpuDemand::Share(400)),
            pod("d", 1000, GpuDemand::Share(600)),
        ];
        let best = pack_best(&nodes, &pods, None);
        assert_eq!((best.used_milli, best.failed), (2000, 0));
    }
}
