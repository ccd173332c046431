//! Training-mode batch normalisation over NCHW input, optionally followed by ReLU, as
//! one fused op with a hand-written backward.
//!
//! Composed from candle ops, a training BatchNorm + ReLU is about a dozen passes over the
//! activation forward and more backward, each allocating a tensor. The CPU path here
//! makes two passes for the statistics and one for the output, and backward makes one
//! pass for the per-channel sums and one for all three gradients (the ReLU mask comes from
//! the output). Other devices take the composed path, which is also the reference the
//! tests hold the fused kernel to.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, WithDType, bail,
};
use num_traits::Float;
use rayon::prelude::*;

use super::float::{Real, dispatch_real, output_buffer, sum_map, sum_zip, sum_zip3};

/// Output of [`batch_norm_train`]: the normalised tensor and the per-channel batch
/// statistics the running averages are updated with.
pub struct BatchNormOutput {
    pub output: Tensor,
    /// Per-channel mean, shape `(C,)`, in the input's dtype.
    pub mean: Tensor,
    /// Per-channel biased variance (divided by N·H·W), shape `(C,)`.
    pub var: Tensor,
}

/// Normalises `x` (NCHW) with its own per-channel statistics, then scales by `gamma`,
/// shifts by `beta` (both `(C,)`) and applies ReLU when `relu`. Differentiable with
/// respect to `x`, `gamma` and `beta`.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<BatchNormOutput> {
    let (n, c, h, w) = x.dims4()?;
    if n * h * w < 2 {
        bail!(
            "batch_norm: training needs more than one value per channel, got input shape {:?}",
            x.shape()
        );
    }
    for (name, t) in [("weight", gamma), ("bias", beta)] {
        if t.dims() != [c] {
            bail!(
                "batch_norm: {name} has shape {:?}, expected ({c},)",
                t.shape()
            );
        }
    }
    match x.device() {
        Device::Cpu => fused(x, gamma, beta, eps, relu),
        _ => batch_norm_train_composed(x, gamma, beta, eps, relu),
    }
}

fn fused(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<BatchNormOutput> {
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&ChannelStats)?;
    let (mean, var) = (stats.get(0)?, stats.get(1)?);
    let op = BatchNormTrain {
        mean: mean.to_vec1::<f64>()?,
        invstd: var
            .to_vec1::<f64>()?
            .iter()
            .map(|v| 1.0 / (v + eps).sqrt())
            .collect(),
        gamma: gamma.to_dtype(DType::F64)?.to_vec1::<f64>()?,
        relu,
    };
    let output = x.apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)?;
    Ok(BatchNormOutput {
        output,
        mean: mean.to_dtype(x.dtype())?,
        var: var.to_dtype(x.dtype())?,
    })
}

/// [`batch_norm_train`] from candle ops (autograd backward): the path on devices without
/// a fused kernel, and the reference the fused CPU kernel is tested against.
pub fn batch_norm_train_composed(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
    relu: bool,
) -> Result<BatchNormOutput> {
    let channels = x.dim(1)?;
    let per_channel_mean = |t: &Tensor| t.mean_keepdim(0)?.mean_keepdim(2)?.mean_keepdim(3);
    let mean = per_channel_mean(x)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = per_channel_mean(&centered.sqr()?)?;
    let output = centered
        .broadcast_div(&(&var + eps)?.sqrt()?)?
        .broadcast_mul(&gamma.reshape((1, channels, 1, 1))?)?
        .broadcast_add(&beta.reshape((1, channels, 1, 1))?)?;
    Ok(BatchNormOutput {
        output: if relu { output.relu()? } else { output },
        mean: mean.flatten_all()?.detach(),
        var: var.flatten_all()?.detach(),
    })
}

/// NCHW input seen per channel: channel `c` is the planes `n * C + c`.
#[derive(Clone, Copy)]
struct Channels {
    n: usize,
    c: usize,
    plane: usize,
}

impl Channels {
    fn of(layout: &Layout) -> Result<Self> {
        let (n, c, h, w) = layout.shape().dims4()?;
        Ok(Self { n, c, plane: h * w })
    }

