//! GELU (the exact, erf form BERT uses) as one fused op with a hand-written backward.
//!
//! candle's `gelu_erf` backward runs nine tensor ops over the largest activation of a
//! BERT layer (the intermediate, 4x hidden); this backward is one pass.

use super::float::{Real, dispatch_real, widest_vectors, zip_chunks};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// `x * Phi(x)` with the standard normal CDF `Phi`, differentiable. Fused f32/f64 kernels
/// on CPU, candle's `gelu_erf` elsewhere.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.gelu_erf();
    }
    x.contiguous()?.apply_op1(Gelu)
}

#[inline(always)]
fn cdf<T: Real>(x: T) -> T {
    T::lit(0.5) * (T::one() + (x * T::lit(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// `x <- x * Phi(x)` in place: the activation a fused linear layer applies to its output
/// block while the block is still in cache.
#[inline]
pub(crate) fn gelu_in_place<T: Real>(x: &mut [T]) {
    widest_vectors(|| x.iter_mut().for_each(|x| *x = *x * cdf(*x)));
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let y = dispatch_real!(x, op, |T| {
            let x = T::elements(x, layout, op)?;
            T::storage(zip_chunks(x, x, |y, x, _| {
                widest_vectors(|| y.iter_mut().zip(x).for_each(|(y, &x)| *y = x * cdf(x)))
            })?)
        });
        Ok((y, layout.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluGrad)?))
    }
}

/// dx = dy * (Phi(x) + x * phi(x)), phi the standard normal density.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "gelu-erf-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let inv_sqrt_2pi = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
        let dx = dispatch_real!(x, op, |T| {
            let x = T::elements(x, lx, op)?;
            let dy = T::elements(dy, ldy, op)?;
            let (half, k) = (T::lit(-0.5), T::lit(inv_sqrt_2pi));
            T::storage(zip_chunks(x, dy, |dx, x, dy| {
                widest_vectors(|| {
                    for ((dx, &x), &g) in dx.iter_mut().zip(x).zip(dy) {
                        *dx = g * (cdf(x) + x * k * (half * x * x).fast_exp());
                    }
                })
            })?)
        });
        Ok((dx, lx.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_gradient;
    use candle_core::{DType, Device};

    #[test]
    fn forward_matches_candle() -> Result<()> {
        let x = Tensor::randn(0f32, 3.0, (3, 4097), &Device::Cpu)?;
        let diff = (gelu_erf(&x)? - x.gelu_erf()?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "max diff {diff}");
        Ok(())
    }

    #[test]
    fn backward_agrees_with_finite_differences() -> Result<()> {
        let x = Tensor::randn(0f64, 2.0, (5, 7), &Device::Cpu)?;
        let w = Tensor::randn(0f64, 1.0, (5, 7), &Device::Cpu)?;
        let check = check_gradient(&x, 1e-5, |x| (gelu_erf(x)? * &w)?.sum_all())?;
        assert!(check.max_rel_diff < 1e-8, "{check:?}");
        Ok(())
    }

    #[test]
    fn backward_matches_candle_on_a_large_input() -> Result<()> {
        let x = candle_core::Var::randn(0f32, 2.0, (3, 8192), &Device::Cpu)?;
        let ours = gelu_erf(&x)?.sum_all()?.backward()?;
        let ours = ours.get(&x).unwrap().clone();
        let theirs = x.gelu_erf()?.sum_all()?.backward()?;
        let diff = (ours - theirs.get(&x).unwrap())?
            .abs()?
            .max_all()?
            .to_dtype(DType::F64)?;
        assert!(diff.to_scalar::<f64>()? < 1e-5, "{diff}");
        Ok(())
    }
}
