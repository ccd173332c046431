//! Classification metrics from a confusion matrix: accuracy, macro-F1, per-class
//! precision and recall. Ranks each count their validation shard; the matrices (and loss
//! sums) are summed across ranks with one all-reduce.

use serde::{Deserialize, Serialize};

/// `counts[truth][predicted]`, plus the summed loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Confusion {
    classes: usize,
    counts: Vec<f64>,
    loss_sum: f64,
}

/// What one evaluation reports (also a line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub examples: u64,
    pub loss: f64,
    pub accuracy: f64,
    pub macro_f1: f64,
    pub per_class: Vec<ClassReport>,
    /// Rows: true label; columns: predicted.
    pub confusion: Vec<Vec<u64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassReport {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

impl Confusion {
    pub fn new(classes: usize) -> Self {
        Self {
            classes,
            counts: vec![0.0; classes * classes],
            loss_sum: 0.0,
        }
    }

    /// Adds a batch: predicted and true class per example, and the batch's summed loss.
    pub fn add(&mut self, predicted: &[u32], truth: &[u32], loss_sum: f64) {
        for (&p, &t) in predicted.iter().zip(truth) {
            self.counts[t as usize * self.classes + p as usize] += 1.0;
        }
        self.loss_sum += loss_sum;
    }

    /// The counts and loss as one flat vector (for an all-reduce), and back.
    pub fn to_flat(&self) -> Vec<f32> {
        let mut flat: Vec<f32> = self.counts.iter().map(|&c| c as f32).collect();
        flat.push(self.loss_sum as f32);
        flat
    }

    pub fn from_flat(classes: usize, flat: &[f32]) -> Self {
        let (counts, loss) = flat.split_at(classes * classes);
        Self {
            classes,
            counts: counts.iter().map(|&c| f64::from(c).round()).collect(),
            loss_sum: f64::from(loss[0]),
        }
    }

    pub fn report(&self, labels: &[String]) -> EvalReport {
        let n = self.classes;
        let at = |t: usize, p: usize| self.counts[t * n + p];
        let total: f64 = self.counts.iter().sum();
        let correct: f64 = (0..n).map(|c| at(c, c)).sum();
        let per_class: Vec<ClassReport> = (0..n)
            .map(|c| {
                let predicted: f64 = (0..n).map(|t| at(t, c)).sum();
                let support: f64 = (0..n).map(|p| at(c, p)).sum();
                let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
                let (precision, recall) = (ratio(at(c, c), predicted), ratio(at(c, c), support));
                ClassReport {
                    label: labels.get(c).cloned().unwrap_or_else(|| c.to_string()),
                    precision,
                    recall,
                    f1: ratio(2.0 * precision * recall, precision + recall),
                    support: support as u64,
                }
            })
            .collect();
        EvalReport {
            examples: total as u64,
            loss: if total > 0.0 {
                self.loss_sum / total
            } else {
                0.0
            },
            accuracy: if total > 0.0 { correct / total } else { 0.0 },
            macro_f1: per_class.iter().map(|c| c.f1).sum::<f64>() / n.max(1) as f64,
            confusion: (0..n)
                .map(|t| (0..n).map(|p| at(t, p) as u64).collect())
                .collect(),
            per_class,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_match_a_hand_count_and_survive_the_flat_round_trip() {
        let mut c = Confusion::new(2);
        // truth: 0 0 0 1 1; predicted: 0 0 1 1 0
        c.add(&[0, 0, 1, 1, 0], &[0, 0, 0, 1, 1], 2.5);
        let c = Confusion::from_flat(2, &c.to_flat());
        let r = c.report(&["ham".into(), "spam".into()]);
        assert_eq!(r.examples, 5);
        assert!((r.accuracy - 0.6).abs() < 1e-12);
        assert!((r.loss - 0.5).abs() < 1e-6);
        assert_eq!(r.confusion, [[2, 1], [1, 1]]);
        let ham = &r.per_class[0];
        assert!(
            (ham.precision - 2.0 / 3.0).abs() < 1e-12 && (ham.recall - 2.0 / 3.0).abs() < 1e-12
        );
        let spam = &r.per_class[1];
        assert!((spam.precision - 0.5).abs() < 1e-12 && (spam.recall - 0.5).abs() < 1e-12);
        assert!((r.macro_f1 - (2.0 / 3.0 + 0.5) / 2.0).abs() < 1e-12);
    }
}
