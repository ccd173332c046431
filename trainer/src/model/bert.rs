//! BERT sequence classifiers: loaded from a Hugging Face directory (optionally cut to its
//! first layers, a smaller student), exported so that
//! `transformers.AutoModelForSequenceClassification.from_pretrained` loads them.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use ringmaster_crds::{Pooling, TrainingJobSpec};
use ringmaster_nn::models::bert::{self, BertConfig, BertForSequenceClassification};

use super::{Model, Network, Purpose, check_teacher_labels, label_maps, write_json};
use crate::data::text::truncate_to;
use crate::error::{Error, Result};
use crate::params::{ModelVars, NamePatterns, default_buffer_patterns};

/// Files besides the weights that make a directory servable.
const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
];

pub(super) fn load(
    spec: &TrainingJobSpec,
    source: &str,
    labels: &[String],
    purpose: Purpose,
) -> Result<Model> {
    let source_dir = crate::source::resolve(source)?;
    let config_file = source_dir.join("config.json");
    let mut config = BertConfig::from_file(&config_file)?;
    let frozen: Vec<String> = match purpose {
        Purpose::Teach => {
            check_teacher_labels(&source_dir, labels)?;
            vec!["*".into()]
        }
        Purpose::Train => {
            if let Some(layers) = spec.model.layers {
                let layers = layers as usize;
                if layers > config.num_hidden_layers {
                    return Err(Error::Config(format!(
                        "spec.model.layers is {layers} but {} has {} layers",
                        config_file.display(),
                        config.num_hidden_layers
                    )));
                }
                config.num_hidden_layers = layers;
            }
            // Patterns are written against the encoder (`embeddings.*`) or against the
            // full names (`bert.embeddings.*`).
            spec.model
                .freeze
                .iter()
                .flat_map(|p| [p.clone(), format!("bert.{p}")])
                .collect()
        }
    };
    let vars = ModelVars::new(NamePatterns::parse(&frozen)?, default_buffer_patterns())
        .seeded(spec.training.seed);
    let pooling = match spec.model.pooling {
        Pooling::Cls => bert::Pooling::Cls,
        Pooling::Mean => bert::Pooling::Mean,
    };
    let classifier = BertForSequenceClassification::new(
        vars.var_builder(DType::F32, &Device::Cpu),
        &config,
        labels.len(),
        pooling,
    )?;
    bert::load_weights(
        vars.varmap(),
        &source_dir.join("model.safetensors"),
        &config_file,
        |name| match purpose {
            // A teacher without its head would teach noise.
            Purpose::Teach => name.starts_with("bert.pooler."),
            Purpose::Train => name.starts_with("classifier.") || name.starts_with("bert.pooler."),
        },
    )?;
    let mut tokenizer =
        bert::load_tokenizer(&source_dir.join("tokenizer.json"), &config, &config_file)?;
    let max_len = (spec.training.max_sequence_length as usize).min(config.max_position_embeddings);
    truncate_to(&mut tokenizer, max_len)?;
    Ok(Model {
        network: Network::Bert(Box::new(classifier)),
        vars,
        tokenizer: Some(Arc::new(tokenizer)),
        source_dir: Some(source_dir),
    })
}

/// The source's config with the label maps (and the student's layer count), and its
/// tokenizer files.
pub(super) fn export(
    model: &Model,
    dir: &Path,
    labels: &[String],
    spec: &TrainingJobSpec,
) -> Result<()> {
    let source_dir = model
        .source_dir
        .as_deref()
        .expect("BERT models are loaded from a directory");
    let source_config = source_dir.join("config.json");
    let raw = std::fs::read(&source_config).map_err(|source| Error::Io {
        what: "reading",
        path: source_config.clone(),
        source,
    })?;
    let mut config: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| Error::Config(format!("{}: {e}", source_config.display())))?;
    let (id2label, label2id) = label_maps(labels);
    config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    config["id2label"] = id2label;
    config["label2id"] = label2id;
    config["num_labels"] = labels.len().into();
    config["problem_type"] = "single_label_classification".into();
    if let Some(layers) = spec.model.layers {
        config["num_hidden_layers"] = layers.into();
    }
    // `ringmaster serve` pools and truncates as training did (transformers ignores the
    // keys).
    config["pooling"] = match spec.model.pooling {
        Pooling::Cls => "cls",
        Pooling::Mean => "mean",
    }
    .into();
    config["max_sequence_length"] = spec.training.max_sequence_length.into();
    write_json(&dir.join("config.json"), &config)?;
    for file in TOKENIZER_FILES {
        let from = source_dir.join(file);
        if from.is_file() {
            std::fs::copy(&from, dir.join(file)).map_err(|source| Error::Io {
                what: "copying",
                path: from.clone(),
                source,
            })?;
        }
    }
    Ok(())
}
