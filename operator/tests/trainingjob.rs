//! The TrainingJob operator against a real kube-apiserver, kube-controller-manager (garbage
//! collection) and kwok (pods run on fake GPU nodes). Each test has its own namespace and
//! its own operator process; the test binds pods itself, standing in for a scheduler.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use ringmaster_crds::keys::{ATTEMPT, GANG, GANG_SIZE, JOB_NAME};
use ringmaster_crds::{JobPhase, TrainingJob, find_condition};
use ringmaster_e2e::{
    ServedProcess, client, delete_namespace, exit_pod, kubectl, namespace, spawn_binder, wait_until,
};

const WAIT: Duration = Duration::from_secs(60);

/// A running `ringmaster-operator` for one test's namespace, with a short restart backoff.
fn start_operator(ns: &str, identity: &str) -> ServedProcess {
    ServedProcess::start(
        env!("CARGO_BIN_EXE_ringmaster-operator"),
        ns,
        &["--identity", identity, "--restart-backoff-seconds", "0.5"],
    )
}

fn job_yaml(name: &str, workers: i32, extra: &str) -> TrainingJob {
    let yaml = format!(
        r#"
apiVersion: ringmaster.dev/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  model: {{architecture: bert, source: /models/minilm, labels: [ham, spam]}}
  data: {{train: /data/train.csv, format: csv}}
  distribution: {{workers: {workers}, gpusPerWorker: 1}}
{extra}"#
    );
    serde_yaml::from_str(&yaml).unwrap()
}

async fn create(client: &Client, ns: &str, job: &TrainingJob) {
    Api::<TrainingJob>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), job)
        .await
        .expect("create job");
}

async fn job(client: &Client, ns: &str, name: &str) -> Option<TrainingJob> {
    Api::<TrainingJob>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

async fn pods(client: &Client, ns: &str, name: &str) -> Vec<Pod> {
    Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("{JOB_NAME}={name}")))
        .await
        .unwrap()
        .items
}

