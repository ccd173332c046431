//! One optimizer step from micro-batch losses: backward, gradient accumulation, DDP
//! averaging, the NaN/Inf check, global-norm clipping, the learning-rate schedule and the
//! optimizer update, in that order.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::ddp::Ddp;
use crate::error::{Error, Result};
use crate::grads::{Grads, clip_global_norm, first_non_finite};
use crate::optim::{Optimizer, OptimizerConfig, Schedule};
use crate::params::{ModelVars, NamedVar};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NonFinitePolicy {
    /// Stop with an error naming the step and the first offending tensor.
    Error,
    /// Skip the update with a warning (the step still counts for the schedule).
    Skip,
}

#[derive(Debug, Clone)]
pub struct StepConfig {
    /// Peak learning rate; the schedule scales it.
    pub lr: f64,
    pub schedule: Schedule,
    /// Micro-batches per optimizer step. Their gradients are summed and divided by this
    /// count, so k micro-batches of b with a mean loss equal one batch of k*b.
    pub accumulation: usize,
    /// Global L2 norm above which gradients are scaled down.
    pub clip_norm: Option<f64>,
    pub non_finite: NonFinitePolicy,
}

impl StepConfig {
    pub fn new(lr: f64) -> Self {
        StepConfig {
            lr,
            schedule: Schedule::Constant,
            accumulation: 1,
            clip_norm: None,
            non_finite: NonFinitePolicy::Error,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// Gradients kept; `micro` of `accumulation` micro-batches seen.
    Accumulating {
        micro: usize,
    },
    Updated {
        step: u64,
        lr: f64,
        grad_norm: f64,
    },
    Skipped {
        step: u64,
        what: String,
    },
}

pub struct Stepper {
    cfg: StepConfig,
    /// The model's trainable variables: where gradients come from.
    params: Vec<NamedVar>,
    /// What the optimizer updates: the variable itself when it is f32/f64, otherwise an
    /// f32 master copy (bf16/f16 compute), copied back into the model after each update
    /// so small updates are not rounded away.
    updated: Vec<NamedVar>,
    optimizer: Optimizer,
    ddp: Option<Ddp>,
    /// Optimizer steps taken (skipped ones included).
    step: u64,
    pending: Option<Grads>,
    micro: usize,
    loss_non_finite: bool,
}

impl Stepper {
    /// `ddp`: built over the same `vars` (it has already synchronised them).
    pub fn new(
        cfg: StepConfig,
        vars: &ModelVars,
        optimizer: OptimizerConfig,
        ddp: Option<Ddp>,
    ) -> Result<Self> {
        if cfg.accumulation == 0 {
            return Err(Error::Config(
                "gradient accumulation must be at least 1 micro-batch".into(),
            ));
        }
        let params = vars.trainable();
        let updated = params
            .iter()
            .map(|p| {
                let var = match p.var.dtype() {
                    DType::F32 | DType::F64 => p.var.clone(),
                    _ => Var::from_tensor(&p.var.to_dtype(DType::F32)?)?,
                };
                Ok(NamedVar { var, ..p.clone() })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Stepper {
            optimizer: Optimizer::new(optimizer, &updated),
            cfg,
            params,
            updated,
            ddp,
            step: 0,
            pending: None,
            micro: 0,
            loss_non_finite: false,
        })
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn params(&self) -> &[NamedVar] {
        &self.params
    }

    /// The variables the optimizer updates, in [`Self::params`] order: f32 master copies
    /// of low-precision parameters, the parameters themselves otherwise.
    pub fn master_params(&self) -> &[NamedVar] {
        &self.updated
    }

    /// Copies master weights into the model's low-precision variables.
    pub(crate) fn refresh_model_from_masters(&self) -> Result<()> {
        for (p, master) in self.params.iter().zip(&self.updated) {
            if p.var.dtype() != master.var.dtype() {
                p.var.set(&master.var.to_dtype(p.var.dtype())?)?;
            }
        }
        Ok(())
    }

    pub fn optimizer(&self) -> &Optimizer {
        &self.optimizer
    }

    pub fn ddp_mut(&mut self) -> Option<&mut Ddp> {
        self.ddp.as_mut()
    }

    /// Whether micro-batches of an unfinished step are held (a checkpoint would lose them).
    pub fn mid_step(&self) -> bool {
        self.micro > 0
    }

    pub(crate) fn optimizer_mut(&mut self) -> &mut Optimizer {
        &mut self.optimizer
    }

    pub(crate) fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// Back-propagates one micro-batch's scalar loss; on the last micro-batch of a step,
    /// averages, checks, clips and updates.
    pub fn backward(&mut self, loss: &Tensor) -> Result<StepOutcome> {
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>().map_err(|e| {
            Error::Config(format!(
                "the loss must be a scalar tensor, got shape {:?}: {e}",
                loss.dims()
            ))
        })?;
        self.loss_non_finite |= !value.is_finite();
        self.micro += 1;
        let scale = 1.0 / self.cfg.accumulation as f64;
        if self.micro < self.cfg.accumulation {
            let earlier = self.pending.take();
            self.pending = Some(Grads::backward(&self.params, loss, scale, earlier)?);
            return Ok(StepOutcome::Accumulating { micro: self.micro });
        }
        self.micro = 0;
        let local_loss_bad = std::mem::take(&mut self.loss_non_finite);
        let earlier = self.pending.take();
        let (grads, any_loss_bad) = match &mut self.ddp {
            // The last micro-batch's gradients are averaged while its backward runs.
            Some(ddp) => ddp.backward_and_reduce(loss, earlier, scale, local_loss_bad)?,
            None => (
                Grads::backward(&self.params, loss, scale, earlier)?,
                local_loss_bad,
            ),
        };
        self.update(grads, local_loss_bad, any_loss_bad)
    }

    fn update(
        &mut self,
        mut grads: Grads,
        local_loss_bad: bool,
        any_loss_bad: bool,
    ) -> Result<StepOutcome> {
        let squares = grads.sum_squares()?;
        let step = self.step + 1;
        let bad = if any_loss_bad {
            Some(if local_loss_bad {
                "the loss".to_string()
            } else {
                "the loss of another rank".to_string()
            })
        } else {
            first_non_finite(&self.params, &squares).map(|n| format!("the gradient of {n}"))
        };
        if let Some(what) = bad {
            return match self.cfg.non_finite {
                NonFinitePolicy::Error => Err(Error::NonFinite { step, what }),
                NonFinitePolicy::Skip => {
                    warn!(step, %what, "non-finite value: update skipped");
                    self.step = step;
                    Ok(StepOutcome::Skipped { step, what })
                }
            };
        }
        let grad_norm = match self.cfg.clip_norm {
            Some(max) => clip_global_norm(&mut grads, &squares, max)?.norm,
            None => squares.iter().sum::<f64>().sqrt(),
        };
        let lr = self.cfg.lr * self.cfg.schedule.factor(self.step);
        self.optimizer.step(&self.updated, &grads, lr)?;
        self.refresh_model_from_masters()?;
        self.step = step;
        Ok(StepOutcome::Updated {
            step,
            lr,
            grad_norm,
        })
    }
}
