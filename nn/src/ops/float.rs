//! The element types the fused CPU kernels run in (f32 and f64; f64 is what the
//! finite-difference checks use).

use candle_core::{CpuStorage, Layout, Result, WithDType, bail};
use rayon::prelude::*;

pub(crate) trait Real: WithDType + num_traits::Float + Send + Sync {
    fn erf(self) -> Self;

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
            None => bail!("{op}: expects a contiguous input, got strides {:?}", layout.stride()),
        }
    }
}

impl Real for f32 {
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f32(self)
    }
}

impl Real for f64 {
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
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

/// Rows per parallel task: enough work to amortise rayon's scheduling.
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (16 * 1024 / row_len.max(1)).max(1)
}

/// Applies `f(out_row, in_row)` to every row of `input`, in parallel.
pub(crate) fn map_rows<T: Real>(
    input: &[T],
    row_len: usize,
    f: impl Fn(&mut [T], &[T]) + Sync,
) -> Vec<T> {
    let mut out = vec![T::zero(); input.len()];
    let chunk = rows_per_task(row_len) * row_len;
    out.par_chunks_mut(chunk)
        .zip(input.par_chunks(chunk))
        .for_each(|(out, input)| {
            for (o, i) in out.chunks_exact_mut(row_len).zip(input.chunks_exact(row_len)) {
                f(o, i)
            }
        });
    out
}

/// Applies `f(out_row, a_row, b_row)` to every pair of rows, in parallel.
pub(crate) fn map_row_pairs<T: Real>(
    a: &[T],
    b: &[T],
    row_len: usize,
    f: impl Fn(&mut [T], &[T], &[T]) + Sync,
) -> Result<Vec<T>> {
    if a.len() != b.len() {
        bail!("row kernels: operands have {} and {} elements", a.len(), b.len())
    }
    let mut out = vec![T::zero(); a.len()];
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
        _ => bail!("{op}: expects a non-empty last dimension, got shape {:?}", layout.dims()),
    }
}

/// Elements per parallel task for element-wise kernels.
const ELEMENTS_PER_TASK: usize = 16 * 1024;

/// `f(a[i], b[i])` for every element, in parallel.
pub(crate) fn zip_elements<T: Real>(a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) -> Result<Vec<T>> {
    if a.len() != b.len() {
        bail!("element-wise kernels: operands have {} and {} elements", a.len(), b.len())
    }
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(a.par_chunks(ELEMENTS_PER_TASK).zip(b.par_chunks(ELEMENTS_PER_TASK)))
        .for_each(|(out, (a, b))| {
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = f(a, b)
            }
        });
    Ok(out)
}
