//! LayerNorm over the last dimension as one fused op with a hand-written backward.
//!
//! candle's fused `LayerNorm` has no backward (the gradient silently stops there); the
//! composed `layer_norm_slow` trains but runs a dozen tensor ops per call. Here the forward
//! is one pass over each row and the backward one pass that yields dx, dgamma and dbeta.

use super::float::{
    Real, add_partials, dispatch_real, last_dim, output_buffer, rows_per_task, sum_map, sum_zip,
};
use candle_core::{CpuStorage, CustomOp3, D, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// `(x - mean) / sqrt(var + eps) * gamma + beta` over the last dimension of `x`.
///
/// Differentiable in `x`, `gamma` and `beta`. On CPU this is a fused f32/f64 kernel;
/// on other devices it falls back to composed (differentiable) tensor ops.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    for (name, p) in [("gamma", gamma), ("beta", beta)] {
        if p.dims() != [d] {
            bail!(
                "layer_norm: {name} has shape {:?}, expected [{d}] (the last dimension of x {:?})",
                p.dims(),
                x.dims()
            )
        }
    }
    if !x.device().is_cpu() {
        return composed_layer_norm(x, gamma, beta, eps);
    }
    x.contiguous()?.apply_op3(gamma, beta, LayerNorm { eps })
}

fn composed_layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(gamma)?
        .broadcast_add(beta)
}

struct LayerNorm {
    eps: f64,
}

/// The mean and 1/std of one row.
fn row_stats<T: Real>(row: &[T], eps: f64) -> (T, T) {
    let n = T::lit(row.len() as f64);
    let mean = sum_map(row, |v| v) / n;
    let var = sum_map(row, |v| (v - mean) * (v - mean)) / n;
    (mean, (var + T::lit(eps)).sqrt().recip())
}

/// One row of the forward: `y = (x - mean) * rstd * gamma + beta`.
pub(super) fn forward_row<T: Real>(x: &[T], gamma: &[T], beta: &[T], eps: f64, y: &mut [T]) {
    let (mean, rstd) = row_stats(x, eps);
    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(gamma).zip(beta) {
        *y = (x - mean) * rstd * g + b;
    }
}

fn forward<T: Real>(x: &[T], gamma: &[T], beta: &[T], eps: f64) -> Vec<T> {
    super::float::map_rows(x, gamma.len(), |y, x| forward_row(x, gamma, beta, eps, y))
}

