//! The network a TrainingJob trains (BERT for text, ResNet for images), loaded from its
//! source with the spec's head, frozen layers and student size; its forward pass over
//! either kind of batch; and its export as a servable directory.

mod bert;
mod resnet;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{ModuleT, Tensor};
use ringmaster_crds::{Architecture, TrainingJobSpec};
use ringmaster_nn::models::bert::BertForSequenceClassification;
use ringmaster_nn::models::resnet::ResNet;
use tokenizers::Tokenizer;

use crate::data::batches::Input;
use crate::error::{Error, Result};
use crate::params::ModelVars;

pub enum Network {
    Bert(Box<BertForSequenceClassification>),
    ResNet(Box<ResNet>),
}

pub struct Model {
    pub network: Network,
    pub vars: ModelVars,
    /// BERT's tokenizer, truncating to the spec's maximum length.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The directory the weights came from (None: random initialisation).
    pub source_dir: Option<PathBuf>,
}

/// What a model is loaded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The model being trained: the spec's freeze patterns and student size, a new head
    /// when the source has none for these labels.
    Train,
    /// A distillation teacher: every variable frozen, its own head required.
    Teach,
}

impl Model {
    /// Loads `source` (the spec's model, or its teacher) with a head for `labels`.
    pub fn load(
        spec: &TrainingJobSpec,
        source: &str,
        labels: &[String],
        purpose: Purpose,
    ) -> Result<Self> {
        match spec.model.architecture {
            Architecture::Bert => bert::load(spec, source, labels, purpose),
            Architecture::Resnet => resnet::load(spec, source, labels, purpose),
        }
    }

    /// `(batch, classes)` logits; `train` turns dropout and batch statistics on.
    pub fn logits(&self, input: &Input, train: bool) -> Result<Tensor> {
        match (&self.network, input) {
            (Network::Bert(bert), Input::Text(text)) => Ok(bert.forward_t(text, train)?.logits),
            (Network::ResNet(resnet), Input::Images(images)) => {
                Ok(resnet.forward_t(images, train)?)
            }
            _ => Err(Error::Config(
                "the data's kind (text or images) does not fit the model's architecture".into(),
            )),
        }
    }

    /// Writes a servable directory: weights, config with the label names, tokenizer or
    /// image settings, `labels.json`.
    pub fn export(&self, dir: &Path, labels: &[String], spec: &TrainingJobSpec) -> Result<()> {
        let tensors: std::collections::HashMap<String, Tensor> = self
            .vars
            .all()
            .into_iter()
            .map(|v| (v.name, v.var.as_tensor().clone()))
            .collect();
        let weights = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &weights).map_err(|e| Error::Checkpoint {
            path: weights.clone(),
            detail: e.to_string(),
        })?;
        write_json(&dir.join("labels.json"), &serde_json::json!(labels))?;
        match &self.network {
            Network::Bert(_) => bert::export(self, dir, labels, spec),
            Network::ResNet(resnet) => resnet::export(resnet, dir, labels, spec),
        }
    }
}

/// The `id2label` / `label2id` maps of a Hugging Face config.
fn label_maps(labels: &[String]) -> (serde_json::Value, serde_json::Value) {
    let id2label: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), i.into()))
        .collect();
    (id2label.into(), label2id.into())
}

/// A teacher must predict the student's classes, in the same order: a source that names
/// its labels (`labels.json` from a ringmaster run, or `id2label` in `config.json`) must
/// name ours.
fn check_teacher_labels(dir: &Path, labels: &[String]) -> Result<()> {
    let named: Option<Vec<String>> = std::fs::read(dir.join("labels.json"))
        .ok()
        .and_then(|raw| serde_json::from_slice(&raw).ok())
        .or_else(|| {
            let raw = std::fs::read(dir.join("config.json")).ok()?;
            let config: serde_json::Value = serde_json::from_slice(&raw).ok()?;
            let map = config.get("id2label")?.as_object()?;
            (0..map.len())
                .map(|i| map.get(&i.to_string())?.as_str().map(str::to_string))
                .collect()
        });
    match named {
        Some(named) if named != labels => Err(Error::Config(format!(
            "spec.training.distillation.teacher {}: the teacher predicts {named:?}, the \
             student {labels:?}; a teacher needs the same labels in the same order",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

pub(crate) fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serialises");
    std::fs::write(path, text).map_err(|source| Error::Io {
        what: "writing",
        path: path.to_path_buf(),
        source,
    })
}