async fn wait_phase(client: &Client, ns: &str, name: &str, phase: JobPhase) -> TrainingJob {
    let mut last = None;
    let result = tokio::time::timeout(WAIT, async {
        loop {
            last = job(client, ns, name).await;
            if last.as_ref().and_then(|j| j.status.as_ref()?.phase) == Some(phase) {
                return last.clone().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    result.unwrap_or_else(|_| {
        panic!(
            "{name} never reached {phase:?}; last status: {:#?}",
            last.and_then(|j| j.status)
        )
    })
}

fn condition_reason(job: &TrainingJob, type_: &str) -> Option<String> {
    find_condition(&job.status.as_ref()?.conditions, type_)
        .filter(|c| c.status == "True")
        .map(|c| c.reason.clone())
}

#[tokio::test]
async fn job_runs_as_a_gang_and_succeeds() {
    let client = client().await;
    let ns = namespace(&client, "tj-basic").await;
    let _operator = start_operator(&ns, "op-basic");
    create(&client, &ns, &job_yaml("basic", 3, "")).await;

    // Children exist, exactly once each, before any pod is bound.
    wait_until(WAIT, "3 worker pods", || async {
        pods(&client, &ns, "basic").await.len() == 3
    })
    .await;
    assert!(
        Api::<Service>::namespaced(client.clone(), &ns)
            .get("basic")
            .await
            .is_ok()
    );
    assert!(
        Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .get("basic-spec")
            .await
            .is_ok()
    );
    assert!(
        Api::<Secret>::namespaced(client.clone(), &ns)
            .get("basic-token")
            .await
            .is_ok()
    );
    assert!(
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .get("basic-trainer")
            .await
            .is_ok()
    );
    assert!(
        Api::<Role>::namespaced(client.clone(), &ns)
            .get("basic-trainer")
            .await
            .is_ok()
    );
    assert!(
        Api::<RoleBinding>::namespaced(client.clone(), &ns)
            .get("basic-trainer")
            .await
            .is_ok()
    );
    let mut names: Vec<String> = pods(&client, &ns, "basic")
        .await
        .iter()
        .map(|p| p.name_any())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["basic-worker-0", "basic-worker-1", "basic-worker-2"]
    );
    for pod in pods(&client, &ns, "basic").await {
        assert_eq!(pod.labels()[GANG], "basic");
        assert_eq!(pod.annotations()[GANG_SIZE], "3");
        assert_eq!(
            pod.spec.as_ref().unwrap().scheduler_name.as_deref(),
            Some("ringmaster-scheduler")
        );
    }
    // The gang's scheduling gates are lifted once all three exist.
    wait_until(WAIT, "gates lifted", || async {
        pods(&client, &ns, "basic").await.iter().all(|p| {
            p.spec
                .as_ref()
                .unwrap()
                .scheduling_gates
                .as_ref()
                .is_none_or(|g| g.is_empty())
        })
    })
    .await;

    let binder = spawn_binder(client.clone(), ns.clone());
    let running = wait_phase(&client, &ns, "basic", JobPhase::Running).await;
    let status = running.status.unwrap();
    assert_eq!(status.workers_ready.as_deref(), Some("3/3"));
    assert_eq!(status.workers.running, 3);
    assert!(status.start_time.is_some());
    let out = kubectl()
        .args(["get", "tj", "basic", "-n", &ns])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("Running") && table.contains("3/3"),
        "kubectl get tj:\n{table}"
    );

    for i in 0..3 {
        exit_pod(&client, &ns, &format!("basic-worker-{i}"), 0).await;
    }
    let out = kubectl()
        .args([
            "wait",
            "--for=condition=Succeeded",
            "tj/basic",
            "-n",
            &ns,
            "--timeout=60s",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl wait: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let done = wait_phase(&client, &ns, "basic", JobPhase::Succeeded).await;
    assert!(done.status.unwrap().completion_time.is_some());
    binder.abort();
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn failed_worker_restarts_the_whole_gang_until_backoff_limit() {
    let client = client().await;
    let ns = namespace(&client, "tj-restart").await;
    let _operator = start_operator(&ns, "op-restart");
    let binder = spawn_binder(client.clone(), ns.clone());
    create(
        &client,
        &ns,
        &job_yaml("flaky", 2, "  runPolicy: {backoffLimit: 1}\n"),
    )
    .await;

    wait_phase(&client, &ns, "flaky", JobPhase::Running).await;
    let first: Vec<String> = pods(&client, &ns, "flaky")
        .await
        .iter()
        .map(|p| p.uid().unwrap())
        .collect();
    exit_pod(&client, &ns, "flaky-worker-1", 1).await;

    // Every pod is replaced (new UIDs, attempt 1), not just the failed one.
    wait_until(WAIT, "a new gang on attempt 1", || async {
        let now = pods(&client, &ns, "flaky").await;
        now.len() == 2
            && now
                .iter()
                .all(|p| p.labels()[ATTEMPT] == "1" && !first.contains(&p.uid().unwrap()))
    })
    .await;
    let restarted = wait_phase(&client, &ns, "flaky", JobPhase::Running).await;
    assert_eq!(restarted.status.as_ref().unwrap().restarts, 1);

    exit_pod(&client, &ns, "flaky-worker-0", 2).await;
    let failed = wait_phase(&client, &ns, "flaky", JobPhase::Failed).await;
    assert_eq!(
        condition_reason(&failed, "Failed").as_deref(),
        Some("BackoffLimitExceeded")
    );
    let message = find_condition(&failed.status.unwrap().conditions, "Failed")
        .unwrap()
        .message
        .clone();
    assert!(message.contains("worker 0 exited with code 2"), "{message}");
    binder.abort();
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn exit_code_policy_retries_signals_and_fails_on_bugs() {
    let client = client().await;
    let ns = namespace(&client, "tj-exitcode").await;
    let _operator = start_operator(&ns, "op-exitcode");
    let binder = spawn_binder(client.clone(), ns.clone());
    create(
        &client,
        &ns,
        &job_yaml(
            "codes",
            2,
            "  runPolicy: {restartPolicy: ExitCode, backoffLimit: 5}\n",
        ),
    )
    .await;
    wait_phase(&client, &ns, "codes", JobPhase::Running).await;
    exit_pod(&client, &ns, "codes-worker-0", 137).await; // SIGKILL (OOM, preemption): retry
    wait_until(WAIT, "restart after 137", || async {
        job(&client, &ns, "codes")
            .await
            .and_then(|j| j.status)
            .is_some_and(|s| s.restarts == 1 && s.phase == Some(JobPhase::Running))
    })
    .await;
    exit_pod(&client, &ns, "codes-worker-1", 1).await; // a bug: no retry
    let failed = wait_phase(&client, &ns, "codes", JobPhase::Failed).await;
    assert_eq!(
        condition_reason(&failed, "Failed").as_deref(),
        Some("NonRetryableExitCode")
    );
    assert_eq!(failed.status.unwrap().restarts, 1);

    create(
        &client,
        &ns,
        &job_yaml("never", 2, "  runPolicy: {restartPolicy: Never}\n"),
    )
    .await;
    wait_phase(&client, &ns, "never", JobPhase::Running).await;
    exit_pod(&client, &ns, "never-worker-1", 137).await;
    let failed = wait_phase(&client, &ns, "never", JobPhase::Failed).await;
    assert_eq!(
        condition_reason(&failed, "Failed").as_deref(),
        Some("WorkerFailed")
    );
    binder.abort();
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn suspend_removes_pods_and_resume_recreates_them() {
    let client = client().await;
    let ns = namespace(&client, "tj-suspend").await;
    let _operator = start_operator(&ns, "op-suspend");
    let binder = spawn_binder(client.clone(), ns.clone());
    create(&client, &ns, &job_yaml("pausable", 2, "")).await;
    wait_phase(&client, &ns, "pausable", JobPhase::Running).await;

    let jobs = Api::<TrainingJob>::namespaced(client.clone(), &ns);
    let suspend =
        |on: bool| Patch::Merge(serde_json::json!({"spec": {"runPolicy": {"suspend": on}}}));
    jobs.patch("pausable", &PatchParams::default(), &suspend(true))
        .await
        .unwrap();
    wait_phase(&client, &ns, "pausable", JobPhase::Suspended).await;
    wait_until(WAIT, "pods removed", || async {
        pods(&client, &ns, "pausable").await.is_empty()
    })
    .await;
    assert!(
        job(&client, &ns, "pausable").await.is_some(),
        "the job is kept"
    );

    jobs.patch("pausable", &PatchParams::default(), &suspend(false))
        .await
        .unwrap();
    let resumed = wait_phase(&client, &ns, "pausable", JobPhase::Running).await;
    assert_eq!(pods(&client, &ns, "pausable").await.len(), 2);
    assert!(!ringmaster_operator::trainingjob::status::is_true(
        &resumed.status.unwrap().conditions,
        "Suspended"
    ));
    binder.abort();
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn deadline_ttl_and_cascading_deletion() {
    let client = client().await;
    let ns = namespace(&client, "tj-lifecycle").await;
    let _operator = start_operator(&ns, "op-lifecycle");
    let binder = spawn_binder(client.clone(), ns.clone());

    create(
        &client,
        &ns,
        &job_yaml("slow", 2, "  runPolicy: {activeDeadlineSeconds: 2}\n"),
    )
    .await;
    let failed = wait_phase(&client, &ns, "slow", JobPhase::Failed).await;
    assert_eq!(
        condition_reason(&failed, "Failed").as_deref(),
        Some("DeadlineExceeded")
    );
    wait_until(WAIT, "running pods cleaned up", || async {
        pods(&client, &ns, "slow").await.is_empty()
    })
    .await;

    // ttlSecondsAfterFinished deletes the job; cleanPodPolicy None keeps finished pods
    // until then, and garbage collection takes them with the job.
    create(
        &client,
        &ns,
        &job_yaml(
            "short",
            2,
            "  runPolicy: {ttlSecondsAfterFinished: 3, cleanPodPolicy: None}\n",
        ),
    )
    .await;
    wait_phase(&client, &ns, "short", JobPhase::Running).await;
    exit_pod(&client, &ns, "short-worker-1", 0).await;
    exit_pod(&client, &ns, "short-worker-0", 0).await;
    wait_phase(&client, &ns, "short", JobPhase::Succeeded).await;
    assert_eq!(
        pods(&client, &ns, "short").await.len(),
        2,
        "cleanPodPolicy None keeps the pods"
    );
    wait_until(WAIT, "job deleted by TTL", || async {
        job(&client, &ns, "short").await.is_none()
    })
    .await;
    wait_until(WAIT, "pods garbage-collected", || async {
        pods(&client, &ns, "short").await.is_empty()
    })
    .await;

    // Deleting a job deletes its children through owner references.
    create(&client, &ns, &job_yaml("doomed", 2, "")).await;
    wait_phase(&client, &ns, "doomed", JobPhase::Running).await;
    Api::<TrainingJob>::namespaced(client.clone(), &ns)
        .delete("doomed", &DeleteParams::foreground())
        .await
        .unwrap();
    wait_until(WAIT, "children deleted", || async {
        pods(&client, &ns, "doomed").await.is_empty()
            && Api::<Service>::namespaced(client.clone(), &ns)
                .get_opt("doomed")
                .await
                .unwrap()
                .is_none()
            && Api::<ConfigMap>::namespaced(client.clone(), &ns)
                .get_opt("doomed-spec")
                .await
                .unwrap()
                .is_none()
    })
    .await;
    binder.abort();
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn invalid_spec_fails_with_a_reason_and_the_controller_goes_on() {
    let client = client().await;
    let ns = namespace(&client, "tj-invalid").await;
    let _operator = start_operator(&ns, "op-invalid");
    let binder = spawn_binder(client.clone(), ns.clone());
    create(
        &client,
        &ns,
        &job_yaml(
            "broken",
            2,
            "  volumeMounts: [{name: data, mountPath: /data}]\n",
        ),
    )
    .await;
    create(&client, &ns, &job_yaml("fine", 1, "")).await;
    let broken = wait_phase(&client, &ns, "broken", JobPhase::Failed).await;
    let failed = find_condition(&broken.status.unwrap().conditions, "Failed")
        .unwrap()
        .clone();
    assert_eq!(failed.reason, "InvalidSpec");
    assert!(
        failed.message.contains("spec.volumeMounts"),
        "{}",
        failed.message
    );
    assert!(pods(&client, &ns, "broken").await.is_empty());
    wait_phase(&client, &ns, "fine", JobPhase::Running).await;
    binder.abort();
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn only_the_leader_acts_and_a_standby_takes_over() {
    let client = client().await;
    let ns = namespace(&client, "tj-leader").await;
    let mut first = start_operator(&ns, "op-a");
    wait_until(WAIT, "op-a leading", || async {
        first.get("/readyz").await.is_some_and(|(c, _)| c == 200)
    })
    .await;
    let second = start_operator(&ns, "op-b");
    wait_until(WAIT, "op-b serving", || async {
        second.get("/healthz").await.is_some()
    })
    .await;
    assert_eq!(
        second.get("/readyz").await.unwrap().0,
        503,
        "the standby must not lead"
    );

    create(&client, &ns, &job_yaml("led", 2, "")).await;
    wait_until(WAIT, "pods by the leader", || async {
        pods(&client, &ns, "led").await.len() == 2
    })
    .await;
    let managers: Vec<String> = pods(&client, &ns, "led")
        .await
        .iter()
        .flat_map(|p| p.metadata.managed_fields.clone().unwrap_or_default())
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().all(|m| m == "ringmaster-operator"),
        "{managers:?}"
    );
    let metrics = first.get("/metrics").await.unwrap().1;
    assert!(
        metrics.contains("ringmaster_operator_reconciles_total"),
        "{metrics}"
    );

    first.kill();
    wait_until(Duration::from_secs(45), "op-b takes over", || async {
        second.get("/readyz").await.is_some_and(|(c, _)| c == 200)
    })
    .await;
    create(&client, &ns, &job_yaml("after", 1, "")).await;
    wait_until(WAIT, "the new leader reconciles", || async {
        pods(&client, &ns, "after").await.len() == 1
    })
    .await;
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn operator_killed_during_a_burst_converges_without_duplicates() {
    let client = client().await;
    let ns = namespace(&client, "tj-burst").await;
    let mut operator = start_operator(&ns, "op-burst-1");
    let jobs = 50;
    for i in 0..jobs {
        create(&client, &ns, &job_yaml(&format!("burst-{i}"), 2, "")).await;
        if i == jobs / 2 {
            operator.kill(); // mid-burst, with some jobs half done
        }
    }
    // The lease of the killed operator must expire before the new one leads.
    let _operator = start_operator(&ns, "op-burst-2");
    let all = Api::<Pod>::namespaced(client.clone(), &ns);
    wait_until(Duration::from_secs(90), "every job's pods", || async {
        all.list(&ListParams::default()).await.unwrap().items.len() == 2 * jobs
    })
    .await;
    let items = all.list(&ListParams::default()).await.unwrap().items;
    let mut names: Vec<String> = items.iter().map(|p| p.name_any()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 2 * jobs, "no duplicate pods");
    for pod in &items {
        let owner = &pod.owner_references()[0];
        assert_eq!(owner.kind, "TrainingJob");
        assert!(
            pod.name_any()
                .starts_with(&format!("{}-worker-", owner.name)),
            "pod {} owned by {}",
            pod.name_any(),
            owner.name
        );
    }
    let binder = spawn_binder(client.clone(), ns.clone());
    for i in 0..jobs {
        wait_phase(&client, &ns, &format!("burst-{i}"), JobPhase::Running).await;
    }
    binder.abort();
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn a_job_whose_children_can_never_be_created_fails_once_naming_the_cause() {
    let client = client().await;
    let ns = namespace(&client, "tj-toolarge").await;
    let _operator = start_operator(&ns, "op-toolarge");
    // The API server stores the job (1.1 MB is under its 1.5 MB limit), but the spec
    // ConfigMap built from it passes the 1 MiB ConfigMap limit.
    let big = "x".repeat(1_100_000);
    let env = format!("  template: {{env: [{{name: BIG, value: {big}}}]}}\n");
    create(&client, &ns, &job_yaml("toolarge", 2, &env)).await;
    create(&client, &ns, &job_yaml("fine", 1, "")).await;
    let failed = wait_phase(&client, &ns, "toolarge", JobPhase::Failed).await;
    let condition = find_condition(&failed.status.unwrap().conditions, "Failed")
        .unwrap()
        .clone();
    assert_eq!(condition.reason, "InvalidSpec");
    assert!(
        condition
            .message
            .starts_with("ConfigMap toolarge-spec cannot be created")
            && condition.message.contains("1048576"),
        "{}",
        condition.message
    );
    assert!(pods(&client, &ns, "toolarge").await.is_empty());
    // Failed for good: no retry loop of ReconcileError Events.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items;
    let retries = events
        .iter()
        .filter(|e| e.reason.as_deref() == Some("ReconcileError"))
        .count();
    assert_eq!(retries, 0, "the job must fail, not retry: {events:#?}");
    wait_until(WAIT, "the other job still created", || async {
        pods(&client, &ns, "fine").await.len() == 1
    })
    .await;
    delete_namespace(&client, &ns).await;
}
