//! Softmax over the last dimension as one fused op with a hand-written backward.
//!
//! candle's `softmax_last_dim` has no backward and `ops::softmax` runs five tensor ops
//! (each with its own backward); attention scores are the largest tensors in BERT.

use super::float::{
    Real, dispatch_real, last_dim, map_row_pairs, map_rows, max_of, output_buffer, rows_per_task,
    sum_map, sum_zip, widest_vectors,
};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// Softmax over the last dimension, differentiable. Fused f32/f64 kernels on CPU,
/// candle's composed softmax elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    attention_softmax(x, 1.0, None)
}

/// `softmax(scale * scores + bias)` over the last dimension, for attention: scores
/// (batch, heads, queries, keys), bias (batch, 1, 1, keys) such as
/// [`attention_bias`](crate::models::bert::attention_bias). Folding the 1/sqrt(d) scale
/// and the mask into the softmax saves two full-size passes forward and two backward.
/// Differentiable in `scores`.
pub fn attention_softmax(scores: &Tensor, scale: f64, bias: Option<&Tensor>) -> Result<Tensor> {
    if let Some(bias) = bias {
        let (batch, _, _, keys) = scores.dims4()?;
        if bias.dims() != [batch, 1, 1, keys] {
            bail!(
                "attention_softmax: bias has shape {:?}, expected [{batch}, 1, 1, {keys}]",
                bias.dims()
            )
        }
    }
    if !scores.device().is_cpu() {
        let scaled = (scores * scale)?;
        let shifted = match bias {
            Some(bias) => scaled.broadcast_add(bias)?,
            None => scaled,
        };
        return candle_nn::ops::softmax(&shifted, D::Minus1);
    }
    let scores = scores.contiguous()?;
    match bias {
        Some(bias) => scores.apply_op2(&bias.contiguous()?, BiasedSoftmax { scale }),
        None => scores.apply_op1(Softmax { scale }),
    }
}

pub(crate) fn softmax_row<T: Real>(y: &mut [T], x: &[T], scale: T, bias: Option<&[T]>) {
    widest_vectors(
        #[inline(always)]
        || softmax_row_passes(y, x, scale, bias),
    )
}

#[inline(always)]
fn softmax_row_passes<T: Real>(y: &mut [T], x: &[T], scale: T, bias: Option<&[T]>) {
    // Separate simple passes (shift, max, exp + sum, normalise) so each vectorises.
    match bias {
        Some(bias) => y
            .iter_mut()
            .zip(x)
            .zip(bias)
            .for_each(|((y, &x), &b)| *y = scale * x + b),
        None => y.iter_mut().zip(x).for_each(|(y, &x)| *y = scale * x),
    }
    let max = max_of(y);
    y.iter_mut().for_each(|y| *y = (*y - max).fast_exp());
    let sum = sum_map(y, |v| v);
    let inv = sum.recip();
    y.iter_mut().for_each(|y| *y *= inv);
}

struct Softmax {
    scale: f64,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let d = last_dim(layout, op)?;
        let y = dispatch_real!(x, op, |T| {
            let scale = T::lit(self.scale);
            T::storage(map_rows(T::elements(x, layout, op)?, d, |y, x| {
                softmax_row(y, x, scale, None)
            }))
        });
        Ok((y, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(
            &dy.contiguous()?,
            &SoftmaxGrad { scale: self.scale },
        )?))
    }
}

struct BiasedSoftmax {
    scale: f64,
}

fn biased_forward<T: Real>(x: &[T], bias: &[T], keys: usize, scale: T) -> Vec<T> {
    // Every batch item owns heads * queries consecutive rows of x.
    let rows_per_item = x.len() / bias.len().max(1);
    let rows_per_chunk = rows_per_task(keys);
    let mut y = output_buffer(x.len());
    y.par_chunks_mut(rows_per_chunk * keys)
        .zip(x.par_chunks(rows_per_chunk * keys))
        .enumerate()
        .for_each(|(chunk, (y, x))| {
            for (i, (y, x)) in y
                .chunks_exact_mut(keys)
                .zip(x.chunks_exact(keys))
                .enumerate()
            {
                let item = (chunk * rows_per_chunk + i) / rows_per_item;
                softmax_row(y, x, scale, Some(&bias[item * keys..(item + 1) * keys]))
            }
        });
    y
}

