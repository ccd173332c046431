//! BatchNorm2d that trains: batch statistics and running-average updates in training,
//! running statistics in evaluation, as PyTorch's `nn.BatchNorm2d`.

use candle_core::{ModuleT, Result, Tensor, Var};
use candle_nn::{Init, VarBuilder};

use crate::ops::batch_norm::batch_norm_train;

/// Names (last path component) of BatchNorm state that is not a parameter: it gets no
/// gradient, is not optimised, and is averaged across data-parallel ranks instead.
pub const BATCH_NORM_BUFFERS: [&str; 3] = ["running_mean", "running_var", "num_batches_tracked"];

/// Whether the variable `name` (e.g. `layer1.0.bn1.running_var`) is a BatchNorm buffer.
pub fn is_batch_norm_buffer(name: &str) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    BATCH_NORM_BUFFERS.contains(&last)
}

#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    /// Vars share storage with the VarMap, so in-place updates are saved with it.
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm2d {
    /// PyTorch defaults: eps 1e-5, momentum 0.1, weight 1, bias 0, running mean 0, var 1.
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", Init::Const(0.))?;
        let running_mean = vb.get_with_hints(channels, "running_mean", Init::Const(0.))?;
        let running_var = vb.get_with_hints(channels, "running_var", Init::Const(1.))?;
        Ok(Self {
            weight,
            bias,
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps: 1e-5,
            momentum: 0.1,
        })
    }

    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// `relu(self(x))` in one fused op when training; what ResNet calls after most convolutions.
    pub fn forward_relu_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
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
        let blend = |running: &Var, batch: Tensor| -> Result<()> {
            let running_t = running.as_tensor();
            let updated = ((running_t * (1.0 - self.momentum))?
                + (batch.to_dtype(running_t.dtype())? * self.momentum)?)?;
            running.set(&updated.detach())
        };
        blend(&self.running_mean, out.mean)?;
        blend(&self.running_var, unbiased_var)?;
        Ok(out.output)
    }

    fn forward_eval(&self, x: &Tensor) -> Result<Tensor> {
        // Buffers get no gradient, even when an evaluation loss is differentiated.
        let (mean, var) = (
            self.running_mean.as_tensor().detach(),
            self.running_var.as_tensor().detach(),
        );
        let channels = self.weight.dim(0)?;
        let scale = (&self.weight / (var + self.eps)?.sqrt()?)?;
        let shift = (&self.bias - (mean * &scale)?)?;
        x.broadcast_mul(&scale.reshape((1, channels, 1, 1))?)?
            .broadcast_add(&shift.reshape((1, channels, 1, 1))?)
    }
}

impl ModuleT for BatchNorm2d {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if train {
            self.forward_train(x, false)
        } else {
            self.forward_eval(x)
        }
    }
}
