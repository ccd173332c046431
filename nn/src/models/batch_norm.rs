//! BatchNorm2d that trains: batch statistics and running-average updates in training,
//! running statistics in evaluation, as PyTorch's `nn.BatchNorm2d`; or frozen, with
//! running statistics always (detectron2's `FrozenBatchNorm2d`).

use candle_core::{DType, ModuleT, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::ops::batch_norm::batch_norm_train;

/// The count of training batches a BatchNorm has seen (torch's `num_batches_tracked`).
pub const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

/// The dtype of [`NUM_BATCHES_TRACKED`]: torch's int64, so a torchvision count loads and
/// saves exactly and keeps counting past f32's 2^24 (bf16's 256). A `VarMap` creates it
/// with any builder dtype (`Init::Const(0.)` is `zeros`). Data-parallel buffer averaging
/// goes through f32: exact while counts are below 2^24 and equal on every rank, which
/// they are (every rank runs the same number of training forwards).
pub const NUM_BATCHES_TRACKED_DTYPE: DType = DType::I64;

/// Names (last path component) of BatchNorm state that is not a parameter: it gets no
/// gradient, is not optimised, and is averaged across data-parallel ranks instead.
pub const BATCH_NORM_BUFFERS: [&str; 3] = ["running_mean", "running_var", NUM_BATCHES_TRACKED];

/// Whether the variable `name` (e.g. `layer1.0.bn1.running_var`) is a BatchNorm buffer.
pub fn is_batch_norm_buffer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    BATCH_NORM_BUFFERS.contains(&last)
}

#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    /// Buffers share storage with the builder's variables and are updated in place, so
    /// the updates are saved and averaged with them. (A builder may serve buffers
    /// detached; `Var::from_tensor` would then copy them and updates would be lost.)
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    eps: f64,
    momentum: f64,
    frozen: bool,
}

impl BatchNorm2d {
    /// PyTorch defaults: eps 1e-5, momentum 0.1, weight 1, bias 0, running mean 0, var 1,
    /// count 0; not frozen.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.))?,
            running_mean: vb.get_with_hints(channels, "running_mean", Init::Const(0.))?,
            running_var: vb.get_with_hints(channels, "running_var", Init::Const(1.))?,
            num_batches_tracked: vb.get_with_hints_dtype(
                (),
                NUM_BATCHES_TRACKED,
                Init::Const(0.),
                NUM_BATCHES_TRACKED_DTYPE,
            )?,
            eps: 1e-5,
            momentum: 0.1,
            frozen: false,
        })
    }

    pub fn running_mean(&self) -> &Tensor {
        &self.running_mean
    }

    pub fn running_var(&self) -> &Tensor {
        &self.running_var
    }

    /// Training forwards seen (an I64 scalar).
    pub fn num_batches_tracked(&self) -> &Tensor {
        &self.num_batches_tracked
    }

    /// Frozen: normalise with the running statistics in training too and never update
    /// them, for fine-tuning with batches too small for batch statistics. Weight and bias
    /// still get gradients; freeze them by name if they should not train.
    pub fn set_frozen(&mut self, frozen: bool) {
        self.frozen = frozen;
    }

    /// `relu(self(x))` in one fused op when training; what ResNet calls after most convolutions.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && !self.frozen {
            self.forward_train(x, true)
        } else {
            self.forward_eval(x)?.relu()
        }
    }

    fn forward_train(&self, x: &Tensor, relu: bool) -> Result<Tensor> {
        let out = batch_norm_train(x, &self.weight, &self.bias, self.eps, relu)?;
        let (n, _, h, w) = x.dims4()?;
        let count = (n * h * w) as f64;
        // Normalisation uses the biased variance, the running average the unbiased one.
        let unbiased_var = (out.var * (count / (count - 1.0)))?;
        let blend = |running: &Tensor, batch: Tensor| -> Result<()> {
            let running_t = running.detach();
            let updated = ((running_t * (1.0 - self.momentum))?
                + (batch.to_dtype(running.dtype())? * self.momentum)?)?;
            overwrite(running, &updated.detach())
        };
        blend(&self.running_mean, out.mean)?;
        blend(&self.running_var, unbiased_var)?;
        overwrite(
            &self.num_batches_tracked,
            &(self.num_batches_tracked.detach() + 1.0)?,
        )?;
        Ok(out.output)
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        // Buffers get no gradient, even when an evaluation loss is differentiated.
        let (mean, var) = (self.running_mean.detach(), self.running_var.detach());
        let channels = self.weight.dim(0)?;
        let scale = (&self.weight / (var + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        x.broadcast_mul(&scale.reshape((1, channels, 1, 1))?)?
            .broadcast_add(&shift.reshape((1, channels, 1, 1))?)
    }
}

/// Writes `values` into the storage of `buffer` (of any rank, scalars included), on any
/// device, so every tensor sharing that storage sees them.
fn overwrite(buffer: &Tensor, values: &Tensor) -> Result<()> {
    buffer
        .flatten_all()?
        .slice_set(&values.flatten_all()?, 0, 0)
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train && !self.frozen {
            self.forward_train(x, false)
        } else {
            self.forward_eval(x)
        }
    }
}