/// One row of the backward: writes `dx`, adds into `dgamma` and `dbeta`.
pub(super) fn backward_row<T: Real>(
    x: &[T],
    dy: &[T],
    gamma: &[T],
    eps: f64,
    dx: &mut [T],
    (dgamma, dbeta): (&mut [T], &mut [T]),
) {
    let d = gamma.len();
    let n = T::lit(d as f64);
    let (mean, rstd) = row_stats(x, eps);
    // With xhat = (x - mean) * rstd and g = dy * gamma:
    // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)).
    for i in 0..d {
        let xhat = (x[i] - mean) * rstd;
        dgamma[i] += dy[i] * xhat;
        dbeta[i] += dy[i];
        // g = dy * gamma, kept in dx until dx is known.
        dx[i] = dy[i] * gamma[i];
    }
    let mean_g = sum_map(dx, |g| g) / n;
    let mean_gx = sum_zip(dx, x, |g, x| g * (x - mean)) * rstd / n;
    for i in 0..d {
        let xhat = (x[i] - mean) * rstd;
        dx[i] = rstd * (dx[i] - mean_g - xhat * mean_gx);
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        gamma: &CpuStorage,
        lg: &Layout,
        beta: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        last_dim(lx, op)?;
        let y = dispatch_real!(x, op, |T| {
            let x = T::elements(x, lx, op)?;
            let gamma = T::elements(gamma, lg, op)?;
            let beta = T::elements(beta, lb, op)?;
            T::storage(forward(x, gamma, beta, self.eps))
        });
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = gamma.dim(0)?;
        let rows = x.elem_count() / d;
        let packed =
            x.apply_op3_no_bwd(gamma, &dy.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dgamma = packed.narrow(0, rows, 1)?.reshape(d)?;
        let dbeta = packed.narrow(0, rows + 1, 1)?.reshape(d)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The backward kernel. A custom op yields one tensor, so it returns `rows + 2` rows:
/// dx for every input row, then dgamma, then dbeta.
struct LayerNormGrad {
    eps: f64,
}

fn backward<T: Real>(x: &[T], gamma: &[T], dy: &[T], eps: f64) -> Vec<T> {
    let d = gamma.len();
    let mut out = output_buffer(x.len() + 2 * d);
    let (dx, param_grads) = out.split_at_mut(x.len());
    let chunk = rows_per_task(d) * d;
    // Each task sums dgamma/dbeta over its rows into its own buffer; the buffers are
    // added at the end, so no task waits on another.
    let partial = dx
        .par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk).zip(dy.par_chunks(chunk)))
        .fold(
            || vec![T::zero(); 2 * d],
            |mut acc, (dx, (x, dy))| {
                let params = acc.split_at_mut(d);
                for ((dx, x), dy) in dx
                    .chunks_exact_mut(d)
                    .zip(x.chunks_exact(d))
                    .zip(dy.chunks_exact(d))
                {
                    backward_row(x, dy, gamma, eps, dx, (&mut *params.0, &mut *params.1));
                }
                acc
            },
        )
        .reduce(|| vec![T::zero(); 2 * d], add_partials);
    param_grads.copy_from_slice(&partial);
    out
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        gamma: &CpuStorage,
        lg: &Layout,
        dy: &CpuStorage,
        ldy: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let d = last_dim(lx, op)?;
        let rows = lx.shape().elem_count() / d;
        let out = dispatch_real!(x, op, |T| {
            let x = T::elements(x, lx, op)?;
            let gamma = T::elements(gamma, lg, op)?;
            let dy = T::elements(dy, ldy, op)?;
            if dy.len() != x.len() {
                bail!(
                    "{op}: gradient has {} elements, input {}",
                    dy.len(),
                    x.len()
                )
            }
            T::storage(backward(x, gamma, dy, self.eps))
        });
        Ok((out, Shape::from((rows + 2, d))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_gradient;
    use candle_core::{DType, Device};

    fn inputs() -> Result<(Tensor, Tensor, Tensor)> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0.5f64, 2.0, (2, 3, 7), &dev)?;
        let gamma = Tensor::randn(1f64, 0.3, 7, &dev)?;
        let beta = Tensor::randn(0f64, 0.3, 7, &dev)?;
        Ok((x, gamma, beta))
    }

    /// A loss that weights every output differently, so no gradient cancels by symmetry.
    fn weighted_sum(y: &Tensor) -> Result<Tensor> {
        let w = Tensor::arange(0f64, y.elem_count() as f64, y.device())?
            .reshape(y.shape())?
            .sin()?;
        (y * w)?.sum_all()
    }

    #[test]
    fn forward_matches_the_composed_definition() -> Result<()> {
        let (x, gamma, beta) = inputs()?;
        let x = x.to_dtype(DType::F32)?;
        let (gamma, beta) = (gamma.to_dtype(DType::F32)?, beta.to_dtype(DType::F32)?);
        let fused = layer_norm(&x, &gamma, &beta, 1e-5)?;
        let composed = composed_layer_norm(&x, &gamma, &beta, 1e-5)?;
        let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "max diff {diff}");
        Ok(())
    }

    #[test]
    fn backward_agrees_with_finite_differences_for_every_input() -> Result<()> {
        let (x, gamma, beta) = inputs()?;
        let dx = check_gradient(&x, 1e-5, |x| {
            weighted_sum(&layer_norm(x, &gamma, &beta, 1e-5)?)
        })?;
        let dgamma = check_gradient(&gamma, 1e-5, |g| {
            weighted_sum(&layer_norm(&x, g, &beta, 1e-5)?)
        })?;
        let dbeta = check_gradient(&beta, 1e-5, |b| {
            weighted_sum(&layer_norm(&x, &gamma, b, 1e-5)?)
        })?;
        for (name, check) in [("x", dx), ("gamma", dgamma), ("beta", dbeta)] {
            assert!(check.max_rel_diff < 1e-7, "d loss / d {name}: {check:?}");
        }
        Ok(())
    }

    #[test]
    fn backward_accumulates_parameter_gradients_across_many_parallel_tasks() -> Result<()> {
        // Enough rows that the rows are split over several rayon tasks.
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 1.0, (300, 64), &dev)?;
        let gamma = Tensor::randn(1f64, 0.3, 64, &dev)?;
        let beta = Tensor::zeros(64, DType::F64, &dev)?;
        let fused = candle_core::Var::from_tensor(&gamma)?;
        let composed = candle_core::Var::from_tensor(&gamma)?;
        let g1 = weighted_sum(&layer_norm(&x, &fused, &beta, 1e-5)?)?.backward()?;
        let g2 = weighted_sum(&composed_layer_norm(&x, &composed, &beta, 1e-5)?)?.backward()?;
        let diff = (g1.get(&fused).unwrap() - g2.get(&composed).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f64>()?;
        assert!(diff < 1e-9, "dgamma differs from the composed op by {diff}");
        Ok(())
    }

    #[test]
    fn rejects_parameters_that_do_not_fit_the_last_dimension() -> Result<()> {
        let (x, _, beta) = inputs()?;
        let gamma = Tensor::ones(6, DType::F64, &Device::Cpu)?;
        let err = layer_norm(&x, &gamma, &beta, 1e-5).unwrap_err().to_string();
        assert!(err.contains("gamma has shape [6], expected [7]"), "{err}");
        Ok(())
    }
}
