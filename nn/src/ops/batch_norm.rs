//! Training-mode batch normalisation over NCHW input as one fused op with a
//! hand-written backward.
//!
//! Composed from candle ops, a training BatchNorm is about ten passes over the
//! activation forward and more backward, each allocating a tensor. The CPU path here
//! makes two passes for the statistics and one for the output, and backward makes one
//! pass for the per-channel sums and one for all three gradients. Other devices take the
//! composed path, which also serves as the reference in the tests.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Tensor, WithDType, bail,
};
use rayon::prelude::*;

use super::cpu::contiguous;

/// Output of [`batch_norm_train`]: the normalised tensor and the per-channel batch
/// statistics the running averages are updated with.
pub struct BatchNormOutput {
    pub output: Tensor,
    /// Per-channel mean, shape `(C,)`, in the input's dtype.
    pub mean: Tensor,
    /// Per-channel biased variance (divided by N·H·W), shape `(C,)`.
    pub var: Tensor,
}

/// Normalises `x` (NCHW) with its own per-channel statistics, then scales by `gamma` and
/// shifts by `beta` (both `(C,)`). Differentiable with respect to all three.
pub fn batch_norm_train(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
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
        Device::Cpu => fused(x, gamma, beta, eps),
        _ => batch_norm_train_composed(x, gamma, beta, eps),
    }
}

