//! Optimizers whose state can be saved and restored: AdamW and SGD with momentum.

mod adamw;
pub mod schedule;
mod sgd;

use std::collections::{BTreeMap, HashMap};

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::grads::Grads;
use crate::params::{NamedVar, no_decay};

pub use schedule::Schedule;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// Decoupled weight decay (Loshchilov & Hutter), PyTorch defaults.
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    Sgd {
        momentum: f64,
        dampening: f64,
        nesterov: bool,
        weight_decay: f64,
    },
}

impl OptimizerConfig {
    pub fn adamw(weight_decay: f64) -> Self {
        OptimizerConfig::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    pub fn sgd(momentum: f64, nesterov: bool, weight_decay: f64) -> Self {
        OptimizerConfig::Sgd {
            momentum,
            dampening: 0.0,
            nesterov,
            weight_decay,
        }
    }

    /// PyTorch's names for the per-parameter state buffers.
    fn buffer_names(&self) -> &'static [&'static str] {
        match self {
            OptimizerConfig::AdamW { .. } => &["exp_avg", "exp_avg_sq"],
            OptimizerConfig::Sgd { momentum, .. } if *momentum != 0.0 => &["momentum_buffer"],
            OptimizerConfig::Sgd { .. } => &[],
        }
    }
}

/// Per-parameter state, created on the parameter's first update.
#[derive(Debug)]
struct Slot {
    /// Updates applied to this parameter (PyTorch keeps the count per parameter too).
    step: u64,
    buffers: Vec<Var>,
}

/// The JSON half of a saved optimizer; the tensors go to safetensors as
/// `<parameter>.<buffer>` (e.g. `fc1.weight.exp_avg`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerMeta {
    pub config: OptimizerConfig,
    /// Update counts of the parameters that have state.
    pub steps: BTreeMap<String, u64>,
}

pub struct Optimizer {
    config: OptimizerConfig,
    names: Vec<String>,
    decays: Vec<bool>,
    slots: Vec<Option<Slot>>,
}

impl Optimizer {
    /// `params`: the trainable variables in the order gradients come in.
    pub fn new(config: OptimizerConfig, params: &[NamedVar]) -> Self {
        Optimizer {
            names: params.iter().map(|p| p.name.clone()).collect(),
            decays: params
                .iter()
                .map(|p| !no_decay(&p.name, p.var.rank()))
                .collect(),
            slots: params.iter().map(|_| None).collect(),
            config,
        }
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Whether weight decay applies to the parameter `name`.
    pub fn decays(&self, name: &str) -> Option<bool> {
        self.names
            .iter()
            .position(|n| n == name)
            .map(|i| self.decays[i])
    }

    /// Updates every parameter that has a gradient.
    pub fn step(&mut self, params: &[NamedVar], grads: &Grads, lr: f64) -> Result<()> {
        if params.len() != self.names.len() || grads.len() != self.names.len() {
            return Err(Error::Config(format!(
                "optimizer built for {} parameters got {} parameters and {} gradients",
                self.names.len(),
                params.len(),
                grads.len()
            )));
        }
        for (i, p) in params.iter().enumerate() {
            let Some(grad) = grads.get(i) else { continue };
            let slot = match &mut self.slots[i] {
                Some(slot) => slot,
                empty => empty.insert(Slot {
                    step: 0,
                    buffers: self
                        .config
                        .buffer_names()
                        .iter()
                        .map(|_| Var::zeros(p.var.shape(), p.var.dtype(), p.var.device()))
                        .collect::<candle_core::Result<_>>()?,
                }),
            };
            slot.step += 1;
            let decay = |wd: f64| if self.decays[i] { wd } else { 0.0 };
            match self.config {
                OptimizerConfig::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => adamw::update(
                    &p.var,
                    grad,
                    &slot.buffers[0],
                    &slot.buffers[1],
                    adamw::Hyper {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay: decay(weight_decay),
                        step: slot.step,
                    },
                ),
                OptimizerConfig::Sgd {
                    momentum,
                    dampening,
                    nesterov,
                    weight_decay,
                } => sgd::update(
                    &p.var,
                    grad,
                    slot.buffers.first(),
                    slot.step == 1,
                    sgd::Hyper {
                        lr,
                        momentum,
                        dampening,
                        nesterov,
                        weight_decay: decay(weight_decay),
                    },
                ),
            }
            .map_err(|e| Error::Config(format!("optimizer update of {}: {e}", p.name)))?;
        }
        Ok(())
    }

    /// The state to save: metadata and `<parameter>.<buffer>` tensors.
    pub fn state(&self) -> (OptimizerMeta, Vec<(String, Tensor)>) {
        let mut steps = BTreeMap::new();
        let mut tensors = Vec::new();
        for (name, slot) in self.names.iter().zip(&self.slots) {
            let Some(slot) = slot else { continue };
            steps.insert(name.clone(), slot.step);
            for (buffer, var) in self.config.buffer_names().iter().zip(&slot.buffers) {
                // Detached: `load_state` then copies it into a new Var instead of sharing it.
                tensors.push((format!("{name}.{buffer}"), var.as_detached_tensor()));
            }
        }
        (
            OptimizerMeta {
                config: self.config.clone(),
                steps,
            },
            tensors,
        )
    }

    /// Restores saved state into an optimizer built for the same parameters. `params`
    /// gives each buffer its device and dtype; `source` names the file in errors.
    pub fn load_state(
        &mut self,
        params: &[NamedVar],
        meta: &OptimizerMeta,
        tensors: &HashMap<String, Tensor>,
        source: &str,
    ) -> Result<()> {
        let bad = |detail: String| Error::Config(format!("optimizer state {source}: {detail}"));
        if meta.config != self.config {
            return Err(bad(format!(
                "saved for {:?}, this run uses {:?}",
                meta.config, self.config
            )));
        }
        if let Some(unknown) = meta.steps.keys().find(|n| !self.names.contains(n)) {
            return Err(bad(format!(
                "has state for {unknown}, which is not a trainable parameter of this model"
            )));
        }
        for (i, p) in params.iter().enumerate() {
            self.slots[i] = match meta.steps.get(&p.name) {
                None => None,
                Some(&step) => {
                    let buffers = self
                        .config
                        .buffer_names()
                        .iter()
                        .map(|buffer| {
                            let key = format!("{}.{buffer}", p.name);
                            let t = tensors
                                .get(&key)
                                .ok_or_else(|| bad(format!("tensor {key} is missing")))?;
                            if t.shape() != p.var.shape() {
                                return Err(bad(format!(
                                    "tensor {key} has shape {:?}, the parameter {:?}",
                                    t.shape().dims(),
                                    p.var.shape().dims()
                                )));
                            }
                            let t = t.to_device(p.var.device())?.to_dtype(p.var.dtype())?;
                            Ok(Var::from_tensor(&t)?)
                        })
                        .collect::<Result<_>>()?;
                    Some(Slot { step, buffers })
                }
            };
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
