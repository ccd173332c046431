//! Live progress: the trainer, authenticated as its job's ServiceAccount, writes
//! `status.progress`; it can write nothing else, and the operator never clobbers it.

use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use ringmaster_crds::{Progress, ProgressReporter, TrainingJob};
use ringmaster_e2e::{
    ServedProcess, client, client_with_token, delete_namespace, kubectl, namespace, wait_until,
};

#[tokio::test]
async fn trainer_reports_progress_with_least_privilege() {
    let admin = client().await;
    let ns = namespace(&admin, "tj-progress").await;
    let _operator = ServedProcess::start(env!("CARGO_BIN_EXE_ringmaster-operator"), &ns, &[]);
    let jobs = Api::<TrainingJob>::namespaced(admin.clone(), &ns);
    for name in ["mine", "theirs"] {
        let job: TrainingJob = serde_yaml::from_str(&format!(
            "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\n\
             spec: {{model: {{architecture: bert, source: /m, numClasses: 2}}, data: {{train: /d, format: csv}}, training: {{epochs: 3}}}}"
        ))
        .unwrap();
        jobs.create(&PostParams::default(), &job).await.unwrap();
    }
    let accounts = Api::<ServiceAccount>::namespaced(admin.clone(), &ns);
    // The pods start after their job's account, Role and RoleBinding exist; so does this.
    let bindings = Api::<RoleBinding>::namespaced(admin.clone(), &ns);
    wait_until(
        Duration::from_secs(60),
        "the per-job ServiceAccount and its RoleBinding",
        || async {
            accounts.get_opt("mine-trainer").await.unwrap().is_some()
                && bindings.get_opt("mine-trainer").await.unwrap().is_some()
        },
    )
    .await;
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(600),
            ..Default::default()
        },
        ..Default::default()
    };
    let token = accounts
        .create_token_request("mine-trainer", &PostParams::default(), &request)
        .await
        .unwrap();
    let trainer = client_with_token(&token.status.unwrap().token).await;

    let progress = Progress {
        epoch: 2,
        total_epochs: 3,
        step: 120,
        total_steps: 180,
        loss: Some(0.125),
        validation_accuracy: Some(0.9875),
        samples_per_second: Some(412.5),
        allreduce_bus_bandwidth_gbps: Some(0.93),
        best_checkpoint: Some("/output/checkpoints/step-120".into()),
        ..Default::default()
    };
    ProgressReporter::new(trainer.clone(), &ns, "mine")
        .report(&progress)
        .await
        .expect("the trainer may report its own job");

    let out = kubectl()
        .args(["get", "tj", "mine", "-n", &ns])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.contains("2/3") && table.contains("0.125") && table.contains("0.9875"),
        "kubectl get tj:\n{table}"
    );

    // Another job's status, or its own spec: forbidden.
    let err = ProgressReporter::new(trainer.clone(), &ns, "theirs")
        .report(&progress)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 403),
        "{err}"
    );
    let own_spec = Api::<TrainingJob>::namespaced(trainer, &ns)
        .patch(
            "mine",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"spec": {"training": {"epochs": 9}}})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(own_spec, kube::Error::Api(ref s) if s.code == 403),
        "{own_spec}"
    );

    // The operator keeps writing its part of the status; the progress stays.
    jobs.patch(
        "mine",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"runPolicy": {"suspend": true}}})),
    )
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(60),
        "Suspended by the operator",
        || async {
            jobs.get("mine").await.unwrap().status.and_then(|s| s.phase)
                == Some(ringmaster_crds::JobPhase::Suspended)
        },
    )
    .await;
    let status = jobs.get("mine").await.unwrap().status.unwrap();
    let kept = status
        .progress
        .expect("progress survives the operator's status writes");
    assert_eq!(kept.step, 120);
    assert_eq!(
        kept.best_checkpoint.as_deref(),
        Some("/output/checkpoints/step-120")
    );
    delete_namespace(&admin, &ns).await;
}
