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
    pub fn take(params: &[NamedVar], store: &mut GradStore) -> Result<Self> {
        Grads::from_slots(
            params
                .iter()
                .map(|p| store.remove(p.var.as_tensor()))
                .collect(),
        )
    }

    /// Back-propagates `loss` and takes the gradients of `params`, scaled by `scale`
    /// (1 / micro-batches), added to `earlier` micro-batches' gradients when given.
    pub fn backward(
        params: &[NamedVar],
        loss: &Tensor,
        scale: f64,
        earlier: Option<Grads>,
    ) -> Result<Self> {
        let mut grads = Grads::take(params, &mut loss.backward()?)?;
        grads.scale(scale)?;
        match earlier {
            Some(mut earlier) => {
                earlier.add(grads)?;
                Ok(earlier)
            }
            None => Ok(grads),
        }
    }

    pub fn from_slots(slots: Vec<Option<Tensor>>) -> Result<Self> {
        let mut grads = Grads { slots };
        grads.unshare()?;
        Ok(grads)
    }

    /// Gradients may come straight from a backward pass, which hands the same tensor to
    /// several variables where an op passes its gradient through (`a + b`): each slot
    /// that shares its elements with an earlier one is copied, because clipping, scaling
    /// and DDP write gradients in place.
    pub fn unshare(&mut self) -> Result<()> {
        let mut spans: Vec<(usize, usize, usize)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, g)| {
                host::read(g.as_ref()?, |data| {
                    let start = data.as_ptr() as usize;
                    (start, start + std::mem::size_of_val(data), i)
                })
            })
            .collect();
        spans.sort_unstable();
        let mut reach = 0;
        for (start, end, i) in spans {
            if start < reach {
                let shared = self.slots[i].take().expect("spans come from present slots");
                self.slots[i] = Some(shared.copy()?);
            }
            reach = reach.max(end);
        }
        Ok(())
    }

    /// Slots for `len` variables, none holding a gradient yet.
    pub fn empty(len: usize) -> Self {
        Grads {
            slots: vec![None; len],
        }
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
        if factor == 1.0 {
            return Ok(());
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Backward hands `a + b`'s gradient to both `a` and `b` as one tensor; scaling in
    /// place must still scale each variable's gradient once.
    #[test]
    fn a_gradient_shared_by_two_variables_is_scaled_once_for_each() -> Result<()> {
        let a = Var::new(&[1f32, 2.], &Device::Cpu)?;
        let b = Var::new(&[3f32, 4.], &Device::Cpu)?;
        let mut store = (a.as_tensor() + b.as_tensor())?.sum_all()?.backward()?;
        let slots = vec![store.remove(a.as_tensor()), store.remove(b.as_tensor())];
        let mut grads = Grads::from_slots(slots)?;
        grads.scale(3.0)?;
        for i in 0..2 {
            assert_eq!(grads.get(i).unwrap().to_vec1::<f32>()?, [3.0, 3.0]);
        }
        Ok(())
    }
}