    fn count(&self) -> f64 {
        (self.n * self.plane) as f64
    }

    /// The planes of channel `c`.
    fn planes<'a, T>(&self, data: &'a [T], c: usize) -> impl Iterator<Item = &'a [T]> + 'a {
        let (channels, plane) = (self.c, self.plane);
        (0..self.n).map(move |n| &data[(n * channels + c) * plane..][..plane])
    }

    /// Per-channel values computed in parallel over channels.
    fn map<R: Send>(&self, f: impl Fn(usize) -> R + Sync + Send) -> Vec<R> {
        (0..self.c).into_par_iter().map(f).collect()
    }
}

/// `x -> [mean; biased variance]`, shape `(2, C)`, f64, two passes for accuracy.
struct ChannelStats;

impl ChannelStats {
    fn stats<T: Real>(x: &[T], ch: Channels) -> Vec<f64> {
        // Vectorised sums per plane in T, accumulated across planes in f64.
        let per_channel = ch.map(|c| {
            let sum: f64 = ch
                .planes(x, c)
                .map(|p| WithDType::to_f64(sum_map(p, |v| v)))
                .sum();
            let mean = sum / ch.count();
            let m = T::lit(mean);
            let sq: f64 = ch
                .planes(x, c)
                .map(|p| WithDType::to_f64(sum_map(p, |v| (v - m) * (v - m))))
                .sum();
            (mean, sq / ch.count())
        });
        let (mean, var): (Vec<f64>, Vec<f64>) = per_channel.into_iter().unzip();
        [mean, var].concat()
    }
}

impl CustomOp1 for ChannelStats {
    fn name(&self) -> &'static str {
        "batch_norm_stats"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let ch = Channels::of(layout)?;
        let stats = dispatch_real!(storage, self.name(), |T| Self::stats(
            T::elements(storage, layout, self.name())?,
            ch
        ));
        Ok((CpuStorage::F64(stats), Shape::from((2, ch.c))))
    }
}

/// `(x, gamma, beta) -> [relu](gamma * (x - mean) * invstd + beta)` with the batch
/// statistics computed beforehand. `gamma` is kept on the host for the backward.
struct BatchNormTrain {
    mean: Vec<f64>,
    invstd: Vec<f64>,
    gamma: Vec<f64>,
    relu: bool,
}

impl BatchNormTrain {
    fn normalise<T: Real>(&self, x: &[T], beta: &[T], ch: Channels) -> Vec<T> {
        let mut out = output_buffer(x.len());
        let floor = if self.relu {
            T::zero()
        } else {
            T::neg_infinity()
        };
        out.par_chunks_mut(ch.plane)
            .zip(x.par_chunks(ch.plane))
            .enumerate()
            .for_each(|(i, (out, x))| {
                let c = i % ch.c;
                let scale = self.gamma[c] * self.invstd[c];
                let shift = WithDType::to_f64(beta[c]) - self.mean[c] * scale;
                let (scale, shift) = (T::lit(scale), T::lit(shift));
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = Float::max(v * scale + shift, floor);
                }
            });
        out
    }
}

