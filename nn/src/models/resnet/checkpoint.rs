//! Loading ResNet checkpoints in torchvision or Hugging Face layout.
//!
//! The model's variables carry torchvision names; a [`WeightLayout`] maps each to the
//! name it has in the file, so errors name the tensor as the file spells it.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::{BlockKind, ResNet, ResNetConfig};
use crate::models::batch_norm::NUM_BATCHES_TRACKED;
use crate::{Error, Result};

/// How tensors are named in a checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightLayout {
    /// `conv1.weight`, `layer1.0.bn1.weight`, `layer2.0.downsample.0.weight`, `fc.weight`.
    Torchvision,
    /// `microsoft/resnet-*`: `resnet.embedder.embedder.convolution.weight`,
    /// `resnet.encoder.stages.0.layers.0.layer.0.normalization.weight`, `classifier.1.weight`.
    /// `prefix` is `resnet.` for `ResNetForImageClassification`, empty for `ResNetModel`.
    HuggingFace { prefix: String },
}

impl WeightLayout {
    /// Recognises the layout from the stem convolution's name.
    pub fn detect<T>(tensors: &HashMap<String, T>) -> Option<Self> {
        if tensors.contains_key("conv1.weight") {
            return Some(Self::Torchvision);
        }
        ["resnet.", ""]
            .into_iter()
            .map(|prefix| Self::HuggingFace {
                prefix: prefix.to_string(),
            })
            .find(|layout| tensors.contains_key(&layout.file_name("conv1.weight")))
    }

    /// The name in this layout of the variable with torchvision name `name`.
    pub fn file_name(&self, name: &str) -> String {
        let Self::HuggingFace { prefix } = self else {
            return name.to_string();
        };
        let parts: Vec<&str> = name.split('.').collect();
        let stem = format!("{prefix}embedder.embedder");
        let renamed = match parts.as_slice() {
            ["conv1", rest @ ..] => Some(format!("{stem}.convolution.{}", rest.join("."))),
            ["bn1", rest @ ..] => Some(format!("{stem}.normalization.{}", rest.join("."))),
            ["fc", rest @ ..] => Some(format!("classifier.1.{}", rest.join("."))),
            [layer, block, module, rest @ ..] => hf_block_name(prefix, layer, block, module, rest),
            _ => None,
        };
        renamed.unwrap_or_else(|| name.to_string())
    }
}

/// `layer{s}.{b}.{conv|bn}{k}.*` / `layer{s}.{b}.downsample.{0|1}.*` in HF names.
fn hf_block_name(
    prefix: &str,
    layer: &str,
    block: &str,
    module: &str,
    rest: &[&str],
) -> Option<String> {
    let stage = layer
        .strip_prefix("layer")?
        .parse::<usize>()
        .ok()?
        .checked_sub(1)?;
    let base = format!("{prefix}encoder.stages.{stage}.layers.{block}");
    let (part, kind, rest) = match (module, rest) {
        ("downsample", ["0", rest @ ..]) => ("shortcut".to_string(), "convolution", rest),
        ("downsample", ["1", rest @ ..]) => ("shortcut".to_string(), "normalization", rest),
        (module, rest) => {
            let (kind, index) = if let Some(k) = module.strip_prefix("conv") {
                ("convolution", k)
            } else {
                ("normalization", module.strip_prefix("bn")?)
            };
            let index = index.parse::<usize>().ok()?.checked_sub(1)?;
            (format!("layer.{index}"), kind, rest)
        }
    };
    Some(format!("{base}.{part}.{kind}.{}", rest.join(".")))
}

