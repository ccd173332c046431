//! One SGD update (PyTorch's formulation: L2 weight decay added to the gradient, momentum
//! with dampening, optional Nesterov) for one parameter.

use candle_core::{Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub(crate) struct Hyper {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    /// 0 for parameters excluded from decay.
    pub weight_decay: f64,
}

/// `momentum_buffer` is `None` when momentum is 0; `first` when it has never been
/// updated (PyTorch then starts it at the gradient, undamped).
pub(crate) fn update(
    param: &Var,
    grad: &Tensor,
    momentum_buffer: Option<&Var>,
    first: bool,
    h: Hyper,
) -> candle_core::Result<()> {
    let mut d = grad.to_dtype(param.dtype())?;
    if h.weight_decay != 0.0 {
        d = (d + param.affine(h.weight_decay, 0.0)?)?;
    }
    if let Some(buf) = momentum_buffer {
        let b = if first {
            d.clone()
        } else {
            (buf.affine(h.momentum, 0.0)? + d.affine(1.0 - h.dampening, 0.0)?)?
        };
        buf.set(&b)?;
        d = if h.nesterov {
            (d + b.affine(h.momentum, 0.0)?)?
        } else {
            b
        };
    }
    param.set(&(param.as_tensor() - d.affine(h.lr, 0.0)?)?)
}