fn fused(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<BatchNormOutput> {
    let x = x.contiguous()?;
    let stats = x.apply_op1_no_bwd(&ChannelStats)?;
    let (mean, var) = (stats.get(0)?, stats.get(1)?);
    let mean_host = mean.to_vec1::<f64>()?;
    let invstd = var
        .to_vec1::<f64>()?
        .iter()
        .map(|v| 1.0 / (v + eps).sqrt())
        .collect();
    let op = BatchNormTrain {
        mean: mean_host,
        invstd,
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
        output,
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
    fn stats<T: WithDType>(x: &[T], ch: Channels) -> Vec<f64> {
        let per_channel = ch.map(|c| {
            let sum: f64 = ch.planes(x, c).flatten().map(|v| v.to_f64()).sum();
            let mean = sum / ch.count();
            let sq: f64 = ch
                .planes(x, c)
                .flatten()
                .map(|v| (v.to_f64() - mean).powi(2))
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
        let stats = match storage {
            CpuStorage::F32(x) => Self::stats(contiguous(x, layout, self.name())?, ch),
            CpuStorage::F64(x) => Self::stats(contiguous(x, layout, self.name())?, ch),
            other => bail!("batch_norm: unsupported dtype {:?}", other.dtype()),
        };
        Ok((CpuStorage::F64(stats), Shape::from((2, ch.c))))
    }
}

/// `(x, gamma, beta) -> gamma * (x - mean) * invstd + beta` with the batch statistics
/// computed beforehand.
struct BatchNormTrain {
    mean: Vec<f64>,
    invstd: Vec<f64>,
}

impl BatchNormTrain {
    fn normalise<T: WithDType>(&self, x: &[T], gamma: &[T], beta: &[T], ch: Channels) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(ch.plane)
            .zip(x.par_chunks(ch.plane))
            .enumerate()
            .for_each(|(i, (out, x))| {
                let c = i % ch.c;
                let scale = gamma[c].to_f64() * self.invstd[c];
                let shift = beta[c].to_f64() - self.mean[c] * scale;
                let (scale, shift) = (T::from_f64(scale), T::from_f64(shift));
                for (o, &v) in out.iter_mut().zip(x) {
                    *o = v * scale + shift;
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
        gamma: &CpuStorage,
        gamma_layout: &Layout,
        beta: &CpuStorage,
        beta_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ch = Channels::of(x_layout)?;
        let name = self.name();
        let out = match (x, gamma, beta) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.normalise(
                    contiguous(x, x_layout, name)?,
                    contiguous(g, gamma_layout, name)?,
                    contiguous(b, beta_layout, name)?,
                    ch,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.normalise(
                    contiguous(x, x_layout, name)?,
                    contiguous(g, gamma_layout, name)?,
                    contiguous(b, beta_layout, name)?,
                    ch,
                ))
            }
            (x, g, b) => bail!(
                "batch_norm: input, weight and bias must share one float dtype, got {:?}, {:?}, {:?}",
                x.dtype(),
                g.dtype(),
                b.dtype()
            ),
        };
        Ok((out, x_layout.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let backward = BatchNormTrainBackward {
            mean: self.mean.clone(),
            invstd: self.invstd.clone(),
        };
        // One buffer [dx | dgamma | dbeta], split by views without copying.
        let packed = x.apply_op3_no_bwd(gamma, &grad_res.contiguous()?, &backward)?;
        let (numel, c) = (x.elem_count(), gamma.elem_count());
        let grad_x = packed.narrow(0, 0, numel)?.reshape(x.shape())?;
        let grad_gamma = packed.narrow(0, numel, c)?;
        let grad_beta = packed.narrow(0, numel + c, c)?;
        Ok((Some(grad_x), Some(grad_gamma), Some(grad_beta)))
    }
}

/// `(x, gamma, dy) -> [dx | dgamma | dbeta]` for [`BatchNormTrain`].
struct BatchNormTrainBackward {
    mean: Vec<f64>,
    invstd: Vec<f64>,
}

impl BatchNormTrainBackward {
    fn gradients<T: WithDType>(&self, x: &[T], gamma: &[T], dy: &[T], ch: Channels) -> Vec<T> {
        // Per channel: sum(dy) and sum(dy * (x - mean)).
        let sums = ch.map(|c| {
            let mean = self.mean[c];
            ch.planes(dy, c)
                .zip(ch.planes(x, c))
                .fold((0f64, 0f64), |acc, (dy, x)| {
                    dy.iter().zip(x).fold(acc, |(s, sx), (&dy, &x)| {
                        let dy = dy.to_f64();
                        (s + dy, sx + dy * (x.to_f64() - mean))
                    })
                })
        });
        let numel = x.len();
        let mut out = vec![T::zero(); numel + 2 * ch.c];
        let (dx, dparams) = out.split_at_mut(numel);
        dx.par_chunks_mut(ch.plane)
            .zip(x.par_chunks(ch.plane).zip(dy.par_chunks(ch.plane)))
            .enumerate()
            .for_each(|(i, (dx, (x, dy)))| {
                let c = i % ch.c;
                let (sum_dy, sum_dy_xmu) = sums[c];
                let invstd = self.invstd[c];
                // dx = gamma * invstd * (dy - mean(dy) - (x - mean) * invstd² * mean(dy * (x - mean)))
                let scale = gamma[c].to_f64() * invstd;
                let k = invstd * invstd * sum_dy_xmu / ch.count();
                let offset = sum_dy / ch.count() - self.mean[c] * k;
                let (scale, k, offset) = (T::from_f64(scale), T::from_f64(k), T::from_f64(offset));
                for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                    *dx = scale * (dy - x * k - offset);
                }
            });
        for (c, (sum_dy, sum_dy_xmu)) in sums.into_iter().enumerate() {
            dparams[c] = T::from_f64(sum_dy_xmu * self.invstd[c]);
            dparams[ch.c + c] = T::from_f64(sum_dy);
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
        gamma: &CpuStorage,
        gamma_layout: &Layout,
        dy: &CpuStorage,
        dy_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ch = Channels::of(x_layout)?;
        if dy_layout.shape() != x_layout.shape() {
            bail!(
                "{}: gradient shape {:?}, expected {:?}",
                self.name(),
                dy_layout.shape(),
                x_layout.shape()
            );
        }
        let name = self.name();
        let out = match (x, gamma, dy) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(dy)) => {
                CpuStorage::F32(self.gradients(
                    contiguous(x, x_layout, name)?,
                    contiguous(g, gamma_layout, name)?,
                    contiguous(dy, dy_layout, name)?,
                    ch,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(dy)) => {
                CpuStorage::F64(self.gradients(
                    contiguous(x, x_layout, name)?,
                    contiguous(g, gamma_layout, name)?,
                    contiguous(dy, dy_layout, name)?,
                    ch,
                ))
            }
            (x, g, dy) => bail!(
                "{name}: unsupported dtypes {:?}, {:?}, {:?}",
                x.dtype(),
                g.dtype(),
                dy.dtype()
            ),
        };
        let len = x_layout.shape().elem_count() + 2 * ch.c;
        Ok((out, Shape::from(len)))
    }
}
