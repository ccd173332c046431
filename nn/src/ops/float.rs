//! The element types the fused CPU kernels run in (f32 and f64; f64 is what the
//! finite-difference checks use).

use candle_core::{CpuStorage, Layout, Result, WithDType, bail};
use rayon::prelude::*;

pub(crate) trait Real:
    WithDType + num_traits::Float + std::ops::AddAssign + std::ops::MulAssign + Send + Sync
{
    fn erf(self) -> Self;

    /// `exp` for the hot loops: f32 uses a branch-free polynomial that the compiler
    /// vectorises (libm's `expf` is a call per element); f64 stays exact for gradient checks.
    fn fast_exp(self) -> Self;

    fn lit(value: f64) -> Self {
        <Self as WithDType>::from_f64(value)
    }

    fn storage(values: Vec<Self>) -> CpuStorage {
        Self::to_cpu_storage_owned(values)
    }

    /// The typed contiguous elements of `storage`, or an error naming `op` for the
    /// dtypes the kernels do not cover.
    fn elements<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [Self]> {
        let data = storage.as_slice::<Self>()?;
        match layout.contiguous_offsets() {
            Some((start, end)) => Ok(&data[start..end]),
            // The public wrappers make inputs contiguous first: this is a bug, not bad input.
            None => bail!(
                "{op}: expects a contiguous input, got strides {:?}",
                layout.stride()
            ),
        }
    }
}

impl Real for f32 {
    /// Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, f32's own resolution
    /// near 1) on `fast_exp`: branch-free, so the GELU loops vectorise.
    #[inline(always)]
    fn erf(self) -> Self {
        let x = self.abs();
        let t = 1.0 / (1.0 + 0.327_591_1 * x);
        let poly = t
            * (0.254_829_6
                + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
        let y = 1.0 - poly * (-x * x).fast_exp();
        y.copysign(self)
    }

    /// Cephes `expf`: 2^n * p(r) with r = x - n ln 2, |r| <= ln2 / 2; relative error ~2e-7.
    #[inline(always)]
    fn fast_exp(self) -> Self {
        const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
        let x = self.clamp(-87.3, 88.7);
        let shifted = x * std::f32::consts::LOG2_E + ROUND;
        let n = shifted - ROUND;
        let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
        let p = 1.987_569_1e-4;
        let p = p * r + 1.398_199_9e-3;
        let p = p * r + 8.333_452e-3;
        let p = p * r + 4.166_579_6e-2;
        let p = p * r + 1.666_666_5e-1;
        let p = p * r + 0.5;
        let p = p * r * r + r + 1.0;
        // 2^n from the integer n that `shifted` holds in its low mantissa bits: `n as i32`
        // saturates, which does not vectorise (one scalar conversion per lane).
        p * f32::from_bits(shifted.to_bits().wrapping_add(127) << 23)
    }
}

impl Real for f64 {
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }

    fn fast_exp(self) -> Self {
        self.exp()
    }
}

/// Runs `kernel` with the element type of `storage` (f32 or f64).
macro_rules! dispatch_real {
    ($storage:expr, $op:expr, |$t:ident| $body:expr) => {
        match $storage {
            candle_core::CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            candle_core::CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            other => candle_core::bail!(
                "{}: CPU kernel supports f32 and f64, got {:?}",
                $op,
                candle_core::backend::BackendStorage::dtype(other)
            ),
        }
    };
}
pub(crate) use dispatch_real;

/// Runs `f` compiled for AVX-512 when the CPU has it: the element-wise loops inlined
/// into it (activations, softmax) then take 16 f32 lanes instead of the build's 8
/// (`.cargo/config.toml` targets AVX2, which every x86 server since 2015 has).
#[inline(always)]
pub(crate) fn widest_vectors<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX512: OnceLock<bool> = OnceLock::new();
        let avx512 = *AVX512.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
        });
        if avx512 {
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl")]
            fn wide<R>(f: impl FnOnce() -> R) -> R {
                f()
            }
            // SAFETY: the CPU has these features (checked above).
            return unsafe { wide(f) };
        }
    }
    f()
}

/// A buffer of `len` elements for a kernel output that the kernel writes completely
/// before anything reads it. `vec![0; len]` would zero-fill it first: one more full
/// write of every activation and gradient, 3-4% of a training step. Same contract as
/// candle's own `alloc_uninit`: `T` is f32 or f64, `Copy`, and every bit pattern is a
/// valid value.
#[allow(clippy::uninit_vec)]
pub(crate) fn output_buffer<T: Real>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: see above; callers overwrite all `len` elements before reading any.
    unsafe { v.set_len(len) };
    v
}

/// Independent accumulators in the row reductions below. A plain `fold` is one serial
/// chain of float additions that the compiler may not reorder, so it runs at one element
/// per add latency; eight chains become one AVX register of f32.
const LANES: usize = 8;

/// `sum(f(x_i))`, vectorised.
#[inline(always)]
pub(crate) fn sum_map<T: Real>(x: &[T], f: impl Fn(T) -> T) -> T {
    sum_zip(x, x, |v, _| f(v))
}

/// `sum(f(a_i, b_i))` over the common length, vectorised.
#[inline(always)]
pub(crate) fn sum_zip<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T) -> T {
    sum_zip3(a, b, b, |a, b, _| f(a, b))
}

