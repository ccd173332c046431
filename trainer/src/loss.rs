//! Training losses: cross-entropy, optionally with per-class weights (torch's
//! `CrossEntropyLoss(weight=...)`: a weighted mean), and knowledge distillation
//! (Hinton et al.: the student also matches the teacher's softened predictions).

use candle_core::{D, Tensor};
use candle_nn::ops::log_softmax;

use crate::error::Result;

/// Mean cross-entropy of `logits` (batch, classes) against u32 `labels`; with
/// `class_weights` (classes,) each example weighs its class's weight and the sum is
/// divided by the total weight.
pub fn cross_entropy(
    logits: &Tensor,
    labels: &Tensor,
    class_weights: Option<&Tensor>,
) -> Result<Tensor> {
    let Some(weights) = class_weights else {
        return Ok(candle_nn::loss::cross_entropy(logits, labels)?);
    };
    let nll = log_softmax(logits, D::Minus1)?
        .gather(&labels.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?;
    let per_example = weights.index_select(labels, 0)?;
    Ok(((nll * &per_example)?.sum_all()? / per_example.sum_all()?)?)
}

/// `(1 - alpha) * hard + alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T))`,
/// the KL divergence averaged over the batch (torch's `reduction="batchmean"`); the T^2
/// keeps the soft term's gradients on the scale of the hard one's.
pub fn distillation(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    hard: &Tensor,
    temperature: f64,
    alpha: f64,
) -> Result<Tensor> {
    let student = log_softmax(&(student_logits / temperature)?, D::Minus1)?;
    let teacher = log_softmax(&(teacher_logits.detach() / temperature)?, D::Minus1)?;
    let batch = student_logits.dim(0)? as f64;
    let kl = ((teacher.exp()? * (&teacher - &student)?)?.sum_all()? / batch)?;
    Ok(((hard * (1.0 - alpha))? + (kl * (alpha * temperature * temperature))?)?)
}

/// Each class weighs `n / (classes x count)` (scikit-learn's "balanced"); a class with no
/// examples weighs 0.
pub fn balanced_class_weights(labels: impl Iterator<Item = usize>, classes: usize) -> Vec<f32> {
    let mut counts = vec![0usize; classes];
    let mut n = 0;
    for label in labels {
        counts[label] += 1;
        n += 1;
    }
    counts
        .iter()
        .map(|&c| {
            if c == 0 {
                0.0
            } else {
                n as f32 / (classes * c) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn scalar(t: &Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn weighted_cross_entropy_is_the_weighted_mean() {
        let cpu = Device::Cpu;
        let logits = Tensor::new(&[[2.0f32, 0.0], [0.0, 1.0], [1.0, 1.0]], &cpu).unwrap();
        let labels = Tensor::new(&[0u32, 1, 1], &cpu).unwrap();
        let plain = scalar(&cross_entropy(&logits, &labels, None).unwrap());
        let ones = Tensor::new(&[1.0f32, 1.0], &cpu).unwrap();
        let same = scalar(&cross_entropy(&logits, &labels, Some(&ones)).unwrap());
        assert!((plain - same).abs() < 1e-6, "{plain} vs {same}");
        // Weight only class 0: the loss is example 0's alone.
        let only_first = Tensor::new(&[1.0f32, 0.0], &cpu).unwrap();
        let first = scalar(&cross_entropy(&logits, &labels, Some(&only_first)).unwrap());
        let expected = -(2f32.exp() / (2f32.exp() + 1.0)).ln();
        assert!((first - expected).abs() < 1e-5, "{first} vs {expected}");
        assert_eq!(
            balanced_class_weights([0, 0, 0, 1].into_iter(), 3),
            [4.0 / 9.0, 4.0 / 3.0, 0.0]
        );
    }

    #[test]
    fn distillation_is_zero_when_the_student_matches_and_pulls_it_otherwise() {
        let cpu = Device::Cpu;
        let teacher = Tensor::new(&[[3.0f32, -1.0], [0.5, 0.2]], &cpu).unwrap();
        let zero = Tensor::new(0f32, &cpu).unwrap();
        let same = distillation(&teacher, &teacher, &zero, 2.0, 1.0).unwrap();
        assert!(scalar(&same).abs() < 1e-6);
        let student = candle_core::Var::new(&[[0.0f32, 0.0], [0.0, 0.0]], &cpu).unwrap();
        let loss = distillation(student.as_tensor(), &teacher, &zero, 2.0, 1.0).unwrap();
        assert!(scalar(&loss) > 0.0);
        let grad = loss.backward().unwrap();
        let g = grad
            .get(student.as_tensor())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(
            g[0][0] < 0.0 && g[0][1] > 0.0,
            "towards the teacher's class 0: {g:?}"
        );
        // alpha = 0 leaves the hard loss alone.
        let hard = Tensor::new(0.7f32, &cpu).unwrap();
        let only_hard = distillation(student.as_tensor(), &teacher, &hard, 2.0, 0.0).unwrap();
        assert!((scalar(&only_hard) - 0.7).abs() < 1e-6);
    }
}
