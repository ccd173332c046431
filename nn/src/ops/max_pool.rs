//! 2-D max-pooling with any kernel, stride and padding, with a backward pass.
//!
//! candle's own `max_pool2d` has a backward only when kernel == stride, so the ResNet
//! stem (3x3, stride 2, padding 1) cannot train with it. The backward here routes each
//! output gradient to the input element that won its window (the first maximum in
//! row-major order, as PyTorch does), found again from the input instead of being stored.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::float::{Real, dispatch_real, output_buffer};

/// Window geometry of a square max-pool over NCHW input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl MaxPool2d {
    /// Checks the geometry the way PyTorch does: padding at most half the kernel, so
    /// every window holds at least one real input element.
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Result<Self> {
        if kernel == 0 || stride == 0 {
            bail!("max_pool2d: kernel ({kernel}) and stride ({stride}) must be positive");
        }
        if 2 * padding > kernel {
            bail!("max_pool2d: padding {padding} must be at most half the kernel {kernel}");
        }
        Ok(Self {
            kernel,
            stride,
            padding,
        })
    }

    /// Pools an NCHW tensor; differentiable with respect to `x`. Fused f32/f64 kernel on
    /// CPU, candle ops elsewhere.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let fused = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
        if fused {
            x.contiguous()?.apply_op1(*self)
        } else {
            self.composed(x)
        }
    }

    /// The same pooling from candle ops that have GPU kernels and backward passes: pad
    /// with -inf, gather each kernel tap's strided view with `index_select`, take the
    /// elementwise maximum. Where taps tie, candle's maximum splits the gradient between
    /// them instead of giving it to the first; after a ReLU (ResNet's stem) the tied values
    /// are zeros whose gradient the ReLU drops anyway.
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (out_h, out_w) = (self.output_size(h)?, self.output_size(w)?);
        let pad = |t: Tensor, dim: usize| -> Result<Tensor> {
            if self.padding == 0 {
                return Ok(t);
            }
            let mut dims = t.dims().to_vec();
            dims[dim] = self.padding;
            let edge = Tensor::full(f32::NEG_INFINITY, dims, t.device())?.to_dtype(t.dtype())?;
            Tensor::cat(&[&edge, &t, &edge], dim)
        };
        let padded = pad(pad(x.clone(), 2)?, 3)?;
        let taps = |offset: usize, count: usize| -> Result<Tensor> {
            let index: Vec<u32> = (0..count)
                .map(|o| (offset + o * self.stride) as u32)
                .collect();
            Tensor::new(index, x.device())
        };
        let mut pooled: Option<Tensor> = None;
        for ky in 0..self.kernel {
            let rows = padded.index_select(&taps(ky, out_h)?, 2)?;
            for kx in 0..self.kernel {
                let tap = rows.index_select(&taps(kx, out_w)?, 3)?;
                pooled = Some(match pooled {
                    Some(p) => p.maximum(&tap)?,
                    None => tap,
                });
            }
        }
        pooled.ok_or_else(|| candle_core::Error::Msg("max_pool2d: the kernel is empty".into()))
    }

    fn output_size(&self, input: usize) -> Result<usize> {
        let padded = input + 2 * self.padding;
        if padded < self.kernel {
            bail!(
                "max_pool2d: input size {input} with padding {} is smaller than the kernel {}",
                self.padding,
                self.kernel
            );
        }
        Ok((padded - self.kernel) / self.stride + 1)
    }

    fn planes(&self, layout: &Layout) -> Result<Planes> {
        let (n, c, h, w) = layout.shape().dims4()?;
        Ok(Planes {
            count: n * c,
            h,
            w,
            out_h: self.output_size(h)?,
            out_w: self.output_size(w)?,
            shape: (n, c),
        })
    }

    /// Index (within its plane) of the first maximum of the window at output `(oy, ox)`.
    /// NaN wins, so that it propagates like in PyTorch.
    fn argmax<T: Real>(&self, plane: &[T], p: &Planes, oy: usize, ox: usize) -> usize {
        let y0 = (oy * self.stride) as isize - self.padding as isize;
        let x0 = (ox * self.stride) as isize - self.padding as isize;
        let ys = y0.max(0) as usize..((y0 + self.kernel as isize) as usize).min(p.h);
        let xs = x0.max(0) as usize..((x0 + self.kernel as isize) as usize).min(p.w);
        let mut best = ys.start * p.w + xs.start;
        let mut best_value = plane[best];
        for y in ys {
            for x in xs.clone() {
                let i = y * p.w + x;
                let v = plane[i];
                // Which element wins depends on the data: a branch here is mispredicted
                // about half the time (perf: 7% of a ResNet-18 224² step), a select is not.
                let wins = v > best_value || (v.is_nan() && !best_value.is_nan());
                best = std::hint::select_unpredictable(wins, i, best);
                best_value = std::hint::select_unpredictable(wins, v, best_value);
            }
        }
        best
    }

    fn pool<T: Real>(&self, x: &[T], p: &Planes) -> Vec<T> {
        let mut out = output_buffer(p.count * p.out_h * p.out_w);
        out.par_chunks_mut(p.out_h * p.out_w)
            .zip(x.par_chunks(p.h * p.w))
            .for_each(|(pooled, plane)| {
                for oy in 0..p.out_h {
                    for ox in 0..p.out_w {
                        pooled[oy * p.out_w + ox] = plane[self.argmax(plane, p, oy, ox)];
                    }
                }
            });
        out
    }

    fn unpool<T: Real>(&self, x: &[T], grad_out: &[T], p: &Planes) -> Vec<T> {
        let mut grad_in = vec![T::zero(); x.len()];
        grad_in
            .par_chunks_mut(p.h * p.w)
            .zip(x.par_chunks(p.h * p.w))
            .zip(grad_out.par_chunks(p.out_h * p.out_w))
            .for_each(|((grad_plane, plane), grad_out_plane)| {
                for oy in 0..p.out_h {
                    for ox in 0..p.out_w {
                        grad_plane[self.argmax(plane, p, oy, ox)] +=
                            grad_out_plane[oy * p.out_w + ox];
                    }
                }
            });
        grad_in
    }
}

