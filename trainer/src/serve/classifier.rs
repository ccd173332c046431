//! The served model: a BERT or ResNet classifier loaded from a servable directory (the
//! `best/` a run exports, any Hugging Face / torchvision checkpoint, an `hf://` source),
//! its preprocessing (tokenising; decoding and resizing images) and batched
//! probabilities. Variables load frozen, so a forward pass records no autograd graph.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, ModuleT, Tensor};
use ringmaster_nn::models::bert::{self, BertConfig, BertForSequenceClassification, Sequence};
use ringmaster_nn::models::resnet::ResNet;
use ringmaster_nn::models::resnet::checkpoint::ResNetCheckpoint;
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::protocol::{BadRequest, Image, Payload};
use crate::data::augment::{Pixels, Transform};
use crate::error::{Error, Result, io_error};
use crate::model::Network;
use crate::params::{ModelVars, NamePatterns, default_buffer_patterns};

/// One preprocessed input, ready to join a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Instance {
    /// Token ids and segment ids, unpadded.
    Text { ids: Vec<u32>, types: Vec<u32> },
    /// Normalised CHW values of the model's input size.
    Image(Vec<f32>),
}

enum Preprocess {
    Text(Box<Tokenizer>),
    Image(Transform),
}

pub struct Classifier {
    network: Network,
    preprocess: Preprocess,
    pub labels: Vec<String>,
    /// The first 12 hex digits of the weights' SHA-256: what `model_version` reports.
    pub version: String,
    pub dir: PathBuf,
}

/// `hf://org/name`, a directory with `model.safetensors`, or the output directory of
/// `ringmaster launch` / a TrainingJob (its `best/`).
pub fn resolve_model_dir(model: &str) -> Result<PathBuf> {
    if model.starts_with("hf://") {
        return crate::source::resolve(model);
    }
    let dir = Path::new(model);
    for candidate in [dir.to_path_buf(), dir.join("best")] {
        if candidate.join("model.safetensors").is_file() {
            return Ok(candidate);
        }
    }
    Err(Error::Config(format!(
        "--model {model}: neither {0}/model.safetensors nor {0}/best/model.safetensors \
         (the output directory of a run) exists",
        dir.display()
    )))
}

impl Classifier {
    /// Loads the model in `dir`; `labels` (when not empty) names the classes, else
    /// `labels.json` or the config's `id2label` do.
    pub fn load(dir: &Path, labels: &[String]) -> Result<Self> {
        let config: serde_json::Value = read_json(&dir.join("config.json"))?;
        let weights = dir.join("model.safetensors");
        let labels = class_names(dir, &config, labels)?;
        let vars =
            ModelVars::new(NamePatterns::parse(&["*"])?, default_buffer_patterns()).seeded(0);
        let vb = vars.var_builder(DType::F32, &Device::Cpu);
        let (network, preprocess) = if config["model_type"] == "resnet" {
            let checkpoint = ResNetCheckpoint::read(&weights, labels.len(), &Device::Cpu)?;
            require_head(checkpoint.has_head(), &weights, labels.len())?;
            let network = ResNet::new(&checkpoint.config, vb)?;
            checkpoint.fill(vars.varmap())?;
            let size = config["image_size"].as_u64().unwrap_or(224) as usize;
            let transform = Transform {
                size,
                augmentation: None,
            };
            (
                Network::ResNet(Box::new(network)),
                Preprocess::Image(transform),
            )
        } else {
            let config_file = dir.join("config.json");
            let bert_config = BertConfig::from_file(&config_file)?;
            // A run's export names its pooling; Hugging Face classifiers pool [CLS].
            let pooling = match config["pooling"].as_str() {
                Some("mean") => bert::Pooling::Mean,
                _ => bert::Pooling::Cls,
            };
            let network =
                BertForSequenceClassification::new(vb, &bert_config, labels.len(), pooling)?;
            let has_head = tensor_names(&weights)?
                .iter()
                .any(|name| name.ends_with("classifier.weight"));
            if !has_head {
                tracing::warn!(
                    weights = %weights.display(),
                    "the checkpoint has no classifier head: serving a random {}-class head \
                     (fine for benchmarks, meaningless predictions)",
                    labels.len()
                );
            }
            bert::load_weights(vars.varmap(), &weights, &config_file, |name| {
                name.starts_with("classifier.") || name.starts_with("bert.pooler.")
            })?;
            let mut tokenizer =
                bert::load_tokenizer(&dir.join("tokenizer.json"), &bert_config, &config_file)?;
            if let Some(trained) = config["max_sequence_length"].as_u64() {
                let longest = (trained as usize).min(bert_config.max_position_embeddings);
                crate::data::text::truncate_to(&mut tokenizer, longest)?;
            }
            (
                Network::Bert(Box::new(network)),
                Preprocess::Text(Box::new(tokenizer)),
            )
        };
        Ok(Self {
            network,
            preprocess,
            labels,
            version: weights_digest(&weights)?,
            dir: dir.to_path_buf(),
        })
    }

