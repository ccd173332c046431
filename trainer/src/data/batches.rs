//! Tokenised batches, padded to the longest text of each batch (never to a fixed length),
//! built on a background thread one batch ahead of the step that consumes them.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use candle_core::{Device, Tensor};
use ringmaster_nn::models::bert::BertInput;
use tokenizers::Tokenizer;

use super::Example;
use crate::error::{Error, Result};

/// Batches built ahead of the step.
const PREFETCH: usize = 2;

/// One training or evaluation batch.
pub struct TextBatch {
    pub input: BertInput,
    /// u32 class indices, (batch,).
    pub labels: Tensor,
    pub size: usize,
}

/// Sets truncation to `max_len` tokens ([CLS] and [SEP] included).
pub fn truncate_to(tokenizer: &mut Tokenizer, max_len: usize) -> Result<()> {
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length: max_len,
            ..Default::default()
        }))
        .map_err(|e| Error::Config(format!("cannot truncate to {max_len} tokens: {e}")))?;
    Ok(())
}

/// Builds the batches of `order` (indices into `examples`), `batch_size` at a time, on a
/// background thread; yields them in order.
pub fn stream(
    tokenizer: Arc<Tokenizer>,
    examples: Arc<Vec<Example>>,
    order: Vec<usize>,
    batch_size: usize,
) -> Receiver<Result<TextBatch>> {
    let (tx, rx) = sync_channel(PREFETCH);
    std::thread::spawn(move || {
        for chunk in order.chunks(batch_size.max(1)) {
            let batch = build(&tokenizer, &examples, chunk);
            if tx.send(batch).is_err() {
                return; // the consumer stopped (an error, or the end of training)
            }
        }
    });
    rx
}

fn build(tokenizer: &Tokenizer, examples: &[Example], indices: &[usize]) -> Result<TextBatch> {
    let texts: Vec<&str> = indices.iter().map(|&i| examples[i].text.as_str()).collect();
    let encodings = tokenizer
        .encode_batch(texts, true)
        .map_err(|e| Error::Config(format!("tokenising a batch: {e}")))?;
    let longest = encodings
        .iter()
        .map(|e| e.get_ids().len())
        .max()
        .unwrap_or(1);
    let pad = tokenizer.token_to_id("[PAD]").unwrap_or(0);
    let n = indices.len();
    let (mut ids, mut mask, mut types) = (
        Vec::with_capacity(n * longest),
        Vec::with_capacity(n * longest),
        Vec::with_capacity(n * longest),
    );
    for e in &encodings {
        let len = e.get_ids().len();
        ids.extend(
            e.get_ids()
                .iter()
                .copied()
                .chain(std::iter::repeat_n(pad, longest - len)),
        );
        types.extend(
            e.get_type_ids()
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, longest - len)),
        );
        mask.extend((0..longest).map(|p| u32::from(p < len)));
    }
    let labels: Vec<u32> = indices.iter().map(|&i| examples[i].label as u32).collect();
    let cpu = Device::Cpu;
    Ok(TextBatch {
        input: BertInput {
            input_ids: Tensor::from_vec(ids, (n, longest), &cpu)?,
            token_type_ids: Some(Tensor::from_vec(types, (n, longest), &cpu)?),
            attention_mask: Some(Tensor::from_vec(mask, (n, longest), &cpu)?),
        },
        labels: Tensor::from_vec(labels, n, &cpu)?,
        size: n,
    })
}
