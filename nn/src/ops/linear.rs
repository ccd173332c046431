//! `x · Wᵀ + b` (PyTorch's `nn.Linear`) as one op with a hand-written backward.
//!
//! Composed from candle ops a linear layer is four graph nodes (transpose, product,
//! bias broadcast, add); candle's backward allocates a zeroed full-size gradient and adds
//! into it for each, and sums the bias gradient in a separate pass. Here the forward
//! writes the bias rows and accumulates the product onto them, and the backward makes
//! `dx = dy · W`, `dW = dyᵀ · x` and `db = Σ dy` straight from the buffers.
//!
//! The forward runs one block of rows per thread: the bias rows, the product onto them
//! and, for [`linear_gelu`] in inference, the activation, with no synchronisation between
//! the three.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::float::{Real, add_partials, dispatch_real, output_buffer, rows_per_task};
use super::gelu::{gelu_erf, gelu_in_place};
use super::matmul::{Matrix, matmul, matmul_threaded};

/// `x · weightᵀ + bias` over the last dimension of `x`; `weight` is (out, in) and `bias`
/// (out). Differentiable in all three. Fused f32/f64 kernels on CPU, candle ops elsewhere.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    linear_with(x, weight, bias, Linear { gelu: false })
}

/// `gelu_erf(linear(x, weight, bias))`; in inference (no input needs a gradient) the
/// activation is fused into the product's output blocks.
pub fn linear_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if x.track_op() || weight.track_op() || bias.track_op() {
        // Training: the activation's backward needs the pre-activation tensor.
        return gelu_erf(&linear(x, weight, bias)?);
    }
    linear_with(x, weight, bias, Linear { gelu: true })
}

fn linear_with(x: &Tensor, weight: &Tensor, bias: &Tensor, op: Linear) -> Result<Tensor> {
    let (out_features, in_features) = weight.dims2()?;
    if x.dims().last() != Some(&in_features) || bias.dims() != [out_features] {
        bail!(
            "linear: input {:?}, weight {:?} and bias {:?} do not fit (x: (.., in), weight: \
             (out, in), bias: (out))",
            x.dims(),
            weight.dims(),
            bias.dims()
        )
    }
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("checked above") = out_features;
    let rows = x.elem_count() / in_features.max(1);
    let x2 = x.reshape((rows, in_features))?;
    let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    let y = if fused {
        let (x2, weight, bias) = (x2.contiguous()?, weight.contiguous()?, bias.contiguous()?);
        if op.gelu {
            // No backward: `linear_gelu` takes this path only when nothing needs one.
            x2.apply_op3_no_bwd(&weight, &bias, &op)?
        } else {
            x2.apply_op3(&weight, &bias, op)?
        }
    } else {
        let y = x2.matmul(&weight.t()?)?.broadcast_add(bias)?;
        if op.gelu { gelu_erf(&y)? } else { y }
    };
    y.reshape(out_dims)
}

/// Rows, input and output features of one call.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    rows: usize,
    inputs: usize,
    outputs: usize,
}

impl Geometry {
    fn new(x: &Layout, weight: &Layout) -> Result<Self> {
        let (rows, inputs) = x.shape().dims2()?;
        let (outputs, w_inputs) = weight.shape().dims2()?;
        if w_inputs != inputs {
            bail!("linear: input has {inputs} features, the weight expects {w_inputs}")
        }
        Ok(Self {
            rows,
            inputs,
            outputs,
        })
    }
}

/// The forward op; `gelu` only without gradients (see [`linear_gelu`]).
#[derive(Clone, Copy)]
struct Linear {
    gelu: bool,
}

/// Below this many rows per thread, one product split across the threads is faster than
/// a product per thread.
const MIN_BLOCK_ROWS: usize = 32;

