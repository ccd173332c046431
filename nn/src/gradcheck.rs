//! Finite-difference checks for hand-written backward passes.

use candle_core::{DType, Tensor, Var};

/// The worst disagreement between an analytic and a numeric gradient.
#[derive(Debug, Clone, Copy)]
pub struct GradCheck {
    pub max_abs_diff: f64,
    /// `max_abs_diff` divided by the largest gradient magnitude (at least 1).
    pub max_rel_diff: f64,
}

/// Compares `d loss / d input` from candle's backward with central differences.
///
/// `loss` must map the input to a scalar. The input is cast to f64 so that the numeric
/// gradient is accurate to about `eps²`; ops under test must therefore support f64.
pub fn check_gradient(
    input: &Tensor,
    eps: f64,
    loss: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<GradCheck> {
    let x = Var::from_tensor(&input.to_dtype(DType::F64)?)?;
    let analytic = loss(x.as_tensor())?
        .backward()?
        .get(x.as_tensor())
        .cloned()
        .ok_or_else(|| candle_core::Error::Msg("the loss does not depend on the input".into()))?
        .flatten_all()?
        .to_vec1::<f64>()?;

    let base = x.as_tensor().flatten_all()?.to_vec1::<f64>()?;
    let shape = x.as_tensor().shape().clone();
    let mut max_abs_diff = 0f64;
    let mut max_grad = 1f64;
    let mut probe = base.clone();
    for (i, analytic) in analytic.iter().enumerate() {
        let at = |value: f64, probe: &mut Vec<f64>| -> candle_core::Result<f64> {
            probe[i] = value;
            let t = Tensor::from_slice(probe, &shape, x.device())?;
            loss(&t)?.to_dtype(DType::F64)?.to_scalar::<f64>()
        };
        let plus = at(base[i] + eps, &mut probe)?;
        let minus = at(base[i] - eps, &mut probe)?;
        probe[i] = base[i];
        let numeric = (plus - minus) / (2.0 * eps);
        max_abs_diff = max_abs_diff.max((numeric - analytic).abs());
        max_grad = max_grad.max(numeric.abs());
    }
    Ok(GradCheck {
        max_abs_diff,
        max_rel_diff: max_abs_diff / max_grad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn agrees_with_candle_on_a_differentiable_op() -> candle_core::Result<()> {
        let x = Tensor::arange(-3f64, 3., &Device::Cpu)?.reshape((2, 3))?;
        let check = check_gradient(&x, 1e-5, |x| (x.sqr()? * x.sin()?)?.sum_all())?;
        assert!(check.max_abs_diff < 1e-7, "{check:?}");
        Ok(())
    }

    #[test]
    fn catches_a_wrong_backward() -> candle_core::Result<()> {
        // `detach` cuts the graph, as LayerNorm's fast path does: the check must notice.
        let x = Tensor::arange(1f64, 5., &Device::Cpu)?;
        let check = check_gradient(&x, 1e-5, |x| (x.sqr()?.detach() + x)?.sum_all())?;
        assert!(check.max_abs_diff > 1.0, "{check:?}");
        Ok(())
    }
}
