//! `LayerNorm(dropout(x) + residual)`, the tail of both halves of a BERT layer, as one op.
//!
//! As three ops (dropout, add, LayerNorm) the forward writes two extra full-size tensors,
//! and candle's backward allocates, zeroes and adds a full-size gradient for each of the
//! three nodes. Here the sum is formed row by row in the output buffer and normalised in
//! place; the backward forms it again (in the buffer of the `x` gradient) instead of
//! keeping it. The dropout mask is [`DropMask`]'s hash of the element's index in `x`, so
//! this op drops exactly what `dropout(x)` would with the same seed.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::dropout::{DropMask, dropout};
use super::float::{Real, add_partials, dispatch_real, last_dim, output_buffer, rows_per_task};
use super::layer_norm::{backward_row, forward_row, layer_norm};

/// `layer_norm(dropout(x, p) + residual, gamma, beta, eps)` over the last dimension, with
/// `p` = 0 when not training. Differentiable in `x`, `residual`, `gamma` and `beta`. Fused
/// f32/f64 kernel on CPU, the three ops elsewhere.
pub fn residual_layer_norm(
    x: &Tensor,
    residual: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    dropout_p: f64,
) -> Result<Tensor> {
    if x.dims() != residual.dims() {
        bail!(
            "residual_layer_norm: input {:?} and residual {:?} differ in shape",
            x.dims(),
            residual.dims()
        )
    }
    if !(0.0..1.0).contains(&dropout_p) {
        bail!("residual_layer_norm: dropout probability must be in [0, 1), got {dropout_p}")
    }
    let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    let d = x.dim(candle_core::D::Minus1)?;
    if !fused || gamma.dims() != [d] || beta.dims() != [d] {
        // layer_norm names a gamma/beta that does not fit.
        let dropped = if dropout_p > 0.0 {
            dropout(x, dropout_p)?
        } else {
            x.clone()
        };
        return layer_norm(&(dropped + residual)?, gamma, beta, eps);
    }
    let params = Tensor::cat(&[gamma, beta], 0)?;
    let op = ResidualNorm {
        eps,
        dropout: (dropout_p > 0.0).then(|| DropMask::next(dropout_p)),
    };
    x.contiguous()?
        .apply_op3(&residual.contiguous()?, &params.contiguous()?, op)
}

#[derive(Clone, Copy)]
struct ResidualNorm {
    eps: f64,
    dropout: Option<DropMask>,
}

impl ResidualNorm {
    fn check_indexable(&self, len: usize) -> Result<()> {
        if self.dropout.is_some() && len > u32::MAX as usize {
            bail!("residual_layer_norm: {len} elements exceed the 2^32 the dropout mask indexes")
        }
        Ok(())
    }

    /// `z = dropout(x) + residual` for one row starting at element `start` of `x`.
    fn sum_row<T: Real>(&self, x: &[T], residual: &[T], start: usize, z: &mut [T]) {
        match self.dropout {
            None => {
                for ((z, &x), &r) in z.iter_mut().zip(x).zip(residual) {
                    *z = x + r;
                }
            }
            Some(mask) => {
                let scale = mask.scale();
                for (i, ((z, &x), &r)) in z.iter_mut().zip(x).zip(residual).enumerate() {
                    *z = mask.dropped((start + i) as u32, x, scale) + r;
                }
            }
        }
    }

    /// The dropout of `dz` (the gradient of the sum) for the row at `start`, into `dx`.
    fn drop_row<T: Real>(&self, dz: &[T], start: usize, dx: &mut [T]) {
        match self.dropout {
            None => dx.copy_from_slice(dz),
            Some(mask) => {
                let scale = mask.scale();
                for (i, (dx, &dz)) in dx.iter_mut().zip(dz).enumerate() {
                    *dx = mask.dropped((start + i) as u32, dz, scale);
                }
            }
        }
    }

    fn forward<T: Real>(&self, x: &[T], residual: &[T], params: &[T]) -> Vec<T> {
        let d = params.len() / 2;
        let (gamma, beta) = params.split_at(d);
        let chunk = rows_per_task(d) * d;
        let mut y = output_buffer(x.len());
        y.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk).zip(residual.par_chunks(chunk)))
            .enumerate()
            .for_each_init(
                || vec![T::zero(); d],
                |z, (c, (y, (x, r)))| {
                    let rows = y.chunks_exact_mut(d).zip(x.chunks_exact(d));
                    for (j, ((y, x), r)) in rows.zip(r.chunks_exact(d)).enumerate() {
                        self.sum_row(x, r, c * chunk + j * d, z);
                        forward_row(z, gamma, beta, self.eps, y);
                    }
                },
            );
        y
    }

    /// `[dx | d_residual | dgamma | dbeta]`.
    fn backward<T: Real>(&self, x: &[T], residual: &[T], gamma: &[T], dy: &[T]) -> Vec<T> {
        let (n, d) = (x.len(), gamma.len());
        let chunk = rows_per_task(d) * d;
        let mut out = output_buffer(2 * n + 2 * d);
        let (dx, rest) = out.split_at_mut(n);
        let (d_residual, param_grads) = rest.split_at_mut(n);
        let inputs = x
            .par_chunks(chunk)
            .zip(residual.par_chunks(chunk))
            .zip(dy.par_chunks(chunk));
        let partial = dx
            .par_chunks_mut(chunk)
            .zip(d_residual.par_chunks_mut(chunk))
            .zip(inputs)
            .enumerate()
            .fold(
                || vec![T::zero(); 2 * d],
                |mut acc, (c, ((dx, dr), ((x, r), dy)))| {
                    let params = acc.split_at_mut(d);
                    let rows = dx.chunks_exact_mut(d).zip(dr.chunks_exact_mut(d));
                    let inputs = x.chunks_exact(d).zip(r.chunks_exact(d));
                    for (j, ((dx, dr), ((x, r), dy))) in
                        rows.zip(inputs.zip(dy.chunks_exact(d))).enumerate()
                    {
                        let start = c * chunk + j * d;
                        // The sum lives in `dx` until its gradient (= d_residual) is known.
                        self.sum_row(x, r, start, dx);
                        backward_row(
                            dx,
                            dy,
                            gamma,
                            self.eps,
                            dr,
                            (&mut *params.0, &mut *params.1),
                        );
                        self.drop_row(dr, start, dx);
                    }
                    acc
                },
            )
            .reduce(|| vec![T::zero(); 2 * d], add_partials);
        param_grads.copy_from_slice(&partial);
        out
    }
}

