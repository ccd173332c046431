//! Loading Hugging Face BERT checkpoints (`config.json` + `model.safetensors`) and
//! their tokenizer, with errors that name the file and tensor.

use super::config::BertConfig;
use super::model::{BertForSequenceClassification, Pooling};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::Path;

/// Builds a classifier whose variables live in `varmap` and fills them from the
/// checkpoint directory `dir` (`config.json`, `model.safetensors`).
///
/// Tensor names may carry the `bert.` prefix or not and LayerNorm parameters may be
/// `weight`/`bias` or `gamma`/`beta`. The head (`classifier.*`, and `bert.pooler.*`
/// which some checkpoints lack) is initialised when absent; every other tensor must be
/// present with the shape `config.json` implies.
pub fn load_sequence_classifier(
    dir: &Path,
    num_labels: usize,
    pooling: Pooling,
    varmap: &VarMap,
    dtype: DType,
    device: &Device,
) -> Result<(BertConfig, BertForSequenceClassification)> {
    let config_file = dir.join("config.json");
    let config = BertConfig::from_file(&config_file)?;
    let vb = VarBuilder::from_varmap(varmap, dtype, device);
    let model = BertForSequenceClassification::new(vb, &config, num_labels, pooling)?;
    load_weights(
        varmap,
        &dir.join("model.safetensors"),
        &config_file,
        |name| name.starts_with("classifier.") || name.starts_with("bert.pooler."),
    )?;
    Ok((config, model))
}

/// Sets every variable of `varmap` from the safetensors `file`; variables for which
/// `optional` holds keep their initial value when the file lacks them.
pub fn load_weights(
    varmap: &VarMap,
    file: &Path,
    config_file: &Path,
    optional: impl Fn(&str) -> bool,
) -> Result<()> {
    let tensors = candle_core::safetensors::load(file, &Device::Cpu).map_err(|e| Error::File {
        file: file.to_owned(),
        reason: format!("cannot read safetensors: {e}"),
    })?;
    let by_model_name: HashMap<String, (String, Tensor)> = tensors
        .into_iter()
        .map(|(name, t)| (model_name(&name), (name, t)))
        .collect();
    let vars = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned by a panic elsewhere".into()))?;
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let Some((file_name, tensor)) = by_model_name.get(name.as_str()) else {
            if optional(name) {
                tracing::info!(tensor = %name, file = %file.display(), "not in the checkpoint: newly initialised");
                continue;
            }
            return Err(Error::Checkpoint {
                file: file.to_owned(),
                tensor: name.clone(),
                reason: format!(
                    "missing (looked for `{name}`, without the `bert.` prefix too, and `gamma`/`beta` for LayerNorm)"
                ),
            });
        };
        if tensor.dims() != var.dims() {
            return Err(Error::Checkpoint {
                file: file.to_owned(),
                tensor: file_name.clone(),
                reason: format!(
                    "shape {:?} does not fit {}, which implies {:?}",
                    tensor.dims(),
                    config_file.display(),
                    var.dims()
                ),
            });
        }
        let value = tensor.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&value)?;
    }
    Ok(())
}

/// The variable name a checkpoint tensor maps to: `bert.`-prefixed backbone, and the
/// `weight`/`bias` names of LayerNorm.
fn model_name(name: &str) -> String {
    let name = match name.strip_suffix("LayerNorm.gamma") {
        Some(stem) => format!("{stem}LayerNorm.weight"),
        None => match name.strip_suffix("LayerNorm.beta") {
            Some(stem) => format!("{stem}LayerNorm.bias"),
            None => name.to_owned(),
        },
    };
    if name.starts_with("bert.") || name.starts_with("classifier.") {
        name
    } else {
        format!("bert.{name}")
    }
}

/// Loads a `tokenizer.json` for `config`: fixed padding is turned off (a batch is padded
/// to its longest sequence by the caller), truncation is capped at the model's maximum
/// positions, and a vocabulary larger than the embedding matrix is an error.
pub fn load_tokenizer(
    file: &Path,
    config: &BertConfig,
    config_file: &Path,
) -> Result<tokenizers::Tokenizer> {
    let mut tokenizer = tokenizers::Tokenizer::from_file(file).map_err(|e| Error::File {
        file: file.to_owned(),
        reason: format!("cannot load tokenizer: {e}"),
    })?;
    check_vocabulary(tokenizer.get_vocab_size(true), file, config, config_file)?;
    tokenizer.with_padding(None);
    let max_length = tokenizer
        .get_truncation()
        .map_or(config.max_position_embeddings, |t| {
            t.max_length.min(config.max_position_embeddings)
        });
    tokenizer
        .with_truncation(Some(tokenizers::TruncationParams {
            max_length,
            ..Default::default()
        }))
        .map_err(|e| Error::File {
            file: file.to_owned(),
            reason: format!("cannot set truncation to {max_length}: {e}"),
        })?;
    Ok(tokenizer)
}

/// Token ids index the word embeddings: every id the tokenizer can produce must have a row.
pub fn check_vocabulary(
    vocab_size: usize,
    tokenizer_file: &Path,
    config: &BertConfig,
    config_file: &Path,
) -> Result<()> {
    if vocab_size > config.vocab_size {
        return Err(Error::Vocabulary {
            tokenizer: tokenizer_file.to_owned(),
            vocab_size,
            config: config_file.to_owned(),
            embeddings: config.vocab_size,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::model_name;

    #[test]
    fn checkpoint_names_map_to_model_names() {
        for (file, model) in [
            (
                "embeddings.word_embeddings.weight",
                "bert.embeddings.word_embeddings.weight",
            ),
            (
                "bert.embeddings.LayerNorm.gamma",
                "bert.embeddings.LayerNorm.weight",
            ),
            (
                "encoder.layer.0.output.LayerNorm.beta",
                "bert.encoder.layer.0.output.LayerNorm.bias",
            ),
            ("classifier.weight", "classifier.weight"),
        ] {
            assert_eq!(model_name(file), model);
        }
    }
}
