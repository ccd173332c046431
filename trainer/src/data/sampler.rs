//! Which examples each rank trains on, with the semantics of PyTorch's
//! `DistributedSampler`: every epoch the whole index range is shuffled from
//! `seed + epoch`, padded by repeating its head to a multiple of the world size, and rank
//! r takes positions r, r + world, ... So every rank runs the same number of steps, the
//! shards never overlap (apart from the padding) and a resumed run sees the same order.
//! With oversampling the epoch's order is drawn with replacement instead, every class
//! equally likely (torch's `WeightedRandomSampler` with weights 1 / class count).

use crate::rng::TrainRng;

/// A seeded Fisher-Yates permutation of `0..n`.
pub fn permutation(n: usize, rng: &mut TrainRng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// The whole epoch's order: `0..n`, shuffled from `seed + epoch` when `shuffle`.
pub fn epoch_order(n: usize, seed: u64, epoch: u64, shuffle: bool) -> Vec<usize> {
    if shuffle {
        permutation(n, &mut TrainRng::new(seed.wrapping_add(epoch)))
    } else {
        (0..n).collect()
    }
}

/// An epoch of `labels.len()` draws with replacement: a class uniformly, then one of its
/// examples uniformly, from `seed + epoch`.
pub fn balanced_order(labels: &[usize], classes: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); classes];
    for (i, &label) in labels.iter().enumerate() {
        by_class[label].push(i);
    }
    by_class.retain(|members| !members.is_empty());
    if by_class.is_empty() {
        return Vec::new();
    }
    let mut rng = TrainRng::new(seed.wrapping_add(epoch));
    (0..labels.len())
        .map(|_| {
            let members = &by_class[rng.below(by_class.len())];
            members[rng.below(members.len())]
        })
        .collect()
}

/// Rank `rank`'s share of an epoch's `order`: positions rank, rank + world, ..., padded
/// from the head so that every rank gets `ceil(n / world)`.
pub fn shard(order: &[usize], world: usize, rank: usize) -> Vec<usize> {
    let n = order.len();
    if n == 0 {
        return Vec::new();
    }
    let per_rank = n.div_ceil(world.max(1));
    (0..per_rank)
        .map(|k| order[(k * world + rank) % n])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    #[test]
    fn shards_are_equal_disjoint_cover_everything_and_reshuffle_per_epoch() {
        let (n, world) = (10, 3);
        let order = epoch_order(n, 5, 0, true);
        let shards: Vec<Vec<usize>> = (0..world).map(|r| shard(&order, world, r)).collect();
        assert!(shards.iter().all(|s| s.len() == 4), "{shards:?}");
        let all: BTreeSet<usize> = shards.iter().flatten().copied().collect();
        assert_eq!(all.len(), n, "every example is seen");
        assert_eq!(
            shards.iter().map(Vec::len).sum::<usize>(),
            12,
            "2 padded from the head"
        );
        assert_eq!(
            shard(&epoch_order(n, 5, 0, true), world, 1),
            shards[1],
            "same seed, same order"
        );
        assert_ne!(
            shard(&epoch_order(n, 5, 1, true), world, 1),
            shards[1],
            "a new order every epoch"
        );
        assert_eq!(shard(&epoch_order(4, 5, 0, false), 2, 1), [1, 3]);
    }

    #[test]
    fn oversampling_draws_classes_equally_often() {
        // 90 of class 0, 10 of class 1: a plain epoch shows class 1 a tenth of the time.
        let labels: Vec<usize> = (0..100).map(|i| usize::from(i >= 90)).collect();
        let order = balanced_order(&labels, 3, 1, 0);
        assert_eq!(order.len(), 100);
        let minority = order.iter().filter(|&&i| labels[i] == 1).count();
        assert!((35..=65).contains(&minority), "{minority} of 100");
        assert_ne!(
            balanced_order(&labels, 3, 1, 1),
            order,
            "reshuffled per epoch"
        );
    }
}
