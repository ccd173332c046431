//! Upgrades: objects stored by the previous release (0.1.0; e2e/fixtures/stored-0.1.0,
//! taken from etcd as that release's operator left them) still read and reconcile; and
//! `helm upgrade` from the previous chart (e2e/fixtures/ringmaster-0.1.0.tgz) keeps the
//! CRDs and a running job's gang untouched, and the upgraded RBAC serves the operator.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use ringmaster_crds::keys::JOB_NAME;
use ringmaster_crds::{InferenceService, JobPhase, TrainingJob, find_condition};
use ringmaster_e2e::chart::account_kubeconfig;
use ringmaster_e2e::{
    ServedProcess, client, delete_namespace, helm, kubeconfig, namespace, repo_root, spawn_binder,
    wait_until,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// Writes `object` into etcd as the API server stores custom resources (JSON under
/// /registry/<group>/<plural>/<namespace>/<name>), bypassing today's schema.
fn put_in_etcd(plural: &str, object: &Value) {
    let port = std::fs::read_to_string(kubeconfig().parent().unwrap().join("etcd-port"))
        .expect("etcd-port in the cluster's state directory (e2e/cluster.sh up)");
    let key = format!(
        "/registry/ringmaster.dev/{plural}/{}/{}",
        object["metadata"]["namespace"].as_str().unwrap(),
        object["metadata"]["name"].as_str().unwrap()
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let body = serde_json::json!({"key": b64.encode(key), "value": b64.encode(object.to_string())});
    let out = std::process::Command::new("curl")
        .args(["-fsS", "-X", "POST", "-d", &body.to_string()])
        .arg(format!("http://127.0.0.1:{}/v3/kv/put", port.trim()))
        .output()
        .expect("curl");
    assert!(
        out.status.success(),
        "etcd put: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fixture of the previous release, moved into namespace `ns` with a fresh UID.
fn stored(file: &str, ns: &str) -> Value {
    let path = repo_root().join("e2e/fixtures/stored-0.1.0").join(file);
    let mut object: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let meta = &mut object["metadata"];
    meta["namespace"] = ns.into();
    meta["uid"] = format!(
        "00000000-0000-4000-8000-{:012x}",
        rand::random::<u64>() >> 16
    )
    .into();
    object
}

fn start_operator(ns: &str) -> ServedProcess {
    ServedProcess::start(
        env!("CARGO_BIN_EXE_ringmaster-operator"),
        ns,
        &["--identity", ns, "--restart-backoff-seconds", "0.5"],
    )
}

#[tokio::test]
async fn objects_stored_by_the_previous_release_read_and_reconcile() {
    let client = client().await;
    let ns = namespace(&client, "upgrade-stored").await;
    put_in_etcd("trainingjobs", &stored("trainingjob.json", &ns));
    put_in_etcd("inferenceservices", &stored("inferenceservice.json", &ns));

    // They read with today's types...
    let jobs = Api::<TrainingJob>::namespaced(client.clone(), &ns);
    let services = Api::<InferenceService>::namespaced(client.clone(), &ns);
    let job = jobs
        .get("stored-job")
        .await
        .expect("a stored TrainingJob reads");
    assert_eq!(job.status.unwrap().phase, Some(JobPhase::Running));
    services
        .get("stored-isvc")
        .await
        .expect("a stored InferenceService (with the deprecated spec.protocol) reads");

    // ...and reconcile: the job was Running, but its pods are gone (they lived in the
    // namespace it was taken from), so its gang restarts whole and runs again.
    let _operator = start_operator(&ns);
    let binder = spawn_binder(client.clone(), ns.clone());
    wait_until(
        WAIT,
        "the stored job's gang restarted and running",
        || async {
            let status = jobs.get("stored-job").await.unwrap().status.unwrap();
            status.phase == Some(JobPhase::Running)
                && status.restarts == 1
                && find_condition(&status.conditions, "Stalled")
                    .is_some_and(|c| c.status == "False")
        },
    )
    .await;
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default().labels(&format!("{JOB_NAME}=stored-job")))
        .await
        .unwrap();
    assert_eq!(pods.items.len(), 2, "the whole gang, once");
    wait_until(WAIT, "the stored service waiting for its job", || async {
        let status = services.get("stored-isvc").await.unwrap().status.unwrap();
        find_condition(&status.conditions, "Reconciling")
            .is_some_and(|c| c.status == "True" && c.reason == "WaitingForTrainingJob")
    })
    .await;

    // A stored object takes today's writes: a spec change is observed.
    let more = serde_json::json!({"spec": {"replicas": {"min": 1, "max": 3}}});
    services
        .patch("stored-isvc", &PatchParams::default(), &Patch::Merge(more))
        .await
        .expect("a stored InferenceService takes a spec change");
    wait_until(WAIT, "generation 2 observed", || async {
        let isvc = services.get("stored-isvc").await.unwrap();
        isvc.metadata.generation == Some(2)
            && isvc.status.and_then(|s| s.observed_generation) == Some(2)
    })
    .await;
    binder.abort();
    delete_namespace(&client, &ns).await;
}

fn helm_ok(args: &[&str], chart: &Path) {
    let out = helm().args(args).arg(chart).output().unwrap();
    assert!(
        out.status.success(),
        "helm {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn helm_upgrade_from_the_previous_chart_keeps_crds_and_running_jobs() {
    let client = client().await;
    let ns = namespace(&client, "upgrade-helm").await;
    // The components run here as processes, with the release's ServiceAccount (no node
    // runs the chart's images): no replicas.
    let no_pods = [
        "--set",
        "operator.replicas=0",
        "--set",
        "scheduler.replicas=0",
    ];
    let previous = repo_root().join("e2e/fixtures/ringmaster-0.1.0.tgz");
    let mut install = vec!["install", "ringmaster", "-n", &ns];
    install.extend(no_pods);
    helm_ok(&install, &previous);

    // A job running under the previous release's RBAC (its lease was cluster-wide then).
    let old_credentials = account_kubeconfig("ringmaster-operator", &ns);
    let exe = env!("CARGO_BIN_EXE_ringmaster-operator");
    let lease = ["--lease-namespace", &ns, "--identity", "old"];
    let mut operator = ServedProcess::start_as(exe, &ns, &old_credentials, &lease);
    let jobs = Api::<TrainingJob>::namespaced(client.clone(), &ns);
    let job: TrainingJob = serde_yaml::from_str(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: long-run}\n\
         spec: {model: {architecture: bert, source: /models/minilm, labels: [ham, spam]}, \
         data: {train: /data/train.csv, format: csv}, distribution: {workers: 2}}",
    )
    .unwrap();
    jobs.create(&PostParams::default(), &job).await.unwrap();
    let binder = spawn_binder(client.clone(), ns.clone());
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let gang = |pods: Api<Pod>| async move {
        pods.list(&ListParams::default().labels(&format!("{JOB_NAME}=long-run")))
            .await
            .unwrap()
            .items
            .into_iter()
            .map(|p| (p.metadata.name.unwrap(), p.metadata.uid.unwrap()))
            .collect::<BTreeMap<_, _>>()
    };
    wait_until(WAIT, "the job running before the upgrade", || async {
        jobs.get("long-run")
            .await
            .unwrap()
            .status
            .and_then(|s| s.phase)
            == Some(JobPhase::Running)
    })
    .await;
    let before = gang(pods.clone()).await;
    operator.kill(); // a rolling update replaces the operator

    let mut upgrade = vec!["upgrade", "ringmaster", "-n", &ns];
    upgrade.extend(no_pods);
    helm_ok(&upgrade, &repo_root().join("charts/ringmaster"));

    // Today's RBAC is in place: leases only in the release namespace.
    let cluster_role = Api::<ClusterRole>::all(client.clone())
        .get("ringmaster-operator")
        .await
        .unwrap();
    assert!(
        !serde_json::to_string(&cluster_role.rules)
            .unwrap()
            .contains("leases"),
        "the upgraded ClusterRole still writes leases cluster-wide"
    );
    Api::<Role>::namespaced(client.clone(), &ns)
        .get("ringmaster-operator-leader-election")
        .await
        .expect("the upgrade's leader-election Role");
    let crds = Api::<CustomResourceDefinition>::all(client.clone());
    for crd in [
        "trainingjobs.ringmaster.dev",
        "inferenceservices.ringmaster.dev",
    ] {
        crds.get(crd).await.expect("CRDs survive the upgrade");
    }

    // The upgraded operator, as the new release's ServiceAccount, takes the job over
    // without touching its gang.
    let new_credentials = account_kubeconfig("ringmaster-operator", &ns);
    let lease = [
        "--lease-namespace",
        &ns,
        "--lease-name",
        "ringmaster-operator",
        "--identity",
        "new",
    ];
    let operator = ServedProcess::start_as(exe, &ns, &new_credentials, &lease);
    // Leading needs the upgrade's namespaced lease Role (0.1.0 granted leases
    // cluster-wide), and waits out the old operator's lease.
    wait_until(WAIT, "the upgraded operator leading", || operator.leading()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = jobs.get("long-run").await.unwrap().status.unwrap();
    assert_eq!(status.phase, Some(JobPhase::Running));
    assert_eq!(status.restarts, 0, "the upgrade restarted the gang");
    assert_eq!(
        gang(pods.clone()).await,
        before,
        "the upgrade replaced pods"
    );

    // Uninstalling keeps the CRDs and the jobs (Helm never deletes crds/).
    let out = helm()
        .args(["uninstall", "ringmaster", "-n", &ns])
        .output()
        .unwrap();
    assert!(out.status.success(), "helm uninstall");
    jobs.get("long-run")
        .await
        .expect("jobs outlive the release");
    for crd in [
        "trainingjobs.ringmaster.dev",
        "inferenceservices.ringmaster.dev",
    ] {
        crds.get(crd).await.expect("CRDs outlive the release");
    }
    binder.abort();
    delete_namespace(&client, &ns).await;
}