/// The NCHW input seen as `count` planes of `h x w`, pooled to `out_h x out_w`.
struct Planes {
    count: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
    shape: (usize, usize),
}

impl Planes {
    fn out_shape(&self) -> Shape {
        Shape::from((self.shape.0, self.shape.1, self.out_h, self.out_w))
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let p = self.planes(layout)?;
        let out = dispatch_real!(storage, self.name(), |T| T::storage(
            self.pool(T::elements(storage, layout, self.name())?, &p)
        ));
        Ok((out, p.out_shape()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let grad = x.apply_op2_no_bwd(&grad_res.contiguous()?, &MaxPool2dBackward(*self))?;
        Ok(Some(grad))
    }
}

/// `(input, output gradient) -> input gradient` for [`MaxPool2d`].
struct MaxPool2dBackward(MaxPool2d);

impl CustomOp2 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "max_pool2d_backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        grad: &CpuStorage,
        grad_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let pool = &self.0;
        let p = pool.planes(x_layout)?;
        if grad_layout.shape() != &p.out_shape() {
            bail!(
                "max_pool2d_backward: gradient shape {:?}, expected {:?}",
                grad_layout.shape(),
                p.out_shape()
            );
        }
        let name = self.name();
        let grad_in = dispatch_real!(x, name, |T| T::storage(pool.unpool(
            T::elements(x, x_layout, name)?,
            T::elements(grad, grad_layout, name)?,
            &p
        )));
        Ok((grad_in, x_layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The candle-ops path (what GPUs run) against the CPU kernel, values and gradients.
    #[test]
    fn composed_path_matches_the_kernel() -> Result<()> {
        for (kernel, stride, padding) in [(3, 2, 1), (2, 2, 0), (3, 1, 1)] {
            let pool = MaxPool2d::new(kernel, stride, padding)?;
            let x = Var::randn(0f64, 1., (2, 3, 7, 6), &Device::Cpu)?;
            let probe = |y: &Tensor| -> Result<Tensor> {
                let w = Tensor::arange(0f64, y.elem_count() as f64, y.device())?
                    .reshape(y.shape())?
                    .sin()?;
                (y * w)?.sum_all()
            };
            let fused = pool.forward(&x)?;
            let composed = pool.composed(&x)?;
            let grad = |y: &Tensor| -> Result<Tensor> {
                let mut grads = probe(y)?.backward()?;
                grads
                    .remove(x.as_tensor())
                    .ok_or_else(|| candle_core::Error::Msg("no gradient".into()))
            };
            let (gf, gc) = (grad(&fused)?, grad(&composed)?);
            let diff = |a: &Tensor, b: &Tensor| -> Result<f64> {
                (a - b)?.abs()?.max_all()?.to_scalar::<f64>()
            };
            assert_eq!(fused.dims(), composed.dims());
            assert!(
                diff(&fused, &composed)? < 1e-12,
                "{kernel}/{stride}/{padding}"
            );
            assert!(
                diff(&gf, &gc)? < 1e-12,
                "{kernel}/{stride}/{padding} gradient"
            );
        }
        Ok(())
    }
}
