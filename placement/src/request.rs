//! What a pod asks for. Plain values; the scheduler fills them from Kubernetes pods.

use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Milli-GPU in one whole device.
pub const MILLI: u32 = 1000;

/// GPU part of a request. A share is a fraction of one device; whole GPUs are exclusive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GpuDemand {
    #[default]
    None,
    /// Part of one device, in milli-GPU (1..=999).
    Share(u32),
    /// `k` whole devices.
    Whole(u32),
}

impl GpuDemand {
    /// Builds the demand from the trace's `num_gpu` and per-GPU `gpu_milli`.
    pub fn from_count_milli(count: u32, milli: u32) -> Option<GpuDemand> {
        match (count, milli.min(MILLI)) {
            (0, _) | (_, 0) => Some(GpuDemand::None),
            (1, m) if m < MILLI => Some(GpuDemand::Share(m)),
            (k, MILLI) => Some(GpuDemand::Whole(k)),
            _ => None,
        }
    }

    /// Total milli-GPU requested.
    pub fn total_milli(self) -> u64 {
        match self {
            GpuDemand::None => 0,
            GpuDemand::Share(m) => u64::from(m),
            GpuDemand::Whole(k) => u64::from(k) * u64::from(MILLI),
        }
    }

    /// Devices touched and milli taken on each.
    pub fn devices_and_milli(self) -> (u32, u32) {
        match self {
            GpuDemand::None => (0, 0),
            GpuDemand::Share(m) => (1, m),
            GpuDemand::Whole(k) => (k, MILLI),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: TaintEffect,
}

/// Kubernetes toleration semantics: an empty key with `Exists` tolerates everything, a
/// missing effect tolerates every effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Toleration {
    pub key: String,
    pub exists: bool,
    pub value: String,
    pub effect: Option<TaintEffect>,
}

impl Toleration {
    pub fn tolerates(&self, taint: &Taint) -> bool {
        if self.effect.is_some_and(|e| e != taint.effect) {
            return false;
        }
        if self.key.is_empty() {
            return self.exists;
        }
        self.key == taint.key && (self.exists || self.value == taint.value)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LabelOp {
    In(Vec<String>),
    NotIn(Vec<String>),
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelRequirement {
    pub key: String,
    pub op: LabelOp,
}

impl LabelRequirement {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match &self.op {
            LabelOp::In(values) => value.is_some_and(|v| values.contains(v)),
            LabelOp::NotIn(values) => value.is_none_or(|v| !values.contains(v)),
            LabelOp::Exists => value.is_some(),
            LabelOp::DoesNotExist => value.is_none(),
        }
    }
}

/// One pod to place.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRequest {
    pub name: String,
    pub cpu_milli: u64,
    pub memory_mib: u64,
    pub gpu: GpuDemand,
    /// Acceptable GPU models; empty means any.
    pub gpu_models: Vec<String>,
    /// `nodeSelector`: every pair must be a node label.
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity: the node must match one term; a term is an AND.
    pub affinity_terms: Vec<Vec<LabelRequirement>>,
    pub tolerations: Vec<Toleration>,
}

impl PodRequest {
    pub fn new(name: impl Into<String>, cpu_milli: u64, memory_mib: u64, gpu: GpuDemand) -> Self {
        PodRequest {
            name: name.into(),
            cpu_milli,
            memory_mib,
            gpu,
            ..PodRequest::default()
        }
    }

    pub fn with_gpu_models(mut self, models: &[&str]) -> Self {
        self.gpu_models = models.iter().map(|m| m.to_string()).collect();
        self
    }

    pub fn with_selector(mut self, key: &str, value: &str) -> Self {
        self.node_selector.insert(key.into(), value.into());
        self
    }

    pub fn with_toleration(mut self, toleration: Toleration) -> Self {
        self.tolerations.push(toleration);
        self
    }

    /// Rejects requests no node could ever satisfy because they are self-contradictory.
    pub fn validate(&self) -> Result<()> {
        let bad = |message: &str| {
            Err(Error::InvalidRequest {
                pod: self.name.clone(),
                message: message.into(),
            })
        };
        match self.gpu {
            GpuDemand::Share(m) if m == 0 || m >= MILLI => {
                bad("a GPU share must be between 1 and 999 milli-GPU")
            }
            GpuDemand::Whole(0) => bad("a whole-GPU request needs at least one GPU"),
            _ => Ok(()),
        }
    }

    /// Requests with the same shape get the same score on the same node state.
    pub fn shape(&self) -> PodShape {
        PodShape {
            cpu_milli: self.cpu_milli,
            gpu: self.gpu,
            gpu_models: self.gpu_models.clone(),
        }
    }
}

/// The part of a request that scoring looks at (memory and labels only filter).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodShape {
    pub cpu_milli: u64,
    pub gpu: GpuDemand,
    pub gpu_models: Vec<String>,
}
