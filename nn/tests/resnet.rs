//! ResNet against torchvision (goldens from nn/scripts/resnet_golden.py), checkpoint
//! loading in both layouts, and gradient coverage of a training step.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, ModuleT, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ringmaster_nn::models::batch_norm::{NUM_BATCHES_TRACKED, is_batch_norm_buffer};
use ringmaster_nn::models::resnet::checkpoint::{WeightLayout, load_resnet};
use ringmaster_nn::models::resnet::{ResNet, ResNetConfig};
use serde::Deserialize;

#[derive(Deserialize)]
struct Golden {
    input_shape: Vec<usize>,
    input_scale: f64,
    input_tensor_index: u64,
    labels: Vec<u32>,
    tensor_names: Vec<String>,
    eval_logits: Vec<f32>,
    train_logits: Vec<f32>,
    train_loss: f32,
    running_stats: HashMap<String, HashMap<String, Vec<f32>>>,
    gradients: HashMap<String, Vec<f32>>,
}

fn golden() -> Golden {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/resnet18_golden.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Floats in [0, 1) from a 32-bit hash of (tensor index, element index): the same
/// formula as `unit_hash` in nn/scripts/resnet_golden.py.
fn unit_hash(tensor_index: u64, count: usize) -> impl Iterator<Item = f64> {
    const MASK: u64 = 0xFFFF_FFFF;
    (0..count as u64).map(move |i| {
        let mut h = i
            .wrapping_mul(2654435761)
            .wrapping_add((tensor_index + 1).wrapping_mul(2246822519))
            & MASK;
        h ^= h >> 15;
        h = h.wrapping_mul(2246822507) & MASK;
        h ^= h >> 13;
        h as f64 / 4294967296.0
    })
}

/// `deterministic_values` of the golden script.
fn deterministic_values(name: &str, tensor_index: u64, shape: &[usize]) -> Result<Tensor> {
    let count: usize = shape.iter().product();
    let leaf = name.rsplit('.').next().unwrap();
    let value = |u: f64| match leaf {
        "weight" if shape.len() > 1 => (u - 0.5) * 2.0 * (6.0 / (count / shape[0]) as f64).sqrt(),
        "weight" => 0.5 + 0.5 * u,
        "running_var" => 1.0 + 2.0 * u,
        _ => (u - 0.5) * 0.2,
    };
    let values: Vec<f32> = unit_hash(tensor_index, count)
        .map(|u| value(u) as f32)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// Fills every variable but the BatchNorm counts (sorted by name, as the script does,
/// which leaves the counts out of its state_dict too) from the formula.
fn fill_deterministically(varmap: &VarMap) -> Result<Vec<String>> {
    let vars = varmap.data().lock().unwrap();
    let mut names: Vec<String> = vars
        .keys()
        .filter(|name| !is_count(name))
        .cloned()
        .collect();
    names.sort();
    for (i, name) in names.iter().enumerate() {
        let var = &vars[name];
        var.set(&deterministic_values(name, i as u64, var.dims())?)?;
    }
    Ok(names)
}

fn is_count(name: &str) -> bool {
    name.ends_with(NUM_BATCHES_TRACKED)
}

/// Every BatchNorm count of the map, by name.
fn counts(varmap: &VarMap) -> Result<HashMap<String, i64>> {
    varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| is_count(name))
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_scalar::<i64>()?)))
        .collect()
}

fn resnet(depth: usize, num_classes: usize) -> Result<(VarMap, ResNet)> {
    let varmap = VarMap::new();
    let config = ResNetConfig::new(depth, num_classes).unwrap();
    let model = ResNet::new(
        &config,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )?;
    Ok((varmap, model))
}

fn golden_input(g: &Golden) -> Result<Tensor> {
    deterministic_values("input", g.input_tensor_index, &g.input_shape)? * g.input_scale
}

fn assert_close(what: &str, ours: &[f32], theirs: &[f32], tolerance: f32) {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let worst = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= tolerance,
        "{what}: max |diff| {worst} > {tolerance}\nours   {ours:?}\ntorch  {theirs:?}"
    );
}

