use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Scored, Scorer};
use crate::cluster::{ModelId, Node};
use crate::filter::Resolved;
use crate::request::{GpuDemand, MILLI, PodRequest};

/// One typical pod shape and its frequency in the workload.
#[derive(Clone, Debug, PartialEq)]
pub struct TypicalPod {
    pub cpu_milli: i64,
    /// Per-GPU milli; 0 for CPU-only pods.
    pub gpu_milli: u32,
    pub gpu_count: u32,
    /// Accepted models; empty means any.
    pub models: Vec<ModelId>,
    pub freq: f64,
}

/// Fragmentation measure of FGD (`utils/frag.go`): the GPU capacity of a node that the
/// workload's typical pods could not use, weighted by how often each shape arrives.
///
/// Values depend only on (model, CPU left, multiset of free milli per device), so they are
/// cached by that key; nodes in the same state share one entry.
#[derive(Clone, Default)]
pub struct FragModel {
    typical: Arc<Vec<TypicalPod>>,
    cache: Arc<Mutex<HashMap<FragKey, f64>>>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct FragKey {
    model: u16,
    devices: u8,
    free: u128,
    cpu_left: i64,
}

/// Largest device count a cache key packs (10 bits per device).
const KEY_DEVICES: usize = 12;
const CACHE_LIMIT: usize = 1 << 20;

// Order of `FragRatioDataMap`; the sum skips Q3 (satisfied).
const Q1: usize = 0;
const Q2: usize = 1;
const Q3: usize = 2;
const Q4: usize = 3;
const XL: usize = 4;
const XR: usize = 5;
const NA: usize = 6;

impl FragModel {
    pub fn new(typical: Vec<TypicalPod>) -> FragModel {
        FragModel {
            typical: Arc::new(typical),
            cache: Arc::default(),
        }
    }

    /// The typical pods of a workload as `GetTypicalPods` computes them: distinct shapes
    /// by count, descending (ties by shape, descending), cut at the first prefix that
    /// covers 95% of the pods, frequencies renormalised with the simulator's float ops.
    pub fn from_workload(pods: &[PodRequest]) -> FragModel {
        let mut counts: HashMap<(i64, u32, u32, String), f64> = HashMap::new();
        let mut total = 0.0;
        for p in pods {
            let (count, milli) = p.gpu.devices_and_milli();
            let cpu = if p.cpu_milli == 0 {
                100
            } else {
                p.cpu_milli as i64
            };
            let key = (cpu, milli, count, p.gpu_models.join("|"));
            *counts.entry(key).or_insert(0.0) += 1.0;
            total += 1.0;
        }
        let mut list: Vec<_> = counts.into_iter().collect();
        list.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        let expected = 95.0 * total / 100.0;
        let mut cum = 0.0;
        let mut kept = 0;
        let mut freq = Vec::new();
        while cum < expected && kept < list.len() {
            cum += list[kept].1;
            freq.push(list[kept].1 / total);
            kept += 1;
        }
        if kept < list.len() {
            for f in &mut freq {
                *f /= cum / total;
            }
        }
        let typical = list
            .into_iter()
            .zip(freq)
            .map(|(((cpu, milli, count, spec), _), freq)| TypicalPod {
                cpu_milli: cpu,
                gpu_milli: milli,
                gpu_count: count,
                models: spec
                    .split('|')
                    .filter(|m| !m.is_empty())
                    .map(ModelId::intern)
                    .collect(),
                freq,
            })
            .collect();
        FragModel::new(typical)
    }

    pub fn typical(&self) -> &[TypicalPod] {
        &self.typical
    }

    /// Fragmented milli-GPU of a node in the given state.
    pub fn frag(&self, model: Option<ModelId>, cpu_left: i64, free: &[u32]) -> f64 {
        if free.len() > KEY_DEVICES {
            return self.compute(model, cpu_left, free);
        }
        let mut sorted = [0u32; KEY_DEVICES];
        sorted[..free.len()].copy_from_slice(free);
        sorted[..free.len()].sort_unstable();
        let key = FragKey {
            model: model.map_or(u16::MAX, |m| m.0),
            devices: free.len() as u8,
            free: sorted.iter().fold(0u128, |k, &f| (k << 10) | u128::from(f)),
            cpu_left,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&f) = cache.get(&key) {
            return f;
        }
        let f = self.compute(model, cpu_left, free);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, f);
        f
    }

    pub fn node_frag(&self, node: &Node) -> f64 {
        self.frag(node.model(), node.cpu_free() as i64, node.gpu_free())
    }

    fn compute(&self, model: Option<ModelId>, cpu_left: i64, free: &[u32]) -> f64 {
        let total: i64 = free.iter().map(|&f| i64::from(f)).sum();
        let mut data = [0.0f64; 7];
        for t in self.typical.iter() {
            let cpu_ok = cpu_left >= t.cpu_milli;
            if t.gpu_milli == 0 {
                data[if cpu_ok { XL } else { XR }] += t.freq * total as f64;
                continue;
            }
            if !t.models.is_empty() && !model.is_some_and(|m| t.models.contains(&m)) {
                data[NA] += t.freq * total as f64;
                continue;
            }
            let fitting = free.iter().filter(|&&f| f >= t.gpu_milli).count();
            let gpu_ok = fitting >= t.gpu_count as usize;
            match (gpu_ok, cpu_ok) {
                (true, true) => {
                    let frag: i64 = free
                        .iter()
                        .filter(|&&f| f < t.gpu_milli)
                        .map(|&f| i64::from(f))
                        .sum();
                    data[Q2] += t.freq * frag as f64;
                    data[Q3] += t.freq * (total - frag) as f64;
                }
                (true, false) => data[Q4] += t.freq * total as f64,
                (false, true) => data[Q2] += t.freq * total as f64,
                (false, false) => data[Q1] += t.freq * total as f64,
            }
        }
        let mut sum = 0.0;
        for (i, v) in data.iter().enumerate() {
            if i != Q3 {
                sum += v;
            }
        }
        sum
    }

