//! Nodes and their allocations. Every GPU is accounted on its own, in milli-GPU: a node
//! with two half-used GPUs is not a node with one free GPU less.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::request::{GpuDemand, MILLI, PodRequest, Taint};

/// Every change to any node gets a fresh generation, so caches keyed by generation stay
/// valid across snapshots built by different callers.
static GENERATION: AtomicU64 = AtomicU64::new(1);

fn next_generation() -> u64 {
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// Process-wide GPU model names, so a model id means the same thing in every snapshot and
/// in every scorer's cache.
static MODELS: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Interned GPU model name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub u16);

impl ModelId {
    pub fn intern(name: &str) -> ModelId {
        let mut models = MODELS.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = models.iter().position(|m| m == name) {
            return ModelId(i as u16);
        }
        models.push(name.to_string());
        ModelId((models.len() - 1) as u16)
    }

    /// The ids of `names`; a name no node has gets an id too, which simply matches nothing.
    pub fn intern_all(names: &[String]) -> Vec<ModelId> {
        names.iter().map(|n| ModelId::intern(n)).collect()
    }
}

/// Which pods of a GPU kind a node hosts; GpuClustering groups like with like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GpuAffinity {
    Share,
    Whole(u32),
}

impl GpuAffinity {
    pub fn of(demand: GpuDemand) -> Option<GpuAffinity> {
        match demand {
            GpuDemand::None => None,
            GpuDemand::Share(_) => Some(GpuAffinity::Share),
            GpuDemand::Whole(k) => Some(GpuAffinity::Whole(k)),
        }
    }
}

/// A node: capacity, identity (labels, taints, GPU model) and what is allocated on it.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub max_pods: u32,
    pub gpu_model: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    model: Option<ModelId>,
    cpu_used: u64,
    memory_used: u64,
    pods: u32,
    gpu_free: Vec<u32>,
    affinities: Vec<(GpuAffinity, u32)>,
    generation: u64,
}

impl Node {
    /// An empty node with `gpus` devices of `gpu_model` (ignored when `gpus` is 0).
    pub fn new(
        name: impl Into<String>,
        cpu_milli: u64,
        memory_mib: u64,
        gpus: usize,
        gpu_model: Option<&str>,
    ) -> Node {
        let gpu_model = gpu_model.filter(|_| gpus > 0).map(str::to_string);
        Node {
            name: name.into(),
            cpu_milli,
            memory_mib,
            max_pods: 110,
            model: gpu_model.as_deref().map(ModelId::intern),
            gpu_model,
            labels: BTreeMap::new(),
            taints: Vec::new(),
            cpu_used: 0,
            memory_used: 0,
            pods: 0,
            gpu_free: vec![MILLI; gpus],
            affinities: Vec::new(),
            generation: next_generation(),
        }
    }

    pub fn with_label(mut self, key: &str, value: &str) -> Node {
        self.labels.insert(key.into(), value.into());
        self
    }

    pub fn with_taint(mut self, taint: Taint) -> Node {
        self.taints.push(taint);
        self
    }

    pub fn with_max_pods(mut self, max_pods: u32) -> Node {
        self.max_pods = max_pods;
        self
    }

    pub fn model(&self) -> Option<ModelId> {
        self.model
    }

    pub fn gpu_count(&self) -> usize {
        self.gpu_free.len()
    }

    /// Free milli-GPU of each device, by device index.
    pub fn gpu_free(&self) -> &[u32] {
        &self.gpu_free
    }

    pub fn gpu_free_total(&self) -> u64 {
        self.gpu_free.iter().map(|&f| u64::from(f)).sum()
    }

    pub fn gpu_used_total(&self) -> u64 {
        self.gpu_count() as u64 * u64::from(MILLI) - self.gpu_free_total()
    }

    pub fn fully_free_gpus(&self) -> usize {
        self.gpu_free.iter().filter(|&&f| f == MILLI).count()
    }

    pub fn cpu_free(&self) -> u64 {
        self.cpu_milli.saturating_sub(self.cpu_used)
    }

    pub fn memory_free(&self) -> u64 {
        self.memory_mib.saturating_sub(self.memory_used)
    }

    pub fn pods(&self) -> u32 {
        self.pods
    }

