//! Loading BERT checkpoints in the layouts users have, and clear errors for the ones
//! that do not fit. Uses small checkpoints written here; no downloads.

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ringmaster_nn::models::bert::{
    BertConfig, BertForSequenceClassification, BertInput, Pooling, load_sequence_classifier,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

const CONFIG: &str = r#"{"model_type": "bert", "architectures": ["BertModel"],
    "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    "intermediate_size": 24, "hidden_act": "gelu", "max_position_embeddings": 12,
    "type_vocab_size": 2, "layer_norm_eps": 1e-12}"#;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("bert-ckpt-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), CONFIG).unwrap();
        Dir(dir)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A random `BertForSequenceClassification` and its tensors under HF names.
fn reference() -> (BertForSequenceClassification, HashMap<String, Tensor>) {
    let config = BertConfig::from_json(CONFIG).unwrap();
    let varmap = VarMap::new();
    let model = BertForSequenceClassification::new(
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
        &config,
        2,
        Pooling::Cls,
    )
    .unwrap();
    let tensors = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    (model, tensors)
}

fn write(dir: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, dir.join("model.safetensors")).unwrap();
}

fn logits(model: &BertForSequenceClassification) -> Vec<Vec<f32>> {
    let input = BertInput {
        input_ids: Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu).unwrap(),
        token_type_ids: None,
        attention_mask: None,
    };
    model
        .forward_t(&input, false)
        .unwrap()
        .logits
        .to_vec2()
        .unwrap()
}

fn load(dir: &Path) -> ringmaster_nn::Result<BertForSequenceClassification> {
    load_sequence_classifier(
        dir,
        2,
        Pooling::Cls,
        &VarMap::new(),
        DType::F32,
        &Device::Cpu,
    )
    .map(|(_, m)| m)
}

#[test]
fn loads_with_and_without_the_bert_prefix_and_with_gamma_beta_layer_norms() {
    let (model, tensors) = reference();
    let expected = logits(&model);
    let bare_gamma_beta: HashMap<String, Tensor> = tensors
        .iter()
        .map(|(n, t)| {
            let n = n.strip_prefix("bert.").unwrap_or(n);
            let n = n
                .replace("LayerNorm.weight", "LayerNorm.gamma")
                .replace("LayerNorm.bias", "LayerNorm.beta");
            (n, t.clone())
        })
        .collect();
    for (layout, tensors) in [("hf", &tensors), ("bare", &bare_gamma_beta)] {
        let dir = Dir::new(layout);
        write(&dir.0, tensors);
        assert_eq!(logits(&load(&dir.0).unwrap()), expected, "layout {layout}");
    }
}

#[test]
fn a_backbone_without_a_head_gets_a_new_head_sized_to_the_task() {
    let (model, mut tensors) = reference();
    tensors.retain(|n, _| !n.starts_with("classifier."));
    let dir = Dir::new("headless");
    write(&dir.0, &tensors);
    let varmap = VarMap::new();
    let (_, loaded) =
        load_sequence_classifier(&dir.0, 5, Pooling::Cls, &varmap, DType::F32, &Device::Cpu)
            .unwrap();
    assert_eq!(
        varmap.data().lock().unwrap()["classifier.weight"].dims(),
        [5, 16]
    );
    let input = BertInput {
        input_ids: Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu).unwrap(),
        token_type_ids: None,
        attention_mask: None,
    };
    let pooled = |m: &BertForSequenceClassification| {
        m.forward_t(&input, false)
            .unwrap()
            .pooled
            .to_vec2::<f32>()
            .unwrap()
    };
    assert_eq!(
        pooled(&loaded),
        pooled(&model),
        "the backbone and pooler must still come from the file"
    );
}

#[test]
fn a_missing_tensor_is_named_with_the_file() {
    let (_, mut tensors) = reference();
    tensors.remove("bert.encoder.layer.1.attention.self.key.bias");
    let dir = Dir::new("missing");
    write(&dir.0, &tensors);
    let err = load(&dir.0).err().unwrap().to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("encoder.layer.1.attention.self.key.bias")
            && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn a_shape_that_does_not_fit_config_json_is_named_with_both_files() {
    let (_, mut tensors) = reference();
    tensors.insert(
        "bert.encoder.layer.0.intermediate.dense.weight".into(),
        Tensor::zeros((32, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let dir = Dir::new("shape");
    write(&dir.0, &tensors);
    let err = load(&dir.0).err().unwrap().to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("intermediate.dense.weight")
            && err.contains("[32, 16]")
            && err.contains("config.json")
            && err.contains("[24, 16]"),
        "{err}"
    );
}

#[test]
fn an_unreadable_checkpoint_and_an_unknown_activation_are_errors_naming_the_file() {
    let dir = Dir::new("garbage");
    std::fs::write(dir.0.join("model.safetensors"), b"not safetensors").unwrap();
    let err = load(&dir.0).err().unwrap().to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    std::fs::write(
        dir.0.join("config.json"),
        CONFIG.replace("\"gelu\"", "\"silu\""),
    )
    .unwrap();
    let err = load(&dir.0).err().unwrap().to_string();
    assert!(err.contains("config.json") && err.contains("silu"), "{err}");
}