    /// Fragmentation before minus after placing `pod` (on device `device` for a share).
    pub(crate) fn reduction(&self, node: &Node, pod: &Resolved, device: Option<usize>) -> f64 {
        let cpu_left = node.cpu_free() as i64;
        let before = self.frag(node.model(), cpu_left, node.gpu_free());
        let mut free = node.gpu_free().to_vec();
        match (pod.pod.gpu, device) {
            (GpuDemand::Share(m), Some(d)) => free[d] -= m,
            (GpuDemand::Whole(k), _) => {
                for f in free.iter_mut().filter(|f| **f == MILLI).take(k as usize) {
                    *f = 0;
                }
            }
            _ => {}
        }
        let after = self.frag(node.model(), cpu_left - pod.score_cpu() as i64, &free);
        before - after
    }
}

pub(crate) fn sigmoid_score(reduction: f64) -> i64 {
    (1.0 / (1.0 + (-(reduction / 1000.0)).exp()) * 100.0) as i64
}

/// FGD: move towards the placement that grows expected fragmentation least
/// (`fgd_score.go`). Sharing pods try every device that fits; the first best one is used.
pub struct Fgd {
    model: FragModel,
}

impl Fgd {
    pub fn new(model: FragModel) -> Fgd {
        Fgd { model }
    }
}

/// Visits each device a sharing pod fits on, scoring each distinct free amount once
/// (equal devices give equal results); returns the first device with the best score.
pub(crate) fn best_device(
    node: &Node,
    milli: u32,
    mut score: impl FnMut(usize) -> i64,
) -> Option<(usize, i64)> {
    let mut seen: Vec<(u32, i64)> = Vec::with_capacity(node.gpu_count());
    let mut best: Option<(usize, i64)> = None;
    for (d, &f) in node.gpu_free().iter().enumerate() {
        if f < milli {
            continue;
        }
        let s = match seen.iter().find(|(v, _)| *v == f) {
            Some(&(_, s)) => s,
            None => {
                let s = score(d);
                seen.push((f, s));
                s
            }
        };
        if best.is_none_or(|(_, b)| s > b) {
            best = Some((d, s));
        }
    }
    best
}

impl Scorer for Fgd {
    fn name(&self) -> &str {
        "fgd"
    }

    fn score(&self, node: &Node, pod: &Resolved) -> Scored {
        match pod.pod.gpu {
            GpuDemand::Share(m) => {
                let best = best_device(node, m, |d| {
                    sigmoid_score(self.model.reduction(node, pod, Some(d)))
                });
                match best {
                    Some((d, s)) => Scored {
                        score: s,
                        device: Some(d),
                    },
                    None => Scored::new(0),
                }
            }
            _ => Scored::new(sigmoid_score(self.model.reduction(node, pod, None))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testutil::*;

    fn model() -> FragModel {
        let mut pods = Vec::new();
        for _ in 0..6 {
            pods.push(pod(4000, GpuDemand::Whole(1)));
        }
        for _ in 0..3 {
            pods.push(pod(2000, GpuDemand::Share(500)));
        }
        pods.push(pod(1000, GpuDemand::None));
        FragModel::from_workload(&pods)
    }

    #[test]
    fn typical_pods_cut_at_95_percent() {
        let m = model();
        // 6 + 3 + 1 = 10 pods: all three shapes are needed to reach 9.5.
        let t = m.typical();
        assert_eq!(t.len(), 3);
        assert_eq!((t[0].gpu_count, t[0].gpu_milli), (1, 1000));
        assert_eq!(t[0].freq, 0.6);
        assert_eq!(t[2].gpu_milli, 0);
    }

    #[test]
    fn fragmentation_of_states() {
        let m = model();
        let f = |free: &[u32], cpu: i64| m.frag(ModelId::intern("T4").into(), cpu, free);
        // Idle node: whole-GPU and share shapes fit; only the CPU-only shape (10%)
        // counts all 2000 free milli.
        assert!((f(&[1000, 1000], 64_000) - 200.0).abs() < 1e-9);
        // A 300 milli leftover fits neither GPU shape: fragmented for 90% of pods.
        assert!(
            (f(&[300, 1000], 64_000) - (0.6 * 300.0 + 0.3 * 300.0 + 0.1 * 1300.0)).abs() < 1e-9
        );
        // No CPU left: everything is fragmented.
        assert!((f(&[1000, 1000], 0) - 2000.0).abs() < 1e-9);
    }

    #[test]
    fn score_prefers_reducing_fragmentation() {
        let fgd = Fgd::new(model());
        let p = pod(2000, GpuDemand::Share(500));
        // Filling the 500 leftover removes a fragment; splitting a whole GPU makes one.
        let n = node_with(&[1000, 500], 64_000, 64_000);
        let s = fgd.score(&n, &resolved(&p));
        assert_eq!(s.device, Some(1));
        let idle = node_with(&[1000, 1000], 64_000, 64_000);
        assert!(s.score > fgd.score(&idle, &resolved(&p)).score);
        assert_eq!(sigmoid_score(0.0), 50);
    }
}