    pub fn affinities(&self) -> &[(GpuAffinity, u32)] {
        &self.affinities
    }

    /// Changes whenever the allocation changes; equal generations mean equal state.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    fn check_gpus(&self, pod: &PodRequest, gpus: &[usize]) -> std::result::Result<(), String> {
        let (devices, milli) = pod.gpu.devices_and_milli();
        if gpus.len() != devices as usize {
            return Err(format!(
                "{} GPU indices given, {devices} needed",
                gpus.len()
            ));
        }
        for (i, &g) in gpus.iter().enumerate() {
            if gpus[..i].contains(&g) {
                return Err(format!("GPU {g} given twice"));
            }
            match self.gpu_free.get(g) {
                None => return Err(format!("no GPU {g} (node has {})", self.gpu_count())),
                Some(&free) if free < milli => {
                    return Err(format!("GPU {g} has {free} milli free, {milli} needed"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    fn assume(&mut self, pod: &PodRequest, gpus: &[usize]) -> Result<()> {
        let fits = self.check_gpus(pod, gpus).and_then(|()| match () {
            () if self.cpu_free() < pod.cpu_milli => Err("not enough CPU".to_string()),
            () if self.memory_free() < pod.memory_mib => Err("not enough memory".into()),
            () if self.pods >= self.max_pods => Err("no pod slot left".into()),
            () => Ok(()),
        });
        fits.map_err(|message| Error::DoesNotFit {
            pod: pod.name.clone(),
            node: self.name.clone(),
            message,
        })?;
        let (_, milli) = pod.gpu.devices_and_milli();
        for &g in gpus {
            self.gpu_free[g] -= milli;
        }
        self.cpu_used += pod.cpu_milli;
        self.memory_used += pod.memory_mib;
        self.pods += 1;
        if let Some(a) = GpuAffinity::of(pod.gpu) {
            match self.affinities.iter_mut().find(|(k, _)| *k == a) {
                Some((_, n)) => *n += 1,
                None => self.affinities.push((a, 1)),
            }
        }
        self.generation = next_generation();
        Ok(())
    }

    fn forget(&mut self, pod: &PodRequest, gpus: &[usize]) -> Result<()> {
        let (devices, milli) = pod.gpu.devices_and_milli();
        let consistent = gpus.len() == devices as usize
            && gpus
                .iter()
                .all(|&g| self.gpu_free.get(g).is_some_and(|&f| f + milli <= MILLI))
            && self.cpu_used >= pod.cpu_milli
            && self.memory_used >= pod.memory_mib
            && self.pods > 0;
        if !consistent {
            return Err(Error::DoesNotFit {
                pod: pod.name.clone(),
                node: self.name.clone(),
                message: "forgetting a pod that was not assumed here".into(),
            });
        }
        for &g in gpus {
            self.gpu_free[g] += milli;
        }
        self.cpu_used -= pod.cpu_milli;
        self.memory_used -= pod.memory_mib;
        self.pods -= 1;
        if let Some(i) =
            GpuAffinity::of(pod.gpu).and_then(|a| self.affinities.iter().position(|(k, _)| *k == a))
        {
            self.affinities[i].1 -= 1;
            if self.affinities[i].1 == 0 {
                self.affinities.remove(i);
            }
        }
        self.generation = next_generation();
        Ok(())
    }
}

/// A snapshot of the cluster that placement reads and `assume`/`forget` update.
///
/// Each node has a tie-break rank: among equal best scores the lowest rank wins. By
/// default the rank is the insertion order; the trace replay installs the paper's seeded
/// permutation.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    nodes: Vec<Node>,
    rank: Vec<u32>,
    by_name: HashMap<String, usize>,
}

/// The name the scheduler uses for the value it builds from its informer cache.
pub type Snapshot = ClusterState;

impl ClusterState {
    pub fn new(nodes: Vec<Node>) -> ClusterState {
        let mut state = ClusterState::default();
        for node in nodes {
            state.add_node(node);
        }
        state
    }

    /// Adds a node (or replaces the one with the same name) and returns its index.
    pub fn add_node(&mut self, node: Node) -> usize {
        if let Some(&i) = self.by_name.get(&node.name) {
            self.nodes[i] = node;
            return i;
        }
        let i = self.nodes.len();
        self.by_name.insert(node.name.clone(), i);
        self.rank.push(i as u32);
        self.nodes.push(node);
        i
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn node(&self, index: usize) -> &Node {
        &self.nodes[index]
    }

    pub fn index_of(&self, name: &str) -> Result<usize> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::UnknownNode(name.into()))
    }

    pub fn rank(&self, index: usize) -> u32 {
        self.rank[index]
    }

    /// Installs tie-break ranks (one per node, lower wins).
    pub fn set_ranks(&mut self, rank: Vec<u32>) {
        assert_eq!(rank.len(), self.nodes.len(), "one rank per node");
        self.rank = rank;
    }

    /// Records `pod` on node `index` using GPU devices `gpus`.
    pub fn assume(&mut self, index: usize, pod: &PodRequest, gpus: &[usize]) -> Result<()> {
        self.nodes[index].assume(pod, gpus)
    }

    /// Undoes `assume` (the pod left, or its binding failed).
    pub fn forget(&mut self, index: usize, pod: &PodRequest, gpus: &[usize]) -> Result<()> {
        self.nodes[index].forget(pod, gpus)
    }

    pub fn gpu_capacity_milli(&self) -> u64 {
        self.nodes.iter().map(|n| n.gpu_count() as u64).sum::<u64>() * u64::from(MILLI)
    }

    pub fn gpu_used_milli(&self) -> u64 {
        self.nodes.iter().map(Node::gpu_used_total).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu_node() -> Node {
        Node::new("n", 32_000, 65_536, 4, Some("T4"))
    }

    #[test]
    fn gpus_are_accounted_one_by_one() {
        let mut state = ClusterState::new(vec![gpu_node()]);
        let half = PodRequest::new("half", 1000, 1024, GpuDemand::Share(500));
        state.assume(0, &half, &[1]).unwrap();
        state.assume(0, &half, &[2]).unwrap();
        let node = state.node(0);
        assert_eq!(node.gpu_free(), &[1000, 500, 500, 1000]);
        assert_eq!(node.gpu_free_total(), 3000);
        assert_eq!(node.fully_free_gpus(), 2);
        assert_eq!(node.cpu_free(), 30_000);
        assert_eq!(state.gpu_used_milli(), 1000);
        // Two half-used GPUs cannot host a whole-GPU pod on either of them.
        let whole = PodRequest::new("w", 0, 0, GpuDemand::Whole(1));
        assert!(state.assume(0, &whole, &[1]).is_err());
        state.assume(0, &whole, &[0]).unwrap();
        assert_eq!(state.node(0).gpu_free(), &[0, 500, 500, 1000]);
    }

    #[test]
    fn forget_restores_and_generation_moves() {
        let mut state = ClusterState::new(vec![gpu_node()]);
        let g0 = state.node(0).generation();
        let pod = PodRequest::new("p", 4000, 100, GpuDemand::Whole(2));
        state.assume(0, &pod, &[0, 3]).unwrap();
        let g1 = state.node(0).generation();
        assert_ne!(g0, g1);
        assert_eq!(state.node(0).affinities(), &[(GpuAffinity::Whole(2), 1)]);
        state.forget(0, &pod, &[0, 3]).unwrap();
        assert_eq!(state.node(0).gpu_free(), &[1000; 4]);
        assert!(state.node(0).affinities().is_empty());
        assert_ne!(state.node(0).generation(), g1);
        assert!(state.forget(0, &pod, &[0, 3]).is_err());
    }

    #[test]
    fn assume_rejects_bad_indices_and_overcommit() {
        let mut state = ClusterState::new(vec![gpu_node()]);
        let pod = PodRequest::new("p", 1000, 100, GpuDemand::Whole(2));
        assert!(state.assume(0, &pod, &[0]).is_err());
        assert!(state.assume(0, &pod, &[0, 0]).is_err());
        assert!(state.assume(0, &pod, &[0, 9]).is_err());
        let big = PodRequest::new("big", 64_000, 0, GpuDemand::None);
        assert!(state.assume(0, &big, &[]).is_err());
        assert_eq!(state.node(0).pods(), 0);
    }
}
