//! The building blocks of a BERT layer, with Hugging Face weight names.

use crate::ops::{
    attention::{attention, attention_packed},
    layer_norm::layer_norm,
    linear::{linear, linear_gelu},
    residual_norm::residual_layer_norm,
};
use std::sync::OnceLock;

use candle_core::{D, DType, Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// Hugging Face `nn.Linear`: `weight` is (out, in). Initialised like transformers'
/// `_init_weights` when absent from the checkpoint.
#[derive(Debug, Clone)]
pub(crate) struct Dense {
    weight: Tensor,
    bias: Tensor,
}

impl Dense {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, init_std: f64) -> Result<Self> {
        let init = Init::Randn {
            mean: 0.,
            stdev: init_std,
        };
        Ok(Self {
            weight: vb.get_with_hints((out_dim, in_dim), "weight", init)?,
            bias: vb.get_with_hints(out_dim, "bias", Init::Const(0.))?,
        })
    }

    /// x: (rows, in). The encoder keeps hidden states as (batch * seq, hidden) matrices:
    /// every reshape is one more node whose backward allocates and adds a full-size
    /// gradient.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        linear(x, &self.weight, &self.bias)
    }

    /// `gelu_erf(self.forward(x))`, fused in inference.
    pub fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        linear_gelu(x, &self.weight, &self.bias)
    }
}

/// Hugging Face `LayerNorm` (`weight`/`bias`) on the fused differentiable op.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", Init::Const(1.))?,
            bias: vb.get_with_hints(dim, "bias", Init::Const(0.))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Inverted dropout, active only when training.
pub(crate) fn dropout(x: &Tensor, p: f64, train: bool) -> Result<Tensor> {
    if train && p > 0. {
        crate::ops::dropout::dropout(x, p)
    } else {
        Ok(x.clone())
    }
}

/// The additive attention bias for a (batch, seq) mask of 1 (attend) / 0 (padding):
/// shape (batch, 1, 1, seq). Padding gets -1e4, not the dtype's minimum: `f32::MIN`
/// becomes -inf in f16/bf16 and turns rows into NaN; -1e4 already zeroes the
/// softmax weight in every dtype.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (batch, seq) = mask.dims2()?;
    let keep = mask.to_dtype(DType::F32)?;
    ((1. - keep)? * -1e4)?
        .to_dtype(dtype)?
        .reshape((batch, 1, 1, seq))
}

pub(crate) struct SelfAttention {
    query: Dense,
    key: Dense,
    value: Dense,
    heads: usize,
    dropout: f64,
    /// (weight, bias) of the three projections side by side, for `forward_packed`.
    fused_for_inference: OnceLock<(Tensor, Tensor)>,
}

impl SelfAttention {
    pub fn new(
        vb: VarBuilder,
        hidden: usize,
        heads: usize,
        dropout: f64,
        init_std: f64,
    ) -> Result<Self> {
        Ok(Self {
            query: Dense::new(vb.pp("query"), hidden, hidden, init_std)?,
            key: Dense::new(vb.pp("key"), hidden, hidden, init_std)?,
            value: Dense::new(vb.pp("value"), hidden, hidden, init_std)?,
            heads,
            dropout,
            fused_for_inference: OnceLock::new(),
        })
    }

    /// Inference over sequences packed end to end, `lengths` rows each: one product for
    /// all tokens, attention within each sequence. The concatenated weights are built on
    /// first use and kept, so the weights must not change afterwards.
    pub fn forward_packed(&self, x: &Tensor, lengths: &[usize]) -> Result<Tensor> {
        let (weight, bias) = match self.fused_for_inference.get() {
            Some(fused) => fused,
            None => {
                let parts = [&self.query, &self.key, &self.value];
                let fused = (
                    Tensor::cat(&parts.map(|d| &d.weight), 0)?,
                    Tensor::cat(&parts.map(|d| &d.bias), 0)?,
                );
                self.fused_for_inference.get_or_init(|| fused)
            }
        };
        attention_packed(&linear(x, weight, bias)?, lengths, self.heads)
    }

    /// x: (batch * seq, hidden); bias: (batch, 1, 1, seq) from [`attention_bias`].
    /// The three projections run as one product against the concatenated weights (a
    /// wider, faster gemm), feeding the fused attention op.
    pub fn forward(
        &self,
        x: &Tensor,
        batch: usize,
        bias: Option<&Tensor>,
        train: bool,
    ) -> Result<Tensor> {
        let parts = [&self.query, &self.key, &self.value];
        let weight = Tensor::cat(&parts.map(|d| &d.weight), 0)?;
        let bias_qkv = Tensor::cat(&parts.map(|d| &d.bias), 0)?;
        let qkv = linear(x, &weight, &bias_qkv)?;
        let p = if train { self.dropout } else { 0.0 };
        attention(&qkv, batch, self.heads, bias, p)
    }
}

/// dense -> dropout -> LayerNorm(out + residual): the tail of both halves of a layer,
/// the last three as one fused op.
pub(crate) struct ResidualNorm {
    dense: Dense,
    norm: Norm,
    dropout: f64,
}

impl ResidualNorm {
    pub fn new(
        vb: VarBuilder,
        in_dim: usize,
        hidden: usize,
        eps: f64,
        dropout: f64,
        init_std: f64,
    ) -> Result<Self> {
        Ok(Self {
            dense: Dense::new(vb.pp("dense"), in_dim, hidden, init_std)?,
            norm: Norm::new(vb.pp("LayerNorm"), hidden, eps)?,
            dropout,
        })
    }

    pub fn forward(&self, x: &Tensor, residual: &Tensor, train: bool) -> Result<Tensor> {
        let p = if train { self.dropout } else { 0.0 };
        let n = &self.norm;
        residual_layer_norm(
            &self.dense.forward(x)?,
            residual,
            &n.weight,
            &n.bias,
            n.eps,
            p,
        )
    }
}

/// Mean of the hidden states over the tokens the mask keeps: (batch, hidden).
pub(crate) fn masked_mean(hidden: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None => hidden.mean(1),
        Some(mask) => {
            let keep = mask.to_dtype(hidden.dtype())?.unsqueeze(D::Minus1)?;
            let sum = hidden.broadcast_mul(&keep)?.sum(1)?;
            // A row of all padding would divide by zero; clamp like sentence-transformers.
            sum.broadcast_div(&keep.sum(1)?.clamp(1e-9, f64::MAX)?)
        }
    }
}
