//! Image classification end to end with real rank processes: a ResNet-18 trained from
//! random weights on real handwritten digits (MNIST-5k, IDX files written by
//! examples/fetch-data.sh) and then fine-tuned from that run's output with the stem and
//! first stage frozen; PNG and JPEG files from an ImageFolder tree with augmentation; a
//! rank killed in the middle of a checkpoint write.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::Device;

fn mnist() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/mnist-5k");
    assert!(
        dir.join("train-images-idx3-ubyte.gz").is_file(),
        "{} is missing: run examples/fetch-data.sh (e2e/test.sh does)",
        dir.display()
    );
    dir
}

fn write_job(dir: &Path, name: &str, spec: &str) -> PathBuf {
    let path = dir.join(format!("{name}.yaml"));
    let yaml = format!(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\nspec:\n{spec}"
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

fn launch(job: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ringmaster"))
        .arg("launch")
        .arg(job)
        .env("RINGMASTER_TIMEOUT_S", "30")
        .output()
        .expect("run ringmaster launch");
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "launch {} failed:\n{log}",
        job.display()
    );
    log
}

fn evaluations(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn accuracy(line: &serde_json::Value) -> f64 {
    line["validation"]["accuracy"].as_f64().unwrap()
}

fn tensor(model: &Path, name: &str) -> Vec<f32> {
    let tensors =
        candle_core::safetensors::load(model.join("model.safetensors"), &Device::Cpu).unwrap();
    tensors[name].flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn resnet_learns_digits_from_random_weights_then_fine_tunes_with_a_frozen_stem() {
    let data = mnist();
    let dir = tempfile::tempdir().unwrap();
    let images = data.join("train-images-idx3-ubyte.gz");
    let pretrain = write_job(
        dir.path(),
        "digits",
        &format!(
            "  model: {{architecture: resnet, source: 'random:resnet18', numClasses: 10}}\n  \
             data: {{train: {images:?}, format: idx, validationSplit: 0.2, imageSize: 32}}\n  \
             training: {{epochs: 1, batchSize: 32, optimizer: sgd, learningRate: 0.05, schedule: cosine}}\n  \
             distribution: {{workers: 2}}\n  output: {{path: pretrain}}\n"
        ),
    );
    let log = launch(&pretrain);
    let first = evaluations(&dir.path().join("pretrain"));
    let pretrained = accuracy(&first[0]);
    // 1,000 held-out digits, 10 classes: chance is 0.1.
    assert!(
        pretrained >= 0.6,
        "accuracy {pretrained} after one epoch:\n{log}"
    );
    assert_eq!(first[0]["validation"]["examples"], 1000);
    let best = dir.path().join("pretrain/best");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(best.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architecture"], "resnet18");
    assert_eq!(config["id2label"]["9"], "9");
    assert!(best.join("preprocessor_config.json").is_file());
    assert!(
        std::fs::read_to_string(best.join("README.md"))
            .unwrap()
            .contains("image-classification")
    );

    // The earlier run's directory is the source; stem and first stage stay as they were.
    let finetune = write_job(
        dir.path(),
        "digits-finetune",
        &format!(
            "  model: {{architecture: resnet, source: pretrain, numClasses: 10, freeze: ['conv1.*', 'bn1.weight', 'bn1.bias', 'layer1.*']}}\n  \
             data: {{train: {images:?}, format: idx, validationSplit: 0.2, imageSize: 32, \
                     augmentation: {{minCropScale: 0.8, horizontalFlip: false, maxRotationDegrees: 10}}}}\n  \
             training: {{epochs: 1, batchSize: 32, optimizer: sgd, learningRate: 0.02, evalIntervalSteps: 40}}\n  \
             distribution: {{workers: 2}}\n  output: {{path: finetune, bestMetric: macroF1}}\n"
        ),
    );
    let log = launch(&finetune);
    let lines = evaluations(&dir.path().join("finetune"));
    assert_eq!(
        lines.len(),
        2,
        "at step 40 and at the end of the epoch:\n{log}"
    );
    assert_eq!(lines[0]["step"], 40);
    let tuned = accuracy(lines.last().unwrap());
    assert!(
        tuned >= 0.85,
        "fine-tuned accuracy {tuned} (pretrained {pretrained}):\n{log}"
    );
    let tuned_best = dir.path().join("finetune/best");
    assert_eq!(
        tensor(&best, "conv1.weight"),
        tensor(&tuned_best, "conv1.weight")
    );
    assert_eq!(
        tensor(&best, "layer1.1.conv2.weight"),
        tensor(&tuned_best, "layer1.1.conv2.weight")
    );
    assert_ne!(
        tensor(&best, "layer3.0.conv1.weight"),
        tensor(&tuned_best, "layer3.0.conv1.weight"),
        "later stages train"
    );
}

/// Bright and dark pictures, alternately PNG and JPEG, in `root/<class>/`.
fn image_folder(root: &Path, per_class: u32) {
    for (class, level) in [("bright", 200u8), ("dark", 40u8)] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for i in 0..per_class {
            let picture = image::RgbImage::from_fn(40, 30, |x, y| {
                let noise = ((x * 7 + y * 13 + i * 31) % 40) as u8;
                image::Rgb([level + noise / 2, level, level.saturating_sub(noise)])
            });
            let ext = if i % 2 == 0 { "png" } else { "jpg" };
            picture
                .save(root.join(class).join(format!("{i:03}.{ext}")))
                .unwrap();
        }
    }
}

#[test]
fn image_folder_png_and_jpeg_with_augmentation_and_oversampling() {
    let dir = tempfile::tempdir().unwrap();
    image_folder(&dir.path().join("pictures"), 64);
    let job = write_job(
        dir.path(),
        "pictures",
        "  model: {architecture: resnet, source: 'random:resnet18', labels: [bright, dark]}\n  \
         data: {train: pictures, format: imagefolder, validationSplit: 0.25, imageSize: 16, \
                augmentation: {minCropScale: 0.5, horizontalFlip: true, colorJitter: 0.1, maxRotationDegrees: 15}}\n  \
         training: {epochs: 4, batchSize: 8, optimizer: sgd, learningRate: 0.05, classBalance: oversample}\n  \
         distribution: {workers: 2}\n  output: {path: out}\n",
    );
    let log = launch(&job);
    let lines = evaluations(&dir.path().join("out"));
    assert_eq!(lines.len(), 4, "{log}");
    assert_eq!(lines[0]["validation"]["examples"], 32);
    let best = lines.iter().map(accuracy).fold(0.0, f64::max);
    assert!(best >= 0.75, "bright vs dark: best accuracy {best}:\n{log}");
}

/// `n` tiny grey images whose class is their brightness, as IDX files.
fn tiny_idx(dir: &Path, n: usize) -> PathBuf {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for i in 0..n {
        let class = (i % 2) as u8;
        labels.push(class);
        pixels.extend((0..64).map(|p| {
            if class == 1 {
                180 + (p % 50) as u8
            } else {
                (p % 50) as u8
            }
        }));
    }
    let mut images = vec![0, 0, 8, 3];
    for d in [n as u32, 8, 8] {
        images.extend(d.to_be_bytes());
    }
    images.extend(pixels);
    let mut label_file = vec![0, 0, 8, 1];
    label_file.extend((n as u32).to_be_bytes());
    label_file.extend(labels);
    let path = dir.join("tiny-images-idx3-ubyte");
    std::fs::write(&path, images).unwrap();
    std::fs::write(dir.join("tiny-labels-idx1-ubyte"), label_file).unwrap();
    path
}

fn checkpoints(run: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The `resumed_at_step` of a `ringmaster train` run's start event.
fn train(job: &Path) -> (bool, Option<u64>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringmaster"))
        .args(["train", "--config"])
        .arg(job)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let resumed = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["event"] == "start")
        .and_then(|e| e["resumed_at_step"].as_u64());
    let log = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), resumed, log)
}

#[test]
fn killed_while_writing_a_checkpoint_and_a_damaged_newest_one_resume_from_an_intact_one() {
    let dir = tempfile::tempdir().unwrap();
    let images = tiny_idx(dir.path(), 512);
    let job = write_job(
        dir.path(),
        "tiny",
        &format!(
            "  model: {{architecture: resnet, source: 'random:resnet18', numClasses: 2}}\n  \
             data: {{train: {images:?}, format: idx, validationSplit: 0.1, imageSize: 16}}\n  \
             training: {{epochs: 2, batchSize: 16, optimizer: sgd, learningRate: 0.05, checkpointIntervalSteps: 1}}\n  \
             output: {{path: out, keepCheckpoints: 3}}\n"
        ),
    );
    let run = dir.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ringmaster"))
        .args(["train", "--config"])
        .arg(&job)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Two complete checkpoints, then a kill while the next one is half written.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut caught = false;
    while Instant::now() < deadline && !caught {
        let names = checkpoints(&run);
        let complete = names.iter().filter(|n| n.starts_with("step-")).count();
        caught = complete >= 2 && names.iter().any(|n| n.ends_with(".tmp"));
        if !caught {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        caught,
        "never saw a checkpoint being written: {:?}",
        checkpoints(&run)
    );
    let complete: Vec<String> = checkpoints(&run)
        .into_iter()
        .filter(|n| n.starts_with("step-"))
        .collect();
    let step_of = |name: &str| name.trim_start_matches("step-").parse::<u64>().unwrap();
    let newest = complete.last().unwrap().clone();
    let before = complete[complete.len() - 2].clone();

    // Damage the newest complete checkpoint: the one before it must be used.
    let weights = run
        .join("checkpoints")
        .join(&newest)
        .join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&weights, bytes).unwrap();

    let (ok, resumed, log) = train(&job);
    assert!(ok, "{log}");
    assert_eq!(resumed, Some(step_of(&before)), "{log}");
    assert!(
        log.contains("skipping a damaged checkpoint") && log.contains(&newest),
        "{log}"
    );
    let lines = evaluations(&run);
    let last = lines.last().unwrap();
    assert_eq!(last["epoch"], 2, "the resumed run finishes: {lines:?}");
    assert_eq!(
        last["step"],
        2 * 29,
        "461 training images, 16 a step: {lines:?}"
    );
}

#[test]
fn the_same_seed_gives_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let images = tiny_idx(dir.path(), 256);
    let run = |name: &str, seed: u64| {
        let job = write_job(
            dir.path(),
            name,
            &format!(
                "  model: {{architecture: resnet, source: 'random:resnet18', numClasses: 2}}\n  \
                 data: {{train: {images:?}, format: idx, validationSplit: 0.25, imageSize: 16, \
                         augmentation: {{minCropScale: 0.5, maxRotationDegrees: 10}}}}\n  \
                 training: {{epochs: 1, batchSize: 16, optimizer: sgd, learningRate: 0.05, seed: {seed}}}\n  \
                 output: {{path: {name}}}\n"
            ),
        );
        let (ok, _, log) = train(&job);
        assert!(ok, "{log}");
        evaluations(&dir.path().join(name))[0]["validation"].clone()
    };
    let first = run("a", 3);
    assert_eq!(
        first,
        run("b", 3),
        "initialisation, order and augmentation follow the seed"
    );
    assert_ne!(first["loss"], run("c", 4)["loss"]);
}