/// Reads the architecture from the blocks present in the file.
fn infer_config(
    tensors: &HashMap<String, Tensor>,
    layout: &WeightLayout,
    file: &Path,
    num_classes: usize,
) -> Result<ResNetConfig> {
    let has = |name: String| tensors.contains_key(&layout.file_name(&name));
    let block = if has("layer1.0.conv3.weight".into()) {
        BlockKind::Bottleneck
    } else {
        BlockKind::Basic
    };
    let mut blocks = [0; 4];
    for (stage, count) in blocks.iter_mut().enumerate() {
        *count = (0..)
            .take_while(|i| has(format!("layer{}.{i}.conv1.weight", stage + 1)))
            .count();
    }
    ResNetConfig::from_blocks(blocks, block, num_classes).map_err(|e| Error::Config {
        file: file.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The tensors cannot tell every architecture variant apart: a Hugging Face
/// `config.json` beside the weights that asks for one this model does not implement
/// (another activation, stride on the 1x1 convolution) is an error, not a silently
/// different network.
fn check_hugging_face_config(weights: &Path) -> Result<()> {
    let path = weights.with_file_name("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let config_error = |reason: String| Error::Config {
        file: path.clone(),
        reason,
    };
    let config: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| config_error(format!("invalid JSON: {e}")))?;
    if let Some(act) = config.get("hidden_act").and_then(|v| v.as_str())
        && act != "relu"
    {
        return Err(config_error(format!(
            "hidden_act `{act}` is not supported (ResNet here uses relu)"
        )));
    }
    for flag in ["downsample_in_bottleneck", "downsample_in_first_stage"] {
        if config.get(flag).and_then(|v| v.as_bool()) == Some(true) {
            return Err(config_error(format!(
                "`{flag}: true` is not supported (torchvision layout: stride on the 3x3 \
                 convolution, first stage not downsampled)"
            )));
        }
    }
    Ok(())
}

/// A ResNet and the variables it trains, loaded from a safetensors checkpoint.
pub struct LoadedResNet {
    pub model: ResNet,
    pub varmap: VarMap,
    pub layout: WeightLayout,
}

/// Loads a torchvision or Hugging Face ResNet checkpoint with a head of `num_classes`
/// (see [`ResNetCheckpoint`]). Variables are F32 (BatchNorm counts I64, as in torch) and
/// keep torchvision names, so a saved `VarMap` is a torchvision file.
pub fn load_resnet(file: &Path, num_classes: usize, device: &Device) -> Result<LoadedResNet> {
    let checkpoint = ResNetCheckpoint::read(file, num_classes, device)?;
    let varmap = VarMap::new();
    let model = ResNet::new(
        &checkpoint.config,
        VarBuilder::from_varmap(&varmap, DType::F32, device),
    )?;
    checkpoint.fill(&varmap)?;
    Ok(LoadedResNet {
        model,
        varmap,
        layout: checkpoint.layout,
    })
}

/// A ResNet checkpoint read from a safetensors file: its layout, the architecture its
/// tensors imply and the tensors, ready to fill the variables of a model built from
/// `config` (over any `VarMap`, so a trainer can give variables its own roles).
pub struct ResNetCheckpoint {
    pub config: ResNetConfig,
    pub layout: WeightLayout,
    file: std::path::PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl ResNetCheckpoint {
    /// The architecture (depth, block kind) comes from the tensors present; errors name
    /// the file.
    pub fn read(file: &Path, num_classes: usize, device: &Device) -> Result<Self> {
        let tensors = candle_core::safetensors::load(file, device).map_err(|e| Error::Config {
            file: file.to_path_buf(),
            reason: format!("cannot read safetensors: {e}"),
        })?;
        let layout = WeightLayout::detect(&tensors).ok_or_else(|| Error::Config {
            file: file.to_path_buf(),
            reason: "not a ResNet checkpoint: found neither `conv1.weight` (torchvision) nor \
                     `resnet.embedder.embedder.convolution.weight` (Hugging Face)"
                .into(),
        })?;
        if matches!(layout, WeightLayout::HuggingFace { .. }) {
            check_hugging_face_config(file)?;
        }
        let config = infer_config(&tensors, &layout, file, num_classes)?;
        Ok(Self {
            config,
            layout,
            file: file.to_path_buf(),
            tensors,
        })
    }

    /// Whether the file holds a head for `config.num_classes` classes (else `fill` leaves
    /// the head's fresh initialisation).
    pub fn has_head(&self) -> bool {
        self.tensors
            .get(&self.layout.file_name("fc.weight"))
            .is_some_and(|w| w.dims().first() == Some(&self.config.num_classes))
    }

    /// Sets every variable of `varmap` (a ResNet built from `self.config`, torchvision
    /// names) from the file. A head whose class count differs, or a file without a head,
    /// leaves the fresh head. A missing BatchNorm count starts at zero. Any other missing
    /// tensor or wrong shape is an error naming the file and tensor.
    pub fn fill(&self, varmap: &VarMap) -> Result<()> {
        let (file, config) = (&self.file, &self.config);
        let keep_head = self.has_head();
        if !keep_head {
            let had = self
                .tensors
                .get(&self.layout.file_name("fc.weight"))
                .map_or("no head".to_string(), |w| {
                    format!("a head of shape {:?}", w.shape())
                });
            tracing::info!(
                file = %file.display(),
                "checkpoint has {had}; initialised a new {}-class head",
                config.num_classes
            );
        }
        let vars = varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?
            .clone();
        for (name, var) in vars {
            if name.starts_with("fc.") && !keep_head {
                continue;
            }
            let tensor_name = self.layout.file_name(&name);
            let checkpoint_error = |reason: String| Error::Checkpoint {
                file: file.to_path_buf(),
                tensor: tensor_name.clone(),
                reason,
            };
            let tensor = match self.tensors.get(&tensor_name) {
                Some(tensor) => tensor,
                // Files saved before PyTorch 0.4.1 (torchvision's first ImageNet weights)
                // have no count; it starts from zero.
                None if name.ends_with(NUM_BATCHES_TRACKED) => continue,
                None => {
                    return Err(checkpoint_error(format!(
                        "missing (needed by ResNet-{})",
                        config.depth
                    )));
                }
            };
            if tensor.shape() != var.shape() {
                return Err(checkpoint_error(format!(
                    "shape {:?}, ResNet-{} expects {:?}",
                    tensor.shape(),
                    config.depth,
                    var.shape()
                )));
            }
            var.set(&tensor.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}