    pub fn takes_text(&self) -> bool {
        matches!(self.preprocess, Preprocess::Text(_))
    }

    /// Tokenises texts or decodes images; refuses inputs of the other kind or a size the
    /// model cannot take.
    pub fn prepare(&self, payload: &Payload) -> std::result::Result<Vec<Instance>, BadRequest> {
        match (&self.preprocess, payload) {
            (Preprocess::Text(tokenizer), Payload::Texts(texts)) => texts
                .iter()
                .map(|text| {
                    let encoding = tokenizer
                        .encode(text.as_str(), true)
                        .map_err(|e| BadRequest(format!("cannot tokenise the text: {e}")))?;
                    if encoding.get_ids().is_empty() {
                        return Err(BadRequest(format!("{text:?} tokenises to nothing")));
                    }
                    Ok(Instance::Text {
                        ids: encoding.get_ids().to_vec(),
                        types: encoding.get_type_ids().to_vec(),
                    })
                })
                .collect(),
            (Preprocess::Image(transform), Payload::Images(images)) => images
                .iter()
                .enumerate()
                .map(|(i, image)| prepare_image(transform, image, i).map(Instance::Image))
                .collect(),
            (Preprocess::Text(_), Payload::Images(_)) => Err(BadRequest(
                "this model classifies text; send strings".into(),
            )),
            (Preprocess::Image(_), Payload::Texts(_)) => Err(BadRequest(
                "this model classifies images; send images".into(),
            )),
        }
    }

    /// Class probabilities of each instance. Texts run unpadded, packed end to end, so
    /// each row equals the row of the same text run alone and short texts cost no more
    /// for sharing a batch with long ones.
    pub fn classify(&self, batch: &[&Instance]) -> Result<Vec<Vec<f32>>> {
        let n = batch.len();
        let logits = match (&self.network, &self.preprocess) {
            (Network::Bert(bert), Preprocess::Text(_)) => {
                let sequences = batch
                    .iter()
                    .map(|instance| match instance {
                        Instance::Text { ids, types } => Ok(Sequence { ids, types }),
                        Instance::Image(_) => Err(mixed_batch()),
                    })
                    .collect::<Result<Vec<_>>>()?;
                bert.classify_packed(&sequences)?
            }
            (Network::ResNet(resnet), Preprocess::Image(transform)) => {
                let mut values = Vec::with_capacity(n * transform.output_len());
                for instance in batch {
                    match instance {
                        Instance::Image(v) => values.extend_from_slice(v),
                        Instance::Text { .. } => return Err(mixed_batch()),
                    }
                }
                let (s, cpu) = (transform.size, Device::Cpu);
                resnet.forward_t(&Tensor::from_vec(values, (n, 3, s, s), &cpu)?, false)?
            }
            _ => return Err(mixed_batch()),
        };
        Ok(logits
            .to_vec2::<f32>()?
            .iter()
            .map(|row| softmax(row))
            .collect())
    }

    /// One input of the model's kind, for warming up before the server says ready.
    pub fn sample_input(&self) -> Instance {
        match &self.preprocess {
            Preprocess::Text(tokenizer) => {
                let encoding = tokenizer
                    .encode("warm up", true)
                    .expect("a constant ASCII text tokenises");
                Instance::Text {
                    ids: encoding.get_ids().to_vec(),
                    types: encoding.get_type_ids().to_vec(),
                }
            }
            Preprocess::Image(transform) => Instance::Image(vec![0.0; transform.output_len()]),
        }
    }
}

fn mixed_batch() -> Error {
    Error::Config("a batch mixed text and images (the server prepares inputs per model)".into())
}

fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}