/// `sum(f(a_i, b_i, c_i))` over the common length, vectorised.
#[inline(always)]
pub(crate) fn sum_zip3<T: Real>(a: &[T], b: &[T], c: &[T], f: impl Fn(T, T, T) -> T) -> T {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    let mut acc = [T::zero(); LANES];
    let lanes = a
        .chunks_exact(LANES)
        .zip(b.chunks_exact(LANES))
        .zip(c.chunks_exact(LANES));
    for ((a, b), c) in lanes {
        for l in 0..LANES {
            acc[l] += f(a[l], b[l], c[l]);
        }
    }
    let tail = n - n % LANES;
    let rest = (tail..n).fold(T::zero(), |s, i| s + f(a[i], b[i], c[i]));
    acc.into_iter().fold(rest, |s, v| s + v)
}

/// The largest element (`-inf` for an empty row), vectorised.
#[inline(always)]
pub(crate) fn max_of<T: Real>(x: &[T]) -> T {
    let mut acc = [T::neg_infinity(); LANES];
    for c in x.chunks_exact(LANES) {
        for l in 0..LANES {
            acc[l] = if c[l] > acc[l] { c[l] } else { acc[l] };
        }
    }
    x[x.len() - x.len() % LANES..]
        .iter()
        .chain(&acc)
        .fold(T::neg_infinity(), |m, &v| if v > m { v } else { m })
}

/// Adds per-task partial sums: the `reduce` step of kernels that let every task sum
/// into its own buffer, so that no task waits on another.
pub(crate) fn add_partials<T: Real>(mut a: Vec<T>, b: Vec<T>) -> Vec<T> {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
    a
}

/// Rows per parallel task: enough work to amortise rayon's scheduling.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// Applies `f(out_row, in_row)` to every row of `input`, in parallel; `f` writes the
/// whole output row.
pub(crate) fn map_rows<T: Real>(
    input: &[T],
    row_len: usize,
    f: impl Fn(&mut [T], &[T]) + Sync,
) -> Vec<T> {
    let mut out = output_buffer(input.len());
    let chunk = rows_per_task(row_len) * row_len;
    out.par_chunks_mut(chunk)
        .zip(input.par_chunks(chunk))
        .for_each(|(out, input)| {
            for (o, i) in out
                .chunks_exact_mut(row_len)
                .zip(input.chunks_exact(row_len))
            {
                f(o, i)
            }
        });
    out
}

/// Applies `f(out_row, a_row, b_row)` to every pair of rows, in parallel; `f` writes
/// the whole output row.
pub(crate) fn map_row_pairs<T: Real>(
    a: &[T],
    b: &[T],
    row_len: usize,
    f: impl Fn(&mut [T], &[T], &[T]) + Sync,
) -> Result<Vec<T>> {
    if a.len() != b.len() {
        bail!(
            "row kernels: operands have {} and {} elements",
            a.len(),
            b.len()
        )
    }
    let mut out = output_buffer(a.len());
    let chunk = rows_per_task(row_len) * row_len;
    out.par_chunks_mut(chunk)
        .zip(a.par_chunks(chunk).zip(b.par_chunks(chunk)))
        .for_each(|(out, (a, b))| {
            for ((o, a), b) in out
                .chunks_exact_mut(row_len)
                .zip(a.chunks_exact(row_len))
                .zip(b.chunks_exact(row_len))
            {
                f(o, a, b)
            }
        });
    Ok(out)
}

/// The length of the last dimension, with an error naming `op` for scalars.
pub(crate) fn last_dim(layout: &Layout, op: &str) -> Result<usize> {
    match layout.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => bail!(
            "{op}: expects a non-empty last dimension, got shape {:?}",
            layout.dims()
        ),
    }
}

/// Elements per parallel task for element-wise kernels.
const ELEMENTS_PER_TASK: usize = 16 * 1024;

/// `f(out, a, b)` over matching chunks of the flat inputs, in parallel. The kernels
/// loop over the chunk themselves so the per-element math inlines and vectorises; `f`
/// writes the whole output chunk.
pub(crate) fn zip_chunks<T: Real>(
    a: &[T],
    b: &[T],
    f: impl Fn(&mut [T], &[T], &[T]) + Sync,
) -> Result<Vec<T>> {
    if a.len() != b.len() {
        bail!(
            "element-wise kernels: operands have {} and {} elements",
            a.len(),
            b.len()
        )
    }
    let mut out = output_buffer(a.len());
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(
            a.par_chunks(ELEMENTS_PER_TASK)
                .zip(b.par_chunks(ELEMENTS_PER_TASK)),
        )
        .for_each(|(out, (a, b))| f(out, a, b));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::Real;

    #[test]
    fn fast_f32_exp_and_erf_are_accurate_over_the_range_the_kernels_use() {
        let (mut exp_rel, mut erf_abs) = (0f64, 0f64);
        for i in -8000..=8000 {
            let x = i as f32 * 0.01;
            let exact = (x as f64).exp();
            exp_rel = exp_rel.max(((x.fast_exp() as f64) - exact).abs() / exact);
            let exact = candle_core::cpu::erf::erf_f64(x as f64);
            erf_abs = erf_abs.max((Real::erf(x) as f64 - exact).abs());
        }
        assert!(exp_rel < 5e-7, "exp relative error {exp_rel}");
        assert!(erf_abs < 5e-7, "erf absolute error {erf_abs}");
        assert_eq!(
            (-200f32).fast_exp(),
            (-87.3f32).fast_exp(),
            "clamped, not garbage"
        );
    }
}