fn flat(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

fn head(t: &Tensor, n: usize) -> Result<Vec<f32>> {
    Ok(flat(t)?.into_iter().take(n).collect())
}

#[test]
fn resnet18_matches_torchvision_in_eval_and_training() -> Result<()> {
    let g = golden();
    let (varmap, model) = resnet(18, 10)?;
    let names = fill_deterministically(&varmap)?;
    assert_eq!(
        names, g.tensor_names,
        "variable names differ from torchvision's state_dict"
    );
    let x = golden_input(&g)?;

    let eval_logits = model.forward_t(&x, false)?;
    assert_close("eval logits", &flat(&eval_logits)?, &g.eval_logits, 1e-4);

    let train_logits = model.forward_t(&x, true)?;
    assert_close(
        "training logits",
        &flat(&train_logits)?,
        &g.train_logits,
        1e-4,
    );
    let vars = varmap.data().lock().unwrap().clone();
    for (bn, stats) in &g.running_stats {
        for (stat, expected) in stats {
            let ours = head(vars[&format!("{bn}.{stat}")].as_tensor(), expected.len())?;
            assert_close(
                &format!("{bn}.{stat} after one training forward"),
                &ours,
                expected,
                1e-5,
            );
        }
    }

    let labels = Tensor::new(g.labels.as_slice(), &Device::Cpu)?;
    let loss = candle_nn::loss::cross_entropy(&train_logits, &labels)?;
    assert_close("loss", &[loss.to_scalar::<f32>()?], &[g.train_loss], 1e-5);
    let grads = loss.backward()?;
    for (name, expected) in &g.gradients {
        let grad = grads
            .get(vars[name].as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_close(
            &format!("d loss / d {name}"),
            &head(grad, expected.len())?,
            expected,
            1e-4,
        );
    }
    Ok(())
}

#[test]
fn training_step_reaches_every_parameter_and_moves_batch_norm_buffers() -> Result<()> {
    let (varmap, model) = resnet(18, 10)?;
    let vars = varmap.data().lock().unwrap().clone();
    let before: HashMap<String, Vec<f32>> = vars
        .iter()
        .filter(|(name, _)| is_batch_norm_buffer(name) && !is_count(name))
        .map(|(name, var)| Ok((name.clone(), flat(var.as_tensor())?)))
        .collect::<Result<_>>()?;
    assert_eq!(
        before.len(),
        2 * 20,
        "ResNet-18 has 20 BatchNorms with two running statistics each"
    );

    let x = Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu)?;
    let labels = Tensor::new(&[1u32, 7], &Device::Cpu)?;
    let loss = candle_nn::loss::cross_entropy(&model.forward_t(&x, true)?, &labels)?;
    let grads = loss.backward()?;

    let mut trainable = 0;
    for (name, var) in &vars {
        let grad = grads.get(var.as_tensor());
        if is_batch_norm_buffer(name) {
            assert!(grad.is_none(), "BatchNorm buffer {name} got a gradient");
            if is_count(name) {
                assert_eq!(var.as_tensor().to_scalar::<i64>()?, 1, "{name}");
            } else {
                assert_ne!(flat(var.as_tensor())?, before[name], "{name} did not move");
            }
            continue;
        }
        trainable += 1;
        let grad = flat(grad.unwrap_or_else(|| panic!("no gradient for {name}")))?;
        assert!(
            grad.iter().all(|g| g.is_finite()),
            "non-finite gradient for {name}"
        );
        assert!(grad.iter().any(|&g| g != 0.0), "zero gradient for {name}");
    }
    assert_eq!(
        trainable, 62,
        "ResNet-18: 21 convolutions, 20 BatchNorm weight + bias, fc weight + bias"
    );
    Ok(())
}

#[test]
fn batch_norm_counts_training_forwards_and_saves_the_count() -> Result<()> {
    let (varmap, model) = resnet(18, 10)?;
    let x = Tensor::randn(0f32, 1., (2, 3, 16, 16), &Device::Cpu)?;
    for _ in 0..3 {
        model.forward_t(&x, true)?;
    }
    model.forward_t(&x, false)?;
    let after = counts(&varmap)?;
    assert_eq!(after.len(), 20, "one count per BatchNorm");
    for (name, count) in &after {
        assert_eq!(*count, 3, "{name}: 3 training forwards, then one in eval");
    }

    let dir = tempdir();
    let path = dir.path().join("counted.safetensors");
    varmap.save(&path)?;
    let saved = candle_core::safetensors::load(&path, &Device::Cpu)?;
    let count = &saved["layer3.1.bn2.num_batches_tracked"];
    assert_eq!(count.dtype(), DType::I64, "torch's dtype");
    assert_eq!(count.dims(), [0usize; 0], "torch's shape: a scalar");
    assert_eq!(count.to_scalar::<i64>()?, 3);
    Ok(())
}

#[test]
fn checkpoint_counts_load_exactly_and_absent_ones_start_at_zero() -> Result<()> {
    let (varmap, _) = resnet(18, 10)?;
    let dir = tempdir();
    let path = dir.path().join("tv.safetensors");
    // Beyond f32's exact integers: only an i64 count keeps it.
    let big = (1i64 << 40) + 3;
    save_as(&varmap, &WeightLayout::Torchvision, &path, &[])?;
    let mut tensors = candle_core::safetensors::load(&path, &Device::Cpu)?;
    tensors.insert(
        "layer2.0.downsample.1.num_batches_tracked".into(),
        Tensor::new(big, &Device::Cpu)?,
    );
    // As in torchvision's first ImageNet weights, saved before the count existed.
    tensors.remove("bn1.num_batches_tracked");
    candle_core::safetensors::save(&tensors, &path)?;

    let loaded = load_resnet(&path, 10, &Device::Cpu).unwrap();
    let loaded_counts = counts(&loaded.varmap)?;
    assert_eq!(
        loaded_counts["layer2.0.downsample.1.num_batches_tracked"],
        big
    );
    assert_eq!(loaded_counts["bn1.num_batches_tracked"], 0);

    loaded.model.forward_t(
        &Tensor::randn(0f32, 1., (2, 3, 16, 16), &Device::Cpu)?,
        true,
    )?;
    let trained = counts(&loaded.varmap)?;
    assert_eq!(
        trained["layer2.0.downsample.1.num_batches_tracked"],
        big + 1
    );
    assert_eq!(trained["bn1.num_batches_tracked"], 1);
    Ok(())
}

#[test]
fn frozen_batch_norm_trains_with_running_statistics_and_keeps_them() -> Result<()> {
    let g = golden();
    let (varmap, mut model) = resnet(18, 10)?;
    fill_deterministically(&varmap)?;
    model.set_batch_norm_frozen(true);
    let buffers = |varmap: &VarMap| -> Result<HashMap<String, Vec<f32>>> {
        let vars = varmap.data().lock().unwrap();
        vars.iter()
            .filter(|(name, _)| is_batch_norm_buffer(name))
            .map(|(name, var)| {
                let values = var.as_tensor().to_dtype(DType::F32)?;
                Ok((name.clone(), flat(&values)?))
            })
            .collect()
    };
    let before = buffers(&varmap)?;
    let x = golden_input(&g)?;

    let train_logits = model.forward_t(&x, true)?;
    assert_eq!(
        flat(&train_logits)?,
        flat(&model.forward_t(&x, false)?)?,
        "a training forward with frozen BatchNorm is an eval forward"
    );
    assert_close(
        "frozen training logits against torchvision's eval",
        &flat(&train_logits)?,
        &g.eval_logits,
        1e-4,
    );
    assert_eq!(
        buffers(&varmap)?,
        before,
        "running statistics and counts moved"
    );

    // Weight and bias still train (unless frozen by name), through every layer.
    let labels = Tensor::new(g.labels.as_slice(), &Device::Cpu)?;
    let grads = candle_nn::loss::cross_entropy(&train_logits, &labels)?.backward()?;
    let vars = varmap.data().lock().unwrap();
    for name in ["bn1.weight", "layer1.0.bn1.bias", "conv1.weight"] {
        let grad = flat(grads.get(vars[name].as_tensor()).unwrap())?;
        assert!(grad.iter().any(|&g| g != 0.0), "zero gradient for {name}");
    }
    for (name, var) in vars.iter().filter(|(name, _)| is_batch_norm_buffer(name)) {
        assert!(
            grads.get(var.as_tensor()).is_none(),
            "{name} got a gradient"
        );
    }
    Ok(())
}

/// Writes the variables of `varmap` under the names `layout` gives them.
fn save_as(varmap: &VarMap, layout: &WeightLayout, path: &Path, skip: &[&str]) -> Result<()> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (layout.file_name(name), var.as_tensor().clone()))
        .filter(|(name, _)| !skip.contains(&name.as_str()))
        .collect();
    candle_core::safetensors::save(&tensors, path)
}

