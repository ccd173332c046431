//! One AdamW update (PyTorch's formulation, decoupled weight decay) for one parameter:
//! a single fused pass over the four buffers on CPU, candle ops elsewhere.

use candle_core::{Tensor, Var};
use rayon::prelude::*;

use crate::host;

/// The scalars of one update of one parameter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Hyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// 0 for parameters excluded from decay.
    pub weight_decay: f64,
    /// 1-based count of updates of this parameter, this one included.
    pub step: u64,
}

impl Hyper {
    fn decay_factor(&self) -> f64 {
        1.0 - self.lr * self.weight_decay
    }
    fn step_size(&self) -> f64 {
        self.lr / (1.0 - self.beta1.powi(self.step as i32))
    }
    fn bias_correction2_sqrt(&self) -> f64 {
        (1.0 - self.beta2.powi(self.step as i32)).sqrt()
    }
}

/// Elements per task: large enough that scheduling costs nothing, small enough to
/// spread a 1M-element tensor over the threads.
const CHUNK: usize = 1 << 16;

pub(crate) fn update(
    param: &Var,
    grad: &Tensor,
    exp_avg: &Var,
    exp_avg_sq: &Var,
    h: Hyper,
) -> candle_core::Result<()> {
    let all_reachable = [
        param.as_tensor(),
        grad,
        exp_avg.as_tensor(),
        exp_avg_sq.as_tensor(),
    ]
    .into_iter()
    .all(host::reachable);
    if all_reachable {
        update_fused(param, grad, exp_avg, exp_avg_sq, h)
    } else {
        update_with_ops(param, grad, exp_avg, exp_avg_sq, h)
    }
}

pub(crate) fn update_fused(
    param: &Var,
    grad: &Tensor,
    exp_avg: &Var,
    exp_avg_sq: &Var,
    h: Hyper,
) -> candle_core::Result<()> {
    let decay = h.decay_factor() as f32;
    let step_size = h.step_size() as f32;
    let bc2_sqrt = h.bias_correction2_sqrt() as f32;
    // 1 - beta in f64 first: 1 - 0.999f32 is off by 5e-5 relative, which shows in v.
    let (b2, eps) = (h.beta2 as f32, h.eps as f32);
    let (one_minus_b1, one_minus_b2) = ((1.0 - h.beta1) as f32, (1.0 - h.beta2) as f32);
    let kernel = |p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32]| {
        // Zipped iterators: no bounds checks, so the loop vectorises.
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            *m += one_minus_b1 * (g - *m);
            *v = *v * b2 + one_minus_b2 * g * g;
            let denom = v.sqrt() / bc2_sqrt + eps;
            *p = *p * decay - step_size * (*m / denom);
        }
    };
    let unreachable = || candle_core::Error::Msg("AdamW: buffer not reachable".into());
    let done = host::write(exp_avg.as_tensor(), |m| {
        let done = host::write(exp_avg_sq.as_tensor(), |v| {
            let done = host::write(param.as_tensor(), |p| {
                host::read(grad, |g| {
                    p.par_chunks_mut(CHUNK)
                        .zip(g.par_chunks(CHUNK))
                        .zip(m.par_chunks_mut(CHUNK))
                        .zip(v.par_chunks_mut(CHUNK))
                        .for_each(|(((p, g), m), v)| kernel(p, g, m, v))
                })
                .ok_or_else(unreachable)
            })?;
            done.then_some(()).ok_or_else(unreachable)
        })?;
        done.then_some(()).ok_or_else(unreachable)
    })?;
    done.then_some(()).ok_or_else(unreachable)
}

/// The same update as candle ops, for GPU tensors and other dtypes.
pub(crate) fn update_with_ops(
    param: &Var,
    grad: &Tensor,
    exp_avg: &Var,
    exp_avg_sq: &Var,
    h: Hyper,
) -> candle_core::Result<()> {
    let g = grad.to_dtype(exp_avg.dtype())?;
    let m = (exp_avg.as_tensor() + (&g - exp_avg.as_tensor())?.affine(1.0 - h.beta1, 0.0)?)?;
    let v = (exp_avg_sq.affine(h.beta2, 0.0)? + g.sqr()?.affine(1.0 - h.beta2, 0.0)?)?;
    let denom = v.sqrt()?.affine(1.0 / h.bias_correction2_sqrt(), h.eps)?;
    let delta = (&m / denom)?.affine(h.step_size(), 0.0)?;
    let p = (param.affine(h.decay_factor(), 0.0)? - delta.to_dtype(param.dtype())?)?;
    exp_avg.set(&m)?;
    exp_avg_sq.set(&v)?;
    param.set(&p)
}
