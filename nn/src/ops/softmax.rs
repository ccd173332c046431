//! Softmax over the last dimension as one fused op with a hand-written backward.
//!
//! candle's `softmax_last_dim` has no backward and `ops::softmax` runs five tensor ops
//! (each with its own backward); attention scores are the largest tensors in BERT.

use super::float::{Real, dispatch_real, last_dim, map_row_pairs, map_rows};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Result, Shape, Tensor};

/// Softmax over the last dimension, differentiable. Fused f32/f64 kernels on CPU,
/// candle's composed softmax elsewhere.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return candle_nn::ops::softmax(x, D::Minus1);
    }
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

fn forward<T: Real>(x: &[T], d: usize) -> Vec<T> {
    map_rows(x, d, |y, x| {
        let max = x.iter().fold(T::neg_infinity(), |m, &v| num_traits::Float::max(m, v));
        let mut sum = T::zero();
        for (y, &x) in y.iter_mut().zip(x) {
            *y = (x - max).exp();
            sum = sum + *y;
        }
        let inv = sum.recip();
        y.iter_mut().for_each(|y| *y = *y * inv);
    })
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let d = last_dim(layout, op)?;
        let y = dispatch_real!(x, op, |T| {
            T::storage(forward(T::elements(x, layout, op)?, d))
        });
        Ok((y, layout.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&dy.contiguous()?, &SoftmaxGrad)?))
    }
}

/// dx = y * (dy - sum(dy * y)) per row, from the forward's output `y`.
struct SoftmaxGrad;

fn backward<T: Real>(y: &[T], dy: &[T], d: usize) -> Result<Vec<T>> {
    map_row_pairs(y, dy, d, |dx, y, dy| {
        let dot = y.iter().zip(dy).fold(T::zero(), |s, (&y, &g)| s + y * g);
        for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(dy) {
            *dx = y * (g - dot);
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
            T::storage(backward(T::elements(y, ly, op)?, T::elements(dy, ldy, op)?, d)?)
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