fn hf() -> WeightLayout {
    WeightLayout::HuggingFace {
        prefix: "resnet.".into(),
    }
}

#[test]
fn hugging_face_layout_matches_transformers_names_and_shapes() -> Result<()> {
    // Written by nn/scripts/resnet_golden.py from transformers' ResNetForImageClassification.
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/resnet_hf_names.json");
    let expected: HashMap<String, HashMap<String, Vec<usize>>> =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for depth in [18, 50] {
        let (varmap, _) = resnet(depth, 10)?;
        // The script leaves the BatchNorm counts out.
        let ours: HashMap<String, Vec<usize>> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .filter(|(name, _)| !is_count(name))
            .map(|(name, var)| (hf().file_name(name), var.dims().to_vec()))
            .collect();
        let theirs = &expected[&format!("resnet{depth}")];
        let mut missing: Vec<_> = theirs.keys().filter(|n| !ours.contains_key(*n)).collect();
        let mut extra: Vec<_> = ours.keys().filter(|n| !theirs.contains_key(*n)).collect();
        missing.sort();
        extra.sort();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "ResNet-{depth}: missing {missing:?}, extra {extra:?}"
        );
        for (name, shape) in theirs {
            assert_eq!(&ours[name], shape, "ResNet-{depth}: {name}");
        }
    }
    Ok(())
}

