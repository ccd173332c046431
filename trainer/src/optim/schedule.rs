//! Learning-rate schedules with Hugging Face `transformers` semantics: `factor(step)` is
//! the multiplier for the optimizer step that follows `step` completed steps, so with
//! warmup the first step runs at learning rate 0.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    /// Linear warmup from 0, then linear decay to 0 at `total` steps.
    WarmupLinear {
        warmup: u64,
        total: u64,
    },
    /// Linear warmup from 0, then half a cosine down to 0 at `total` steps.
    WarmupCosine {
        warmup: u64,
        total: u64,
    },
}

impl Schedule {
    pub fn factor(&self, step: u64) -> f64 {
        let warm = |warmup: u64| step as f64 / warmup.max(1) as f64;
        let progress = |warmup: u64, total: u64| {
            (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64
        };
        match *self {
            Schedule::Constant => 1.0,
            Schedule::WarmupLinear { warmup, .. } | Schedule::WarmupCosine { warmup, .. }
                if step < warmup =>
            {
                warm(warmup)
            }
            Schedule::WarmupLinear { warmup, total } => (1.0 - progress(warmup, total)).max(0.0),
            Schedule::WarmupCosine { warmup, total } => {
                let p = progress(warmup, total).min(1.0);
                0.5 * (1.0 + (std::f64::consts::PI * p).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn warmup_then_linear_decay() {
        let s = Schedule::WarmupLinear {
            warmup: 4,
            total: 12,
        };
        let f: Vec<f64> = (0..14).map(|i| s.factor(i)).collect();
        let want = [
            0.0, 0.25, 0.5, 0.75, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0,
        ];
        assert!(f.iter().zip(want).all(|(a, b)| close(*a, b)), "{f:?}");
    }

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::WarmupCosine {
            warmup: 2,
            total: 6,
        };
        assert!(close(s.factor(1), 0.5));
        assert!(close(s.factor(2), 1.0));
        assert!(close(
            s.factor(3),
            0.5 * (1.0 + (std::f64::consts::PI / 4.0).cos())
        ));
        assert!(close(s.factor(4), 0.5));
        assert!(close(s.factor(6), 0.0));
        assert!(close(s.factor(9), 0.0));
        assert!(close(Schedule::Constant.factor(1000), 1.0));
    }

    #[test]
    fn serialises_with_a_kind_tag() {
        let s = Schedule::WarmupCosine {
            warmup: 10,
            total: 100,
        };
        let j = serde_json::to_string(&s).unwrap();
        assert_eq!(j, r#"{"kind":"warmup_cosine","warmup":10,"total":100}"#);
        assert_eq!(serde_json::from_str::<Schedule>(&j).unwrap(), s);
    }
}
