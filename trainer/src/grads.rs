//! Gradients of the trainable variables, one slot per variable in name order: what
//! accumulation sums, DDP averages, clipping scales and the optimizer consumes.

use candle_core::Tensor;
use candle_core::backprop::GradStore;

use crate::error::{Error, Result};
use crate::host;
use crate::params::NamedVar;

#[derive(Debug, Clone)]
pub struct Grads {
    /// `None`: the variable did not take part in the loss (the optimizer leaves it alone).
    slots: Vec<Option<Tensor>>,
}

impl Grads {
    /// Takes the gradients of `params` out of a backward pass. Only variables are looked
    /// up: the store also holds gradients of intermediate tensors.
    pub fn take(params: &[NamedVar], store: &mut GradStore) -> Self {
        Grads {
            slots: params
                .iter()
                .map(|p| store.remove(p.var.as_tensor()))
                .collect(),
        }
    }

    pub fn from_slots(slots: Vec<Option<Tensor>>) -> Self {
        Grads { slots }
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    pub fn get(&self, i: usize) -> Option<&Tensor> {
        self.slots[i].as_ref()
    }

    pub fn set(&mut self, i: usize, grad: Tensor) {
        self.slots[i] = Some(grad);
    }

    /// Adds another micro-batch's gradients (gradient accumulation).
    pub fn add(&mut self, other: Grads) -> Result<()> {
        for (mine, theirs) in self.slots.iter_mut().zip(other.slots) {
            *mine = match (mine.take(), theirs) {
                (Some(a), Some(b)) => Some(add_into(a, &b)?),
                (a, b) => a.or(b),
            };
        }
        Ok(())
    }

    pub fn scale(&mut self, factor: f64) -> Result<()> {
        for g in self.slots.iter_mut().flatten() {
            *g = host::scale(g, factor)?;
        }
        Ok(())
    }

    /// Per-variable sums of squares (f64; NaN/Inf exactly where a gradient has one).
    pub fn sum_squares(&self) -> Result<Vec<f64>> {
        self.slots
            .iter()
            .map(|g| g.as_ref().map_or(Ok(0.0), host::sum_squares))
            .collect::<candle_core::Result<_>>()
            .map_err(Error::from)
    }
}

/// `a + b`, accumulated into `a`'s buffer when it is a plain CPU f32 tensor.
fn add_into(a: Tensor, b: &Tensor) -> Result<Tensor> {
    if host::reachable(b) {
        let added = host::write(&a, |acc| {
            host::read(b, |src| acc.iter_mut().zip(src).for_each(|(x, y)| *x += y))
                .ok_or_else(|| candle_core::Error::Msg("gradient not readable".into()))
        })?;
        if added {
            return Ok(a);
        }
    }
    Ok((a + b)?)
}

/// What clipping found: the global L2 norm before clipping and the factor applied.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Clipped {
    pub norm: f64,
    pub factor: f64,
}

/// Global-norm clipping with PyTorch's `clip_grad_norm_` rule: scale every gradient by
/// `max_norm / (norm + 1e-6)` when that is below 1. `sum_squares` comes from
/// [`Grads::sum_squares`] so the same pass also serves the finiteness check.
pub fn clip_global_norm(grads: &mut Grads, sum_squares: &[f64], max_norm: f64) -> Result<Clipped> {
    let norm = sum_squares.iter().sum::<f64>().sqrt();
    let factor = (max_norm / (norm + 1e-6)).min(1.0);
    if factor < 1.0 {
        grads.scale(factor)?;
    }
    Ok(Clipped { norm, factor })
}

/// The first variable whose gradient has a NaN or Inf, by name.
pub fn first_non_finite<'a>(params: &'a [NamedVar], sum_squares: &[f64]) -> Option<&'a str> {
    params
        .iter()
        .zip(sum_squares)
        .find(|(_, s)| !s.is_finite())
        .map(|(p, _)| p.name.as_str())
}