#[test]
fn loads_torchvision_and_hugging_face_layouts_to_the_same_model() -> Result<()> {
    let g = golden();
    let (varmap, _) = resnet(18, 10)?;
    fill_deterministically(&varmap)?;
    let dir = tempdir();
    let dir = dir.path();
    let x = golden_input(&g)?;
    for (layout, file) in [
        (WeightLayout::Torchvision, "tv.safetensors"),
        (hf(), "hf.safetensors"),
    ] {
        let path = dir.join(file);
        save_as(&varmap, &layout, &path, &[])?;
        let loaded = load_resnet(&path, 10, &Device::Cpu).unwrap();
        assert_eq!(loaded.layout, layout);
        assert_eq!(loaded.model.config().depth, 18);
        let logits = loaded.model.forward_t(&x, false)?;
        assert_close(
            &format!("{file} eval logits"),
            &flat(&logits)?,
            &g.eval_logits,
            1e-4,
        );
    }
    Ok(())
}

#[test]
fn new_class_count_gets_a_fresh_head_and_keeps_the_backbone() -> Result<()> {
    let (varmap, _) = resnet(18, 10)?;
    fill_deterministically(&varmap)?;
    let dir = tempdir();
    let path = dir.path().join("tv.safetensors");
    varmap.save(&path)?;
    let loaded = load_resnet(&path, 3, &Device::Cpu).unwrap();
    let vars = loaded.varmap.data().lock().unwrap();
    assert_eq!(vars["fc.weight"].dims(), [3, 512]);
    let original = varmap.data().lock().unwrap();
    assert_eq!(
        flat(vars["layer4.1.conv2.weight"].as_tensor())?,
        flat(original["layer4.1.conv2.weight"].as_tensor())?
    );
    Ok(())
}