fn forward<T: Real>(x: &[T], weight: &[T], bias: &[T], g: Geometry, op: Linear) -> Vec<T> {
    let mut y = output_buffer(g.rows * g.outputs);
    let weight_t = || Matrix::transposed(weight, g.inputs);
    let finish = |block: &mut [T]| {
        if op.gelu {
            gelu_in_place(block)
        }
    };
    // One block of rows per thread: smaller blocks would stay in cache for the bias and
    // the activation, but OpenBLAS runs below its speed on fewer rows (measured on
    // MiniLM: 85-row blocks 18% slower than halves).
    let block_rows = g.rows.div_ceil(rayon::current_num_threads());
    if block_rows < MIN_BLOCK_ROWS {
        // Too few rows for a block per thread: one product split across the threads.
        fill_bias(&mut y, bias);
        let shape = (g.rows, g.outputs, g.inputs);
        matmul_threaded(
            &mut y,
            shape,
            Matrix::row_major(x, g.inputs),
            weight_t(),
            true,
        );
        y.par_chunks_mut(rows_per_task(g.outputs) * g.outputs)
            .for_each(finish);
        return y;
    }
    y.par_chunks_mut(block_rows * g.outputs)
        .zip(x.par_chunks(block_rows * g.inputs))
        .for_each(|(y, x)| {
            fill_bias(y, bias);
            let shape = (y.len() / g.outputs, g.outputs, g.inputs);
            matmul(y, shape, Matrix::row_major(x, g.inputs), weight_t(), true);
            finish(y);
        });
    y
}

fn fill_bias<T: Real>(y: &mut [T], bias: &[T]) {
    y.chunks_exact_mut(bias.len())
        .for_each(|row| row.copy_from_slice(bias));
}

