//! Batches of either kind of example, built on a background thread a few batches ahead of
//! the step that consumes them, so a step does not wait for tokenising, decoding or
//! augmenting.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use candle_core::Tensor;
use ringmaster_nn::models::bert::BertInput;

use crate::error::Result;
use crate::rng::TrainRng;

/// Batches built ahead of the step.
const PREFETCH: usize = 2;

/// What the model reads.
pub enum Input {
    Text(BertInput),
    /// NCHW f32, normalised.
    Images(Tensor),
}

/// One training or evaluation batch.
pub struct Batch {
    pub input: Input,
    /// u32 class indices, (batch,).
    pub labels: Tensor,
    pub size: usize,
}

/// A labelled dataset that can build batches from example indices.
pub trait Examples: Send + Sync + 'static {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The class of example `index`.
    fn label(&self, index: usize) -> usize;
    /// The batch of `indices`; `augment` is this batch's random stream when training
    /// augments (None: evaluation, no randomness).
    fn batch(&self, indices: &[usize], augment: Option<TrainRng>) -> Result<Batch>;
}

/// Builds the batches of `order`, `batch_size` at a time, on a background thread; yields
/// them in order. With `augment_seed`, batch k is augmented from a stream seeded by
/// (seed, k), so a resumed epoch draws the same augmentations as an uninterrupted one
/// (`first_batch`: the index of the first batch in `order`).
pub fn stream(
    examples: Arc<dyn Examples>,
    order: Vec<usize>,
    batch_size: usize,
    augment_seed: Option<u64>,
    first_batch: u64,
) -> Receiver<Result<Batch>> {
    let (tx, rx) = sync_channel(PREFETCH);
    std::thread::spawn(move || {
        for (k, chunk) in order.chunks(batch_size.max(1)).enumerate() {
            let rng = augment_seed.map(|seed| batch_rng(seed, first_batch + k as u64));
            let batch = examples.batch(chunk, rng);
            if tx.send(batch).is_err() {
                return; // the consumer stopped (an error, or the end of training)
            }
        }
    });
    rx
}

fn batch_rng(seed: u64, batch: u64) -> TrainRng {
    let mut mix = TrainRng::new(seed ^ batch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    TrainRng::new(mix.next_u64())
}