impl CustomOp2 for BiasedSoftmax {
    fn name(&self) -> &'static str {
        "softmax-with-bias"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        bias: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let keys = last_dim(lx, op)?;
        let y = dispatch_real!(x, op, |T| {
            let (x, bias) = (T::elements(x, lx, op)?, T::elements(bias, lb, op)?);
            T::storage(biased_forward(x, bias, keys, T::lit(self.scale)))
        });
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _bias: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxGrad { scale: self.scale })?;
        Ok((Some(dx), None))
    }
}

/// dx = scale * y * (dy - sum(dy * y)) per row, from the forward's output `y`.
struct SoftmaxGrad {
    scale: f64,
}

fn backward<T: Real>(y: &[T], dy: &[T], d: usize, scale: T) -> Result<Vec<T>> {
    map_row_pairs(y, dy, d, |dx, y, dy| {
        let dot = sum_zip(y, dy, |y, g| y * g);
        for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
            *dx = scale * y * (g - dot);
        }
    })
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "softmax-last-dim-grad"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        ly: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let d = last_dim(ly, op)?;
        let dx = dispatch_real!(y, op, |T| {
            let (y, dy) = (T::elements(y, ly, op)?, T::elements(dy, ldy, op)?);
            T::storage(backward(y, dy, d, T::lit(self.scale))?)
        });
        Ok((dx, ly.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_gradient;
    use candle_core::Device;

    #[test]
    fn forward_matches_candle_and_survives_large_inputs() -> Result<()> {
        let x = (Tensor::randn(0f32, 3.0, (4, 5, 9), &Device::Cpu)? * 100.)?;
        let ours = softmax_last_dim(&x)?;
        let candle = candle_nn::ops::softmax(&x, D::Minus1)?;
        let diff = (ours - candle)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "max diff {diff}");
        Ok(())
    }

    #[test]
    fn backward_agrees_with_finite_differences() -> Result<()> {
        let x = Tensor::randn(0f64, 2.0, (3, 4, 6), &Device::Cpu)?;
        let w = Tensor::randn(0f64, 1.0, (3, 4, 6), &Device::Cpu)?;
        let check = check_gradient(&x, 1e-5, |x| (softmax_last_dim(x)? * &w)?.sum_all())?;
        assert!(check.max_rel_diff < 1e-8, "{check:?}");
        let check = check_gradient(&x, 1e-5, |x| {
            (attention_softmax(x, 0.25, None)? * &w)?.sum_all()
        })?;
        assert!(check.max_rel_diff < 1e-8, "scaled: {check:?}");
        Ok(())
    }

    #[test]
    fn attention_softmax_matches_scale_add_softmax_and_its_backward_checks() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 2.0, (2, 3, 4, 5), &dev)?;
        let bias = Tensor::new(&[[0f64, 0., -1e4, 0., 0.], [0., 0., 0., 0., -1e4]], &dev)?
            .reshape((2, 1, 1, 5))?;
        let fused = attention_softmax(&x, 0.3, Some(&bias))?;
        let composed = candle_nn::ops::softmax(&(&x * 0.3)?.broadcast_add(&bias)?, D::Minus1)?;
        let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "max diff {diff}");
        let w = Tensor::randn(0f64, 1.0, (2, 3, 4, 5), &dev)?;
        let check = check_gradient(&x, 1e-5, |x| {
            (attention_softmax(x, 0.3, Some(&bias))? * &w)?.sum_all()
        })?;
        assert!(check.max_rel_diff < 1e-8, "{check:?}");
        Ok(())
    }

    #[test]
    fn backward_of_a_transposed_input_is_correct() -> Result<()> {
        // The op makes its input contiguous; the gradient must flow back through that copy.
        let x = Tensor::randn(0f64, 1.0, (5, 4), &Device::Cpu)?;
        let w = Tensor::randn(0f64, 1.0, (4, 5), &Device::Cpu)?;
        let check = check_gradient(&x, 1e-5, |x| (softmax_last_dim(&x.t()?)? * &w)?.sum_all())?;
        assert!(check.max_rel_diff < 1e-8, "{check:?}");
        Ok(())
    }
}
