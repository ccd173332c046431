//! `relu(a + b)`, the end of every residual block, as one op: candle would run an add,
//! a ReLU, and four ops for the ReLU's backward, each allocating a tensor.

use candle_core::{CpuStorage, CustomOp2, Device, Layout, Result, Shape, Tensor, bail};
use num_traits::Float;
use rayon::prelude::*;

use super::float::{Real, dispatch_real, output_buffer};

/// Elements per parallel task.
const CHUNK: usize = 16 * 1024;

/// `relu(a + b)` for tensors of one shape; differentiable in both.
pub fn add_relu(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.shape() != b.shape() {
        bail!(
            "add_relu: shapes {:?} and {:?} differ",
            a.shape(),
            b.shape()
        );
    }
    match a.device() {
        Device::Cpu => a.contiguous()?.apply_op2(&b.contiguous()?, AddRelu),
        _ => (a + b)?.relu(),
    }
}

/// Applies `f(out, a, b)` elementwise, in parallel.
fn zip_map<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut out = output_buffer(a.len());
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(out, (a, b))| {
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = f(a, b);
            }
        });
    out
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "add_relu"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        a_l: &Layout,
        b: &CpuStorage,
        b_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = dispatch_real!(a, name, |T| T::storage(zip_map(
            T::elements(a, a_l, name)?,
            T::elements(b, b_l, name)?,
            add_then_relu
        )));
        Ok((out, a_l.shape().clone()))
    }

    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = res.apply_op2_no_bwd(&grad_res.contiguous()?, &ReluMask)?;
        Ok((Some(grad.clone()), Some(grad)))
    }
}

/// `(y, dy) -> dy where y > 0, else 0`: the ReLU backward from its output.
struct ReluMask;

impl CustomOp2 for ReluMask {
    fn name(&self) -> &'static str {
        "relu_mask"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        y_l: &Layout,
        dy: &CpuStorage,
        dy_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let name = self.name();
        let out = dispatch_real!(y, name, |T| T::storage(zip_map(
            T::elements(y, y_l, name)?,
            T::elements(dy, dy_l, name)?,
            mask_by_output
        )));
        Ok((out, y_l.shape().clone()))
    }
}

fn add_then_relu<T: Real>(a: T, b: T) -> T {
    Float::max(a + b, T::zero())
}

fn mask_by_output<T: Real>(y: T, dy: T) -> T {
    if y > T::zero() { dy } else { T::zero() }
}
