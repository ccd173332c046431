//! ResNets for image classification: from a torchvision or Hugging Face checkpoint
//! directory, an earlier run's output, or `random:resnet18` (random initialisation, for
//! pretraining); exported with torchvision tensor names and the image settings.

use std::path::Path;

use candle_core::{DType, Device};
use ringmaster_crds::TrainingJobSpec;
use ringmaster_nn::models::resnet::checkpoint::ResNetCheckpoint;
use ringmaster_nn::models::resnet::{ResNet, ResNetConfig};

use super::{Model, Network, Purpose, check_teacher_labels, label_maps, write_json};
use crate::data::augment::{MEAN, STD};
use crate::error::{Error, Result};
use crate::params::{ModelVars, NamePatterns, default_buffer_patterns};

/// `random:resnet18` (or `random:resnet-18`): the depth of a randomly initialised ResNet.
fn random_depth(source: &str) -> Option<Result<usize>> {
    let name = source.strip_prefix("random:")?;
    let depth = name
        .strip_prefix("resnet")
        .map(|d| d.trim_start_matches('-'))
        .and_then(|d| d.parse().ok());
    Some(depth.ok_or_else(|| {
        Error::Config(format!(
            "spec.model.source {source:?}: random initialisation is written random:resnet18 \
             (or 34, 50, 101, 152)"
        ))
    }))
}

pub(super) fn load(
    spec: &TrainingJobSpec,
    source: &str,
    labels: &[String],
    purpose: Purpose,
) -> Result<Model> {
    let num_classes = labels.len();
    let frozen: Vec<String> = match purpose {
        Purpose::Teach => vec!["*".into()],
        Purpose::Train => spec.model.freeze.clone(),
    };
    let vars = ModelVars::new(NamePatterns::parse(&frozen)?, default_buffer_patterns())
        .seeded(spec.training.seed);
    let vb = vars.var_builder(DType::F32, &Device::Cpu);
    if let Some(depth) = random_depth(source) {
        if purpose == Purpose::Teach {
            return Err(Error::Config(
                "spec.training.distillation.teacher: a teacher needs trained weights, not random:"
                    .into(),
            ));
        }
        let config = ResNetConfig::new(depth?, num_classes)?;
        let network = ResNet::new(&config, vb)?;
        return Ok(Model {
            network: Network::ResNet(Box::new(network)),
            vars,
            tokenizer: None,
            source_dir: None,
        });
    }
    let source_dir = crate::source::resolve(source)?;
    let checkpoint = ResNetCheckpoint::read(
        &source_dir.join("model.safetensors"),
        num_classes,
        &Device::Cpu,
    )?;
    if purpose == Purpose::Teach {
        if !checkpoint.has_head() {
            return Err(Error::Config(format!(
                "spec.training.distillation.teacher {}: the checkpoint has no {num_classes}-class head",
                source_dir.display()
            )));
        }
        check_teacher_labels(&source_dir, labels)?;
    }
    let network = ResNet::new(&checkpoint.config, vb)?;
    checkpoint.fill(vars.varmap())?;
    Ok(Model {
        network: Network::ResNet(Box::new(network)),
        vars,
        tokenizer: None,
        source_dir: Some(source_dir),
    })
}

/// A config naming the architecture, the labels and the input the model expects.
pub(super) fn export(
    network: &ResNet,
    dir: &Path,
    labels: &[String],
    spec: &TrainingJobSpec,
) -> Result<()> {
    let config = network.config();
    let (id2label, label2id) = label_maps(labels);
    let size = spec.data.image_size;
    write_json(
        &dir.join("config.json"),
        &serde_json::json!({
            "model_type": "resnet",
            "architecture": format!("resnet{}", config.depth),
            "depths": config.blocks,
            "layer_type": match config.block {
                ringmaster_nn::models::resnet::BlockKind::Basic => "basic",
                ringmaster_nn::models::resnet::BlockKind::Bottleneck => "bottleneck",
            },
            "weight_layout": "torchvision",
            "num_labels": labels.len(),
            "id2label": id2label,
            "label2id": label2id,
            "image_size": size,
        }),
    )?;
    // The Hugging Face image-processor file: how to turn a picture into the input.
    write_json(
        &dir.join("preprocessor_config.json"),
        &serde_json::json!({
            "do_resize": true,
            "size": {"height": size, "width": size},
            "do_normalize": true,
            "image_mean": MEAN,
            "image_std": STD,
        }),
    )
}