#[test]
fn resnet50_is_recognised_in_hugging_face_layout() -> Result<()> {
    let (varmap, _) = resnet(50, 1000)?;
    let dir = tempdir();
    let path = dir.path().join("hf50.safetensors");
    save_as(&varmap, &hf(), &path, &[])?;
    let loaded = load_resnet(&path, 2, &Device::Cpu).unwrap();
    assert_eq!(loaded.model.config().depth, 50);
    let logits = loaded.model.forward_t(
        &Tensor::randn(0f32, 1., (2, 3, 32, 32), &Device::Cpu)?,
        true,
    )?;
    assert_eq!(logits.dims(), [2, 2]);
    Ok(())
}

#[test]
fn bad_checkpoints_are_errors_naming_file_and_tensor() -> Result<()> {
    let (varmap, _) = resnet(18, 10)?;
    let dir = tempdir();
    let dir = dir.path();
    let layout = hf();

    let missing = dir.join("missing.safetensors");
    let tensor = "resnet.encoder.stages.2.layers.1.layer.1.normalization.running_var";
    save_as(&varmap, &layout, &missing, &[tensor])?;
    let err = load_resnet(&missing, 10, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&missing.display().to_string())
            && err.contains(tensor)
            && err.contains("missing"),
        "{err}"
    );

    let wrong_shape = dir.join("shape.safetensors");
    let mut tensors = candle_core::safetensors::load(&missing, &Device::Cpu)?;
    tensors.insert(tensor.into(), Tensor::ones(7, DType::F32, &Device::Cpu)?);
    candle_core::safetensors::save(&tensors, &wrong_shape)?;
    let err = load_resnet(&wrong_shape, 10, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(tensor) && err.contains("[7]") && err.contains("[256]"),
        "{err}"
    );

    let unknown = dir.join("unknown.safetensors");
    tensors.retain(|name, _| !name.contains("stages.3.layers.1."));
    candle_core::safetensors::save(&tensors, &unknown)?;
    let err = load_resnet(&unknown, 10, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&unknown.display().to_string()) && err.contains("[2, 2, 2, 1]"),
        "{err}"
    );

    let not_resnet = dir.join("bert.safetensors");
    candle_core::safetensors::save(
        &HashMap::from([(
            "embeddings.weight".to_string(),
            Tensor::ones(2, DType::F32, &Device::Cpu)?,
        )]),
        &not_resnet,
    )?;
    let err = load_resnet(&not_resnet, 10, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("not a ResNet checkpoint"), "{err}");

    let with_config = dir.join("model.safetensors");
    save_as(&varmap, &layout, &with_config, &[])?;
    std::fs::write(
        dir.join("config.json"),
        r#"{"hidden_act": "gelu", "layer_type": "basic"}"#,
    )
    .unwrap();
    let err = load_resnet(&with_config, 10, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("hidden_act `gelu`"),
        "{err}"
    );
    std::fs::write(
        dir.join("config.json"),
        r#"{"hidden_act": "relu", "downsample_in_bottleneck": true}"#,
    )
    .unwrap();
    let err = load_resnet(&with_config, 10, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("downsample_in_bottleneck"), "{err}");
    std::fs::write(
        dir.join("config.json"),
        r#"{"hidden_act": "relu", "downsample_in_bottleneck": false}"#,
    )
    .unwrap();
    assert!(load_resnet(&with_config, 10, &Device::Cpu).is_ok());

    let err = load_resnet(&dir.join("absent.safetensors"), 10, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("absent.safetensors"), "{err}");
    Ok(())
}

#[test]
fn unknown_depth_is_a_clear_error() {
    let err = ResNetConfig::new(19, 10).unwrap_err().to_string();
    assert!(
        err.contains("ResNet-19") && err.contains("18, 34, 50, 101, 152"),
        "{err}"
    );
}

fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}
