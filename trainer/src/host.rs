//! Direct access to the f32 buffers behind CPU tensors. Optimizer updates, gradient
//! flattening and norms are single loops over these slices instead of chains of candle ops
//! that each allocate a temporary the size of the model.
//!
//! Every function answers `None`/`false` for tensors it cannot reach this way (GPU,
//! non-f32, non-contiguous), and callers fall back to candle ops.

use std::sync::Mutex;

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};

/// Whether [`read`] and [`write`] reach this tensor's data directly.
pub fn reachable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// Runs `f` on the contiguous f32 data of a CPU tensor.
pub fn read<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    if !reachable(t) {
        return None;
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return None;
    };
    let (start, end) = layout.contiguous_offsets()?;
    let data = cpu.as_slice::<f32>().ok()?;
    Some(f(&data[start..end]))
}

/// Runs `f` on the contiguous f32 data of a CPU tensor, mutably and in place (every tensor
/// sharing the storage sees the change, which is how a `Var` is updated). Returns
/// `Ok(false)` without calling `f` when the tensor is not reachable.
pub fn write(
    t: &Tensor,
    f: impl FnOnce(&mut [f32]) -> candle_core::Result<()>,
) -> candle_core::Result<bool> {
    if !reachable(t) {
        return Ok(false);
    }
    t.inplace_op1(&WithSlice(Mutex::new(Some(f))))?;
    Ok(true)
}

/// Copies a tensor's values into `out` as f32 (any device or dtype, reachable or not).
pub fn copy_to(t: &Tensor, out: &mut [f32]) -> candle_core::Result<()> {
    if read(t, |data| out.copy_from_slice(data)).is_some() {
        return Ok(());
    }
    let values = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    out.copy_from_slice(&values);
    Ok(())
}

/// Overwrites `t` in place with `values` when reachable; otherwise answers a new tensor of
/// `t`'s shape, dtype and device holding them (the caller puts it where `t` was).
pub fn overwrite(t: &Tensor, values: &[f32]) -> candle_core::Result<Option<Tensor>> {
    if write(t, |data| {
        data.copy_from_slice(values);
        Ok(())
    })? {
        return Ok(None);
    }
    let fresh = Tensor::from_slice(values, t.shape(), t.device())?.to_dtype(t.dtype())?;
    Ok(Some(fresh))
}

/// Sum of squares in f64: NaN or Inf exactly when some element is NaN or Inf (squares of
/// finite f32 values cannot overflow f64).
pub fn sum_squares(t: &Tensor) -> candle_core::Result<f64> {
    if let Some(s) = read(t, |data| {
        data.iter()
            .map(|&x| {
                let x = x as f64;
                x * x
            })
            .sum()
    }) {
        return Ok(s);
    }
    t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()
}

/// Multiplies `t` by `factor`, in place when reachable.
pub fn scale(t: &Tensor, factor: f64) -> candle_core::Result<Tensor> {
    let f = factor as f32;
    if write(t, |data| {
        data.iter_mut().for_each(|x| *x *= f);
        Ok(())
    })? {
        return Ok(t.clone());
    }
    t.affine(factor, 0.0)
}

struct WithSlice<F>(Mutex<Option<F>>);

impl<F: FnOnce(&mut [f32]) -> candle_core::Result<()>> InplaceOp1 for WithSlice<F> {
    fn name(&self) -> &'static str {
        "ringmaster-host-f32"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let f = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("host slice closure poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("host slice closure ran twice".into()))?;
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("host slice access needs f32 storage")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("host slice access needs a contiguous tensor")
        };
        f(&mut data[start..end])
    }
}
