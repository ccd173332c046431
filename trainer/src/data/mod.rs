//! Labelled data for training and evaluation: text (`text`: CSV, TSV, JSONL) and images
//! (`images`: ImageFolder trees and IDX files, transformed by `augment`), a deterministic
//! validation split, per-rank sharding (`sampler`) and batches built on a background
//! thread ahead of the step that consumes them (`batches`).

pub mod augment;
pub mod batches;
pub mod images;
pub mod sampler;
pub mod text;

use std::collections::BTreeSet;

use crate::rng::TrainRng;

/// The training and validation examples and the label names, in index order.
#[derive(Debug, Clone)]
pub struct Labelled<T> {
    pub train: Vec<T>,
    pub validation: Vec<T>,
    pub labels: Vec<String>,
}

/// Moves a seeded random `fraction` of `train` (at least one item when the fraction is
/// positive) into the returned validation set; the same seed always picks the same items.
pub fn hold_out<T>(train: &mut Vec<T>, fraction: f64, seed: u64) -> Vec<T> {
    let n = train.len();
    // At least one item when asked for any, never more than half (a one-item dataset
    // keeps its item for training).
    let count = ((n as f64 * fraction).round() as usize)
        .max(usize::from(fraction > 0.0))
        .min(n / 2);
    let order = sampler::permutation(n, &mut TrainRng::new(seed ^ SPLIT_SEED_MIX));
    let held: BTreeSet<usize> = order[..count].iter().copied().collect();
    let mut validation = Vec::with_capacity(count);
    let mut kept = Vec::with_capacity(n - count);
    for (i, item) in train.drain(..).enumerate() {
        if held.contains(&i) {
            validation.push(item);
        } else {
            kept.push(item);
        }
    }
    *train = kept;
    validation
}

/// Mixed into the split seed so that the split and the epoch order differ.
const SPLIT_SEED_MIX: u64 = 0x5eed_0f5b_1175_eed5;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_never_takes_more_than_half() {
        let mut one = vec!["x"];
        assert!(hold_out(&mut one, 0.2, 1).is_empty());
        assert_eq!(one, ["x"], "a one-item dataset keeps its item");
        let mut three = vec![1, 2, 3];
        assert_eq!(
            hold_out(&mut three, 0.01, 1).len(),
            1,
            "at least one item when asked"
        );
    }
}
