//! Helpers shared by the CPU kernels of the custom ops.

use candle_core::{Layout, Result, bail};

/// The elements a contiguous `layout` covers in `data`; the ops make their inputs
/// contiguous before running, so anything else is a bug in the caller.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!(
            "{op}: expects a contiguous input, got strides {:?}",
            layout.stride()
        ),
    }
}
