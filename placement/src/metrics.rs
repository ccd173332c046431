//! The paper's per-bucket metric (`REPLAY.md` §9): every event is put in the bucket of
//! arrived demand (integer % of GPU capacity) and each bucket averages a per-event value.
//! The rounding follows Python (`round(x, 2)` on the exact binary value) per event and
//! numpy (pairwise sum, `rint(x * 100) / 100`) per bucket, because the paper's CSV is
//! compared value by value.

/// State of the cluster right after one pod was handled (placed or failed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Event {
    /// Total milli-GPU demand of all pods arrived so far, failed ones included.
    pub arrived_milli: u64,
    /// Allocated milli-GPU.
    pub used_milli: u64,
    /// FGD fragmentation of the whole cluster, in milli-GPU.
    pub frag_milli: f64,
}

/// Per-event values, in % of GPU capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Measure {
    Allocation,
    Fragmentation,
    /// Fragmentation as a share of the idle GPU capacity.
    FragmentationRatio,
}

/// Python's `round(x, 2)`: the exact binary value rounded to two decimals (Rust's
/// formatting is exact, with ties to even like Python).
pub fn round2_python(x: f64) -> f64 {
    format!("{x:.2}").parse().expect("formatted float parses")
}

/// numpy's `np.round(x, 2)`.
pub fn round2_numpy(x: f64) -> f64 {
    (x * 100.0).round_ties_even() / 100.0
}

/// numpy's float64 pairwise summation (`pairwise_sum_DOUBLE`).
fn pairwise_sum(a: &[f64]) -> f64 {
    const BLOCK: usize = 128;
    let n = a.len();
    if n < 8 {
        let mut res = 0.0;
        for &x in a {
            res += x;
        }
        res
    } else if n <= BLOCK {
        let mut r = [0.0f64; 8];
        r.copy_from_slice(&a[..8]);
        let mut i = 8;
        while i < n - n % 8 {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        while i < n {
            res += a[i];
            i += 1;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

fn numpy_mean(a: &[f64]) -> f64 {
    pairwise_sum(a) / a.len() as f64
}

impl Measure {
    fn value(self, e: &Event, total_gpus: f64) -> f64 {
        let pct = |milli: f64| round2_python(milli / total_gpus / 10.0);
        match self {
            Measure::Allocation => pct(e.used_milli as f64),
            Measure::Fragmentation => pct(e.frag_milli),
            Measure::FragmentationRatio => {
                let idle = total_gpus * 1000.0 - e.used_milli as f64;
                if idle <= 0.0 {
                    0.0
                } else {
                    100.0 * e.frag_milli / idle
                }
            }
        }
    }
}

/// Bucket means for arrived demand 0..=max_pct (`None` where no event is near).
pub fn curve(
    events: &[Event],
    total_gpus: u64,
    measure: Measure,
    max_pct: usize,
) -> Vec<Option<f64>> {
    let total = total_gpus as f64;
    let mut buckets: Vec<Vec<f64>> = vec![Vec::new(); max_pct + 1];
    let mut arrive: Vec<(i64, f64)> = Vec::with_capacity(events.len());
    for e in events {
        let x = (e.arrived_milli as f64 / total / 10.0).round_ties_even() as i64;
        let v = measure.value(e, total);
        arrive.push((x, v));
        if (0..=max_pct as i64).contains(&x) {
            buckets[x as usize].push(v);
        }
    }
    (0..=max_pct)
        .map(|x| {
            let values = if buckets[x].is_empty() {
                arrive
                    .iter()
                    .filter(|(a, _)| (a - x as i64).abs() <= 1)
                    .map(|&(_, v)| v)
                    .collect()
            } else {
                std::mem::take(&mut buckets[x])
            };
            // The paper rounds allocation and fragmentation means, not ratios.
            (!values.is_empty()).then(|| match measure {
                Measure::FragmentationRatio => numpy_mean(&values),
                _ => round2_numpy(numpy_mean(&values)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_and_numpy_rounding() {
        // Exact binary ties go to even in Python.
        assert_eq!(round2_python(0.125), 0.12);
        assert_eq!(round2_python(0.375), 0.38);
        // 90.605 is stored below the tie: Python keeps 90.6 as well; numpy's x*100 lands
        // on 9060.5 and rounds to even.
        assert_eq!(round2_numpy(90.605), 90.6);
        assert_eq!(round2_numpy(1.005), 1.0);
    }

    #[test]
    fn pairwise_matches_naive_for_small_and_blocks() {
        let v: Vec<f64> = (0..300).map(|i| i as f64 * 0.5).collect();
        assert_eq!(pairwise_sum(&v[..5]), 5.0);
        assert_eq!(pairwise_sum(&v), v.iter().sum::<f64>());
    }

    #[test]
    fn buckets_and_neighbours() {
        let total = 10; // 10 GPUs: 1% = 100 milli
        let ev = |arrived, used| Event {
            arrived_milli: arrived,
            used_milli: used,
            frag_milli: 0.0,
        };
        let events = [ev(100, 100), ev(120, 100), ev(300, 200)];
        let c = curve(&events, total, Measure::Allocation, 5);
        assert_eq!(c[0], Some(1.0)); // empty bucket: neighbour 1
        assert_eq!(c[1], Some(1.0));
        assert_eq!(c[2], Some(1.33)); // neighbours 1 and 3
        assert_eq!(c[4], Some(2.0));
        assert_eq!(c[3], Some(2.0));
        assert_eq!(c[5], None);
    }
}
