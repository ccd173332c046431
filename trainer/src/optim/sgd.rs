//! One SGD update (PyTorch's formulation: L2 weight decay added to the gradient, momentum
//! with dampening, optional Nesterov) for one parameter: a single fused pass on CPU,
//! candle ops elsewhere.

use candle_core::{Tensor, Var};
use rayon::prelude::*;

use crate::host;

/// Elements per parallel task, as in AdamW.
const CHUNK: usize = 1 << 16;

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
    let reachable = host::reachable(param.as_tensor())
        && host::reachable(grad)
        && momentum_buffer.is_none_or(|b| host::reachable(b.as_tensor()));
    if reachable {
        update_fused(param, grad, momentum_buffer, first, h)
    } else {
        update_with_ops(param, grad, momentum_buffer, first, h)
    }
}

/// The update as one pass over parameter, gradient and buffer, in torch's order of
/// operations so that f32 results match its.
pub(crate) fn update_fused(
    param: &Var,
    grad: &Tensor,
    momentum_buffer: Option<&Var>,
    first: bool,
    h: Hyper,
) -> candle_core::Result<()> {
    let (lr, wd) = (h.lr as f32, h.weight_decay as f32);
    let (momentum, undamped) = (h.momentum as f32, (1.0 - h.dampening) as f32);
    let direction = |p: f32, g: f32| if wd != 0.0 { g + wd * p } else { g };
    let unreachable = || candle_core::Error::Msg("SGD: buffer not reachable".into());
    let done = host::write(param.as_tensor(), |p| {
        host::read(grad, |g| match momentum_buffer {
            None => {
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(p, g)| {
                        for (p, &g) in p.iter_mut().zip(g) {
                            *p -= lr * direction(*p, g);
                        }
                    });
                Ok(true)
            }
            Some(buffer) => host::write(buffer.as_tensor(), |b| {
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .zip(b.par_chunks_mut(CHUNK))
                    .for_each(|((p, g), b)| {
                        for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
                            let d = direction(*p, g);
                            *b = if first {
                                d
                            } else {
                                momentum * *b + undamped * d
                            };
                            let step = if h.nesterov { d + momentum * *b } else { *b };
                            *p -= lr * step;
                        }
                    });
                Ok(())
            }),
        })
        .ok_or_else(unreachable)?
        .and_then(|written| written.then_some(()).ok_or_else(unreachable))
    })?;
    done.then_some(()).ok_or_else(unreachable)
}

/// The same update as candle ops, for GPU tensors and other dtypes.
pub(crate) fn update_with_ops(
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