impl CustomOp3 for BatchNormTrain {
    fn name(&self) -> &'static str {
        "batch_norm_train"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        _gamma: &CpuStorage,
        _gamma_layout: &Layout,
        beta: &CpuStorage,
        beta_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ch = Channels::of(x_layout)?;
        let name = self.name();
        let out = dispatch_real!(x, name, |T| T::storage(self.normalise(
            T::elements(x, x_layout, name)?,
            T::elements(beta, beta_layout, name)?,
            ch
        )));
        Ok((out, x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = BatchNormTrainBackward {
            mean: self.mean.clone(),
            invstd: self.invstd.clone(),
            gamma: self.gamma.clone(),
            relu: self.relu,
        };
        // One buffer [dx | dgamma | dbeta], split by views without copying.
        let packed = x.apply_op3_no_bwd(res, &grad_res.contiguous()?, &backward)?;
        let (numel, c) = (x.elem_count(), gamma.elem_count());
        let grad_x = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
        let grad_gamma = packed.narrow(0, numel, c)?;
        let grad_beta = packed.narrow(0, numel + c, c)?;
        Ok((Some(grad_x), Some(grad_gamma), Some(grad_beta)))
    }
}

/// `(x, y, dy) -> [dx | dgamma | dbeta]` for [`BatchNormTrain`]; `y` (the forward
/// output) gives the ReLU mask.
struct BatchNormTrainBackward {
    mean: Vec<f64>,
    invstd: Vec<f64>,
    gamma: Vec<f64>,
    relu: bool,
}

impl BatchNormTrainBackward {
    fn gradients<T: Real>(&self, x: &[T], y: &[T], dy: &[T], ch: Channels) -> Vec<T> {
        let relu = self.relu;
        let masked = move |dy: T, y: T| {
            if relu && y <= T::zero() {
                T::zero()
            } else {
                dy
            }
        };
        // Per channel: sum(dy) and sum(dy * (x - mean)), with dy after the ReLU mask.
        let sums = ch.map(|c| {
            let mean = T::lit(self.mean[c]);
            let planes = ch.planes(dy, c).zip(ch.planes(y, c)).zip(ch.planes(x, c));
            planes.fold((0f64, 0f64), |(s, sx), ((dy, y), x)| {
                let plane_s = sum_zip(dy, y, masked);
                let plane_sx = sum_zip3(dy, y, x, |dy, y, x| masked(dy, y) * (x - mean));
                (
                    s + WithDType::to_f64(plane_s),
                    sx + WithDType::to_f64(plane_sx),
                )
            })
        });
        let numel = x.len();
        let mut out = output_buffer(numel + 2 * ch.c);
        let (dx, dparams) = out.split_at_mut(numel);
        dx.par_chunks_mut(ch.plane)
            .zip(
                x.par_chunks(ch.plane)
                    .zip(y.par_chunks(ch.plane))
                    .zip(dy.par_chunks(ch.plane)),
            )
            .enumerate()
            .for_each(|(i, (dx, ((x, y), dy)))| {
                let c = i % ch.c;
                let (sum_dy, sum_dy_xmu) = sums[c];
                let invstd = self.invstd[c];
                // dx = gamma * invstd * (dy - mean(dy) - (x - mean) * invstd² * mean(dy * (x - mean)))
                let k = invstd * invstd * sum_dy_xmu / ch.count();
                let offset = sum_dy / ch.count() - self.mean[c] * k;
                let (scale, k, offset) =
                    (T::lit(self.gamma[c] * invstd), T::lit(k), T::lit(offset));
                for (((dx, &x), &y), &dy) in dx.iter_mut().zip(x).zip(y).zip(dy) {
                    *dx = scale * (masked(dy, y) - x * k - offset);
                }
            });
        for (c, (sum_dy, sum_dy_xmu)) in sums.into_iter().enumerate() {
            dparams[c] = T::lit(sum_dy_xmu * self.invstd[c]);
            dparams[ch.c + c] = T::lit(sum_dy);
        }
        out
    }
}

impl CustomOp3 for BatchNormTrainBackward {
    fn name(&self) -> &'static str {
        "batch_norm_train_backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        y: &CpuStorage,
        y_layout: &Layout,
        dy: &CpuStorage,
        dy_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ch = Channels::of(x_layout)?;
        let name = self.name();
        if dy_layout.shape() != x_layout.shape() || y_layout.shape() != x_layout.shape() {
            bail!(
                "{name}: gradient shape {:?}, expected {:?}",
                dy_layout.shape(),
                x_layout.shape()
            );
        }
        let out = dispatch_real!(x, name, |T| T::storage(self.gradients(
            T::elements(x, x_layout, name)?,
            T::elements(y, y_layout, name)?,
            T::elements(dy, dy_layout, name)?,
            ch
        )));
        Ok((out, Shape::from(x_layout.shape().elem_count() + 2 * ch.c)))
    }
}