/// `[dx | dW | db]`; `dx` stays zero unless `input_grad`.
fn backward<T: Real>(x: &[T], weight: &[T], dy: &[T], g: Geometry, input_grad: bool) -> Vec<T> {
    let (nx, nw) = (g.rows * g.inputs, g.outputs * g.inputs);
    // Every part is written below, except `dx` without `input_grad`, which nobody reads.
    let mut out = output_buffer(nx + nw + g.outputs);
    let (dx, rest) = out.split_at_mut(nx);
    let (dw, db) = rest.split_at_mut(nw);
    if input_grad {
        matmul_threaded(
            dx,
            (g.rows, g.inputs, g.outputs),
            Matrix::row_major(dy, g.outputs),
            Matrix::row_major(weight, g.inputs),
            false,
        );
    }
    matmul_threaded(
        dw,
        (g.outputs, g.inputs, g.rows),
        Matrix::transposed(dy, g.outputs),
        Matrix::row_major(x, g.inputs),
        false,
    );
    // Column sums: each task sums its rows into its own buffer, added at the end.
    let sums = dy
        .par_chunks(rows_per_task(g.outputs) * g.outputs)
        .fold(
            || vec![T::zero(); g.outputs],
            |mut acc, rows| {
                for row in rows.chunks_exact(g.outputs) {
                    acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
                }
                acc
            },
        )
        .reduce(|| vec![T::zero(); g.outputs], add_partials);
    db.copy_from_slice(&sums);
    out
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(x_l, w_l)?;
        let y = dispatch_real!(x, self.name(), |T| T::storage(forward(
            T::elements(x, x_l, self.name())?,
            T::elements(w, w_l, self.name())?,
            T::elements(b, b_l, self.name())?,
            g,
            *self
        )));
        Ok((y, Shape::from((g.rows, g.outputs))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let input_grad = x.track_op();
        let packed =
            x.apply_op3_no_bwd(weight, &dy.contiguous()?, &LinearBackward { input_grad })?;
        let (nx, nw) = (x.elem_count(), weight.elem_count());
        let dx = packed.narrow(0, 0, nx)?.reshape(x.shape())?;
        let dw = packed.narrow(0, nx, nw)?.reshape(weight.shape())?;
        let db = packed.narrow(0, nx + nw, weight.dim(0)?)?;
        Ok((input_grad.then_some(dx), Some(dw), Some(db)))
    }
}

/// `(x, weight, dy) -> [dx | dW | db]` for [`Linear`].
struct LinearBackward {
    input_grad: bool,
}

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "linear-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_l: &Layout,
        w: &CpuStorage,
        w_l: &Layout,
        dy: &CpuStorage,
        dy_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(x_l, w_l)?;
        if dy_l.shape().dims() != [g.rows, g.outputs] {
            bail!(
                "linear-backward: gradient shape {:?} does not match the output",
                dy_l.shape()
            )
        }
        let out = dispatch_real!(x, self.name(), |T| T::storage(backward(
            T::elements(x, x_l, self.name())?,
            T::elements(w, w_l, self.name())?,
            T::elements(dy, dy_l, self.name())?,
            g,
            self.input_grad
        )));
        let len = g.rows * g.inputs + g.outputs * g.inputs + g.outputs;
        Ok((out, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_gradient;
    use candle_core::Device;

    fn randn(dims: &[usize]) -> Result<Tensor> {
        Tensor::randn(0f64, 1., dims, &Device::Cpu)
    }

    #[test]
    fn matches_candle_and_keeps_leading_dimensions() -> Result<()> {
        let (x, w, b) = (randn(&[2, 3, 5])?, randn(&[4, 5])?, randn(&[4])?);
        let ours = linear(&x, &w, &b)?;
        assert_eq!(ours.dims(), [2, 3, 4]);
        let reference = x.broadcast_matmul(&w.t()?)?.broadcast_add(&b)?;
        let diff = (ours - reference)?.abs()?.max_all()?.to_scalar::<f64>()?;
        assert!(diff < 1e-12, "max difference {diff}");
        Ok(())
    }

    #[test]
    fn backward_agrees_with_finite_differences() -> Result<()> {
        let (x, w, b) = (randn(&[7, 5])?, randn(&[3, 5])?, randn(&[3])?);
        let probe = randn(&[7, 3])?;
        let loss = |x: &Tensor, w: &Tensor, b: &Tensor| (linear(x, w, b)? * &probe)?.sum_all();
        for check in [
            check_gradient(&x, 1e-6, |x| loss(x, &w, &b))?,
            check_gradient(&w, 1e-6, |w| loss(&x, w, &b))?,
            check_gradient(&b, 1e-6, |b| loss(&x, &w, b))?,
        ] {
            assert!(check.max_rel_diff < 1e-7, "{check:?}");
        }
        Ok(())
    }

    /// Both forward paths (a block of rows per thread, and one product split across
    /// threads for few rows), with and without the fused activation, in f32 and f64.
    #[test]
    fn fused_gelu_and_row_blocks_match_the_composed_ops() -> Result<()> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for rows in [5, 200] {
            for dtype in [DType::F32, DType::F64] {
                let (x, w, b) = (randn(&[rows, 48])?, randn(&[96, 48])?, randn(&[96])?);
                let (x, w, b) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?, b.to_dtype(dtype)?);
                let reference = x.matmul(&w.t()?)?.broadcast_add(&b)?;
                let (plain, fused) = pool.install(|| {
                    Ok::<_, candle_core::Error>((linear(&x, &w, &b)?, linear_gelu(&x, &w, &b)?))
                })?;
                for (ours, want) in [(plain, reference.clone()), (fused, reference.gelu_erf()?)] {
                    let diff = (ours - want)?.abs()?.max_all()?.to_dtype(DType::F64)?;
                    assert!(
                        diff.to_scalar::<f64>()? < 1e-4,
                        "{rows} rows {dtype:?}: {diff}"
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn rejects_mismatched_shapes() -> Result<()> {
        let err = linear(&randn(&[2, 5])?, &randn(&[3, 4])?, &randn(&[3])?)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not fit"), "{err}");
        Ok(())
    }
}