impl CustomOp3 for ResidualNorm {
    fn name(&self) -> &'static str {
        "residual-layer-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        r: &CpuStorage,
        r_l: &Layout,
        p: &CpuStorage,
        p_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        last_dim(x_l, op)?;
        self.check_indexable(x_l.shape().elem_count())?;
        let y = dispatch_real!(x, op, |T| T::storage(self.forward(
            T::elements(x, x_l, op)?,
            T::elements(r, r_l, op)?,
            T::elements(p, p_l, op)?
        )));
        Ok((y, x_l.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        residual: &Tensor,
        params: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = params.dim(0)? / 2;
        let gamma = params.narrow(0, 0, d)?;
        let packed = x.apply_op3_no_bwd(
            residual,
            &Tensor::cat(&[&gamma, &dy.flatten_all()?], 0)?,
            &ResidualNormGrad(*self),
        )?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let d_residual = packed.narrow(0, n, n)?.reshape(x.shape())?;
        let d_params = packed.narrow(0, 2 * n, 2 * d)?;
        Ok((Some(dx), Some(d_residual), Some(d_params)))
    }
}

/// `(x, residual, [gamma | dy]) -> [dx | d_residual | dgamma | dbeta]` for [`ResidualNorm`].
struct ResidualNormGrad(ResidualNorm);

impl CustomOp3 for ResidualNormGrad {
    fn name(&self) -> &'static str {
        "residual-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        r: &CpuStorage,
        r_l: &Layout,
        gamma_dy: &CpuStorage,
        gamma_dy_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let d = last_dim(x_l, op)?;
        let n = x_l.shape().elem_count();
        let out = dispatch_real!(x, op, |T| {
            let (gamma, dy) = T::elements(gamma_dy, gamma_dy_l, op)?.split_at(d);
            if dy.len() != n {
                bail!("{op}: gradient has {} elements, input {n}", dy.len())
            }
            T::storage(self.0.backward(
                T::elements(x, x_l, op)?,
                T::elements(r, r_l, op)?,
                gamma,
                dy,
            ))
        });
        Ok((out, Shape::from(2 * n + 2 * d)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_gradient;
    use crate::ops::dropout::seed_dropout;
    use candle_core::Device;

    fn randn(dims: &[usize]) -> Result<Tensor> {
        Tensor::randn(0f64, 1., dims, &Device::Cpu)
    }

    fn composed(x: &Tensor, r: &Tensor, g: &Tensor, b: &Tensor, p: f64) -> Result<Tensor> {
        let dropped = if p > 0.0 { dropout(x, p)? } else { x.clone() };
        layer_norm(&(dropped + r)?, g, b, 1e-5)
    }

    #[test]
    fn matches_dropout_add_layer_norm_with_the_same_seed() -> Result<()> {
        let (x, r) = (randn(&[3, 5, 7])?, randn(&[3, 5, 7])?);
        let (g, b) = (randn(&[7])?, randn(&[7])?);
        for p in [0.0, 0.4] {
            seed_dropout(3);
            let fused = residual_layer_norm(&x, &r, &g, &b, 1e-5, p)?;
            seed_dropout(3);
            let reference = composed(&x, &r, &g, &b, p)?;
            let diff = (fused - reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
            assert!(diff < 1e-12, "dropout {p}: max difference {diff}");
        }
        Ok(())
    }

    #[test]
    fn backward_agrees_with_finite_differences() -> Result<()> {
        let (x, r) = (randn(&[4, 9])?, randn(&[4, 9])?);
        let (g, b) = (randn(&[9])?, randn(&[9])?);
        let probe = randn(&[4, 9])?;
        for p in [0.0, 0.3] {
            let loss = |x: &Tensor, r: &Tensor, g: &Tensor, b: &Tensor| {
                seed_dropout(17);
                (residual_layer_norm(x, r, g, b, 1e-5, p)? * &probe)?.sum_all()
            };
            for check in [
                check_gradient(&x, 1e-5, |x| loss(x, &r, &g, &b))?,
                check_gradient(&r, 1e-5, |r| loss(&x, r, &g, &b))?,
                check_gradient(&g, 1e-5, |g| loss(&x, &r, g, &b))?,
                check_gradient(&b, 1e-5, |b| loss(&x, &r, &g, b))?,
            ] {
                assert!(check.max_rel_diff < 1e-6, "dropout {p}: {check:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_mismatched_shapes() -> Result<()> {
        let (x, g) = (randn(&[2, 4])?, randn(&[4])?);
        let err = residual_layer_norm(&x, &randn(&[2, 5])?, &g, &g, 1e-5, 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("differ in shape"), "{err}");
        let err = residual_layer_norm(&x, &x, &randn(&[3])?, &g, 1e-5, 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gamma"), "{err}");
        Ok(())
    }
}
