//! Which examples each rank trains on, with the semantics of PyTorch's
//! `DistributedSampler`: every epoch the whole index range is shuffled from
//! `seed + epoch`, padded by repeating its head to a multiple of the world size, and rank
//! r takes positions r, r + world, ... So every rank runs the same number of steps, the
//! shards never overlap (apart from the padding) and a resumed run sees the same order.

use crate::rng::TrainRng;

/// A seeded Fisher-Yates permutation of `0..n`.
pub fn permutation(n: usize, rng: &mut TrainRng) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        order.swap(i, rng.below(i + 1));
    }
    order
}

/// Rank `rank`'s example indices for `epoch` (shuffled when `shuffle`).
pub fn shard(
    n: usize,
    world: usize,
    rank: usize,
    seed: u64,
    epoch: u64,
    shuffle: bool,
) -> Vec<usize> {
    let order = if shuffle {
        permutation(n, &mut TrainRng::new(seed.wrapping_add(epoch)))
    } else {
        (0..n).collect()
    };
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
        let shards: Vec<Vec<usize>> = (0..world).map(|r| shard(n, world, r, 5, 0, true)).collect();
        assert!(shards.iter().all(|s| s.len() == 4), "{shards:?}");
        let all: BTreeSet<usize> = shards.iter().flatten().copied().collect();
        assert_eq!(all.len(), n, "every example is seen");
        assert_eq!(
            shards.iter().map(Vec::len).sum::<usize>(),
            12,
            "2 padded from the head"
        );
        assert_eq!(
            shard(n, world, 1, 5, 0, true),
            shards[1],
            "same seed, same order"
        );
        assert_ne!(
            shard(n, world, 1, 5, 1, true),
            shards[1],
            "a new order every epoch"
        );
        assert_eq!(shard(4, 2, 1, 5, 0, false), [1, 3]);
    }
}