fn prepare_image(
    transform: &Transform,
    image: &Image,
    index: usize,
) -> std::result::Result<Vec<f32>, BadRequest> {
    let mut out = vec![0f32; transform.output_len()];
    let resample = |width: usize, height: usize, channels: usize, data: &[u8], out: &mut [f32]| {
        if width == 0 || height == 0 || !matches!(channels, 1 | 3) {
            return Err(BadRequest(format!(
                "image {index} is {width}x{height} with {channels} channels; images need a \
                 size and 1 (grey) or 3 (RGB) channels"
            )));
        }
        let pixels = Pixels {
            width,
            height,
            channels,
            data,
        };
        transform.apply(&pixels, None, out);
        Ok(())
    };
    match image {
        Image::Encoded(bytes) => {
            let decoded = image::load_from_memory(bytes)
                .map_err(|e| BadRequest(format!("image {index} cannot be decoded: {e}")))?
                .to_rgb8();
            let (width, height) = (decoded.width() as usize, decoded.height() as usize);
            resample(width, height, 3, decoded.as_raw(), &mut out)?;
        }
        Image::Pixels {
            height,
            width,
            channels,
            data,
        } => resample(*width, *height, *channels, data, &mut out)?,
        Image::Tensor {
            channels,
            height,
            width,
            data,
        } => {
            let s = transform.size;
            if (*channels, *height, *width) != (3, s, s) {
                return Err(BadRequest(format!(
                    "image {index} is a [{channels}, {height}, {width}] tensor; this model \
                     takes [3, {s}, {s}] (or send pixels or a PNG/JPEG to be resized)"
                )));
            }
            out.copy_from_slice(data);
        }
    }
    Ok(out)
}

/// Class names: given, else `labels.json`, else the config's `id2label`.
fn class_names(dir: &Path, config: &serde_json::Value, given: &[String]) -> Result<Vec<String>> {
    if !given.is_empty() {
        return Ok(given.to_vec());
    }
    let labels_file = dir.join("labels.json");
    if labels_file.is_file() {
        let labels: Vec<String> = serde_json::from_value(read_json(&labels_file)?)
            .map_err(|e| Error::Config(format!("{}: {e}", labels_file.display())))?;
        if !labels.is_empty() {
            return Ok(labels);
        }
    }
    let id2label = config["id2label"].as_object();
    let named: Option<Vec<String>> = id2label.and_then(|map| {
        (0..map.len())
            .map(|i| map.get(&i.to_string())?.as_str().map(str::to_string))
            .collect()
    });
    match named {
        Some(labels) if !labels.is_empty() => Ok(labels),
        _ => Err(Error::Config(format!(
            "{}: the model names no classes (no labels.json, no id2label in config.json); \
             pass --labels a,b,...",
            dir.display()
        ))),
    }
}

fn require_head(has_head: bool, weights: &Path, classes: usize) -> Result<()> {
    if has_head {
        Ok(())
    } else {
        Err(Error::Config(format!(
            "{}: no {classes}-class head in the checkpoint; serve a fine-tuned model (or \
             give --labels with as many classes as its head has)",
            weights.display()
        )))
    }
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let raw = std::fs::read(path).map_err(io_error("reading", path))?;
    serde_json::from_slice(&raw).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
}

/// Tensor names from a safetensors header, without reading the tensors.
fn tensor_names(file: &Path) -> Result<Vec<String>> {
    let bad = |detail: String| Error::Checkpoint {
        path: file.to_path_buf(),
        detail,
    };
    let mut reader = std::fs::File::open(file).map_err(io_error("opening", file))?;
    let mut len = [0u8; 8];
    reader
        .read_exact(&mut len)
        .map_err(|e| bad(format!("no safetensors header: {e}")))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(bad(format!("a header of {len} bytes is not safetensors")));
    }
    let mut header = vec![0u8; len as usize];
    reader
        .read_exact(&mut header)
        .map_err(|e| bad(format!("truncated safetensors header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| bad(format!("bad safetensors header: {e}")))?;
    Ok(header
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect())
}

fn weights_digest(weights: &Path) -> Result<String> {
    let mut file = std::fs::File::open(weights).map_err(io_error("opening", weights))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(io_error("reading", weights))?;
    Ok(hasher
        .finalize()
        .iter()
        .take(6)
        .map(|b| format!("{b:02x}"))
        .collect())
}
