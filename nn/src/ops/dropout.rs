//! Inverted dropout as one op whose mask is a hash of (seed, element index): nothing is
//! stored for the backward pass, which applies the same mask to the incoming gradient.
//!
//! candle's `ops::dropout` draws a full f32 tensor from a ChaCha generator, compares,
//! converts and multiplies (five passes) and keeps the mask alive until backward.

use super::float::{Real, dispatch_real, output_buffer};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;
use std::cell::Cell;

thread_local! {
    // Per thread, so concurrent models (or tests) do not shift each other's masks.
    static NEXT_SEED: Cell<u64> = const { Cell::new(0x5eed) };
}

/// Restarts this thread's sequence of dropout masks: runs that seed the same way and
/// call dropout in the same order drop the same elements.
pub fn seed_dropout(seed: u64) {
    NEXT_SEED.set(seed);
}

/// Zeroes each element with probability `p` and scales the rest by 1 / (1 - p).
/// Differentiable. Fused f32/f64 kernel on CPU, candle's dropout elsewhere.
pub fn dropout(x: &Tensor, p: f64) -> Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        bail!("dropout probability must be in [0, 1), got {p}")
    }
    if !x.device().is_cpu() {
        return candle_nn::ops::dropout(x, p as f32);
    }
    x.contiguous()?.apply_op1(Dropout(DropMask::next(p)))
}

#[derive(Clone, Copy)]
struct Dropout(DropMask);

/// Which elements one dropout call keeps: a hash of (seed, element index), so the
/// backward pass (or a fused op's recomputation) finds the same mask without storing it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DropMask {
    /// Keep an element when its hash is at or above p * 2^32.
    threshold: u64,
    key: u32,
    /// 1 / (1 - p), the factor of kept elements.
    keep_scale: f64,
}

impl DropMask {
    fn new(p: f64, seed: u64) -> Self {
        Self {
            threshold: (p * 4_294_967_296.0) as u64,
            key: (seed ^ (seed >> 32)) as u32 ^ 0x2545_f491,
            keep_scale: 1.0 / (1.0 - p),
        }
    }

    /// The next mask of this thread's sequence (see [`seed_dropout`]).
    pub fn next(p: f64) -> Self {
        Self::new(p, NEXT_SEED.replace(NEXT_SEED.get().wrapping_add(1)))
    }

    /// 1 / (1 - p) in `T`, for [`Self::dropped`].
    pub fn scale<T: Real>(&self) -> T {
        T::lit(self.keep_scale)
    }

    /// `value * scale` where the mask keeps element `index`, 0 where it drops it.
    #[inline(always)]
    pub fn dropped<T: Real>(&self, index: u32, value: T, scale: T) -> T {
        if hash(index, self.key) as u64 >= self.threshold {
            value * scale
        } else {
            T::zero()
        }
    }
}

/// murmur3's 32-bit finaliser over the element index, keyed by the seed.
#[inline(always)]
fn hash(index: u32, key: u32) -> u32 {
    let mut h = index.wrapping_mul(0x9e37_79b9) ^ key;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

impl Dropout {
    fn apply<T: Real>(&self, x: &[T]) -> Result<Vec<T>> {
        if x.len() > u32::MAX as usize {
            bail!(
                "dropout: {} elements exceed the 2^32 the mask indexes",
                x.len()
            )
        }
        let (mask, scale) = (self.0, self.0.scale::<T>());
        const CHUNK: usize = 16 * 1024;
        let mut out = output_buffer(x.len());
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (out, x))| {
                let base = (c * CHUNK) as u32;
                for (i, (o, &x)) in out.iter_mut().zip(x).enumerate() {
                    *o = mask.dropped(base + i as u32, x, scale);
                }
            });
        Ok(out)
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "dropout"
    }

    fn cpu_fwd(&self, x: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let y = dispatch_real!(x, op, |T| T::storage(
            self.apply(T::elements(x, layout, op)?)?
        ));
        Ok((y, layout.shape().clone()))
    }

    /// The mask depends only on the seed and the position, so the gradient is the same
    /// op over the incoming gradient.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_gradient;
    use candle_core::Device;

    #[test]
    fn drops_about_p_and_rescales_the_rest() -> Result<()> {
        let x = Tensor::ones(200_000, candle_core::DType::F32, &Device::Cpu)?;
        let y = dropout(&x, 0.1)?.to_vec1::<f32>()?;
        let dropped = y.iter().filter(|&&v| v == 0.).count() as f64 / y.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        assert!(y.iter().all(|&v| v == 0. || (v - 1. / 0.9).abs() < 1e-6));
        let again = dropout(&x, 0.1)?.to_vec1::<f32>()?;
        assert_ne!(y, again, "each call draws a new mask");
        Ok(())
    }

    #[test]
    fn the_same_seed_gives_the_same_mask() -> Result<()> {
        let x = Tensor::randn(0f32, 1., 1000, &Device::Cpu)?;
        seed_dropout(7);
        let a = dropout(&x, 0.5)?.to_vec1::<f32>()?;
        seed_dropout(7);
        let b = dropout(&x, 0.5)?.to_vec1::<f32>()?;
        assert_eq!(a, b);
        Ok(())
    }

    #[test]
    fn backward_applies_the_forward_mask() -> Result<()> {
        let x = Tensor::randn(0f64, 1., (4, 33), &Device::Cpu)?;
        let w = Tensor::randn(0f64, 1., (4, 33), &Device::Cpu)?;
        // Every evaluation of the loss must see the same mask: reseed before each.
        let check = check_gradient(&x, 1e-5, |x| {
            seed_dropout(11);
            (dropout(x, 0.3)? * &w)?.sum_all()
        })?;
        assert!(check.max_rel_diff < 1e-8, "{check:?}");
        Ok(())
    }
}
