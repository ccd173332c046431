//! The operator against the one most teams run, Kubeflow's training-operator v1.8.1
//! (PyTorchJob), on the same local control plane in the same run, each as its own
//! ServiceAccount: JOBS jobs of WORKERS pods applied at once (time until every pod exists,
//! API requests per job from the API server's audit log, peak RSS and CPU seconds of the
//! operator), then one pod failed in each of RESTARTS running jobs (time until every such
//! job runs a whole gang again without the failed pod; duplicate and leftover pods).
//!
//!   e2e/build-binaries.sh --anchors && e2e/cluster.sh up
//!   cargo bench -p ringmaster-operator --bench operator_vs_kubeflow [-- JOBS WORKERS RESTARTS ROUNDS]
//!
//! Semantics differ where the products do: a ringmaster worker failure restarts the whole
//! gang (every rank restarts from the last checkpoint); training-operator's ExitCode policy
//! recreates the failed pod only (the other ranks keep running and must re-rendezvous).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};
use ringmaster_crds::TrainingJob;
use ringmaster_e2e::chart::{account_kubeconfig, apply_server_side};
use ringmaster_e2e::{
    ServedProcess, await_pod_count, client, e2e_cache, exit_pod, kubeconfig, kubectl, namespace,
    proc_memory_kib, spawn_binder, wait_until,
};

const KUBEFLOW_NAMESPACE: &str = "kubeflow";
const KUBEFLOW_USER: &str = "system:serviceaccount:kubeflow:training-operator";
const RINGMASTER_USER: &str = "system:serviceaccount:ringmaster-system:e2e-ringmaster-operator";
const IMAGE: &str = "ghcr.io/ringmaster-dev/ringmaster:0.2.0";

#[derive(Clone, Copy, PartialEq, Debug)]
enum Side {
    Ringmaster,
    Kubeflow,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Ringmaster => "ringmaster",
            Side::Kubeflow => "training-operator v1.8.1",
        }
    }

    /// Label selecting one job's pods.
    fn job_label(self, job: &str) -> String {
        match self {
            Side::Ringmaster => format!("{}={job}", ringmaster_crds::keys::JOB_NAME),
            Side::Kubeflow => format!("training.kubeflow.org/job-name={job}"),
        }
    }

    /// The pod the restart phase fails: a worker, not rank 0.
    fn victim(self, job: &str) -> String {
        match self {
            Side::Ringmaster => format!("{job}-worker-1"),
            Side::Kubeflow => format!("{job}-worker-0"),
        }
    }
}

/// One side's figures.
#[derive(Debug, Default)]
struct Figures {
    after_last_apply_s: f64,
    requests_per_job: f64,
    peak_rss_mib: f64,
    cpu_s: f64,
    restart_s: f64,
    duplicates: usize,
    leftovers: usize,
}

/// Reads one figure for the table.
type Figure = fn(&Figures) -> f64;

/// A running operator: its process (killed on drop) and pid.
enum Operator {
    Ringmaster(ServedProcess),
    Kubeflow(Child),
}

impl Operator {
    fn pid(&self) -> u32 {
        match self {
            Operator::Ringmaster(p) => p.pid(),
            Operator::Kubeflow(c) => c.id(),
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Operator::Kubeflow(child) = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn training_operator_dir() -> PathBuf {
    let dir = e2e_cache().join("training-operator");
    assert!(
        dir.join("training-operator").exists(),
        "Kubeflow's training-operator is not built: run `e2e/build-binaries.sh --anchors`"
    );
    dir
}

/// The PyTorchJob CRD, and training-operator's ServiceAccount and ClusterRole from its own
/// manifests, with the two objects its certificate rotator insists on (a Secret to fill and
/// a webhook configuration to inject into, left without webhooks: its validation is not
/// measured, the API server's CEL rules are on ringmaster's side).
fn install_kubeflow() {
    let manifests = training_operator_dir().join("manifests");
    let crd = std::fs::read_to_string(manifests.join("pytorchjobs.yaml")).unwrap();
    let role = std::fs::read_to_string(manifests.join("cluster-role.yaml")).unwrap();
    apply_server_side(&format!(
        "{crd}\n---\n{role}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {KUBEFLOW_NAMESPACE}}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: training-operator, namespace: {KUBEFLOW_NAMESPACE}}}\n---\n\
         apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRoleBinding\nmetadata: {{name: training-operator}}\n\
         roleRef: {{apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: training-operator}}\n\
         subjects: [{{kind: ServiceAccount, name: training-operator, namespace: {KUBEFLOW_NAMESPACE}}}]\n---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: training-operator-webhook-cert, namespace: {KUBEFLOW_NAMESPACE}}}\n---\n\
         apiVersion: admissionregistration.k8s.io/v1\nkind: ValidatingWebhookConfiguration\n\
         metadata: {{name: validator.training-operator.kubeflow.org}}\nwebhooks: []\n"
    ));
    let out = kubectl()
        .args([
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/pytorchjobs.kubeflow.org",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the PyTorchJob CRD is not Established"
    );
}

async fn start(side: Side, ns: &str) -> Operator {
    match side {
        Side::Ringmaster => Operator::Ringmaster(ServedProcess::start(
            env!("CARGO_BIN_EXE_ringmaster-operator"),
            ns,
            &["--identity", "bench", "--restart-backoff-seconds", "0"],
        )),
        Side::Kubeflow => {
            let (metrics, probes, webhooks) = (free_port(), free_port(), free_port());
            let child = Command::new(training_operator_dir().join("training-operator"))
                .arg(format!("--namespace={ns}"))
                .arg("--enable-scheme=pytorchjob")
                .arg(format!("--metrics-bind-address=127.0.0.1:{metrics}"))
                .arg(format!("--health-probe-bind-address=127.0.0.1:{probes}"))
                .arg(format!("--webhook-server-port={webhooks}"))
                .env(
                    "KUBECONFIG",
                    account_kubeconfig("training-operator", KUBEFLOW_NAMESPACE),
                )
                .env("MY_POD_NAMESPACE", KUBEFLOW_NAMESPACE)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start training-operator");
            let operator = Operator::Kubeflow(child);
            mount_webhook_certificates().await;
            wait_until(
                Duration::from_secs(60),
                "training-operator ready (certificates written, controllers started)",
                || async move { http_ok(probes, "/readyz").await },
            )
            .await;
            operator
        }
    }
}

/// Does what the kubelet does for training-operator's pod: its certificate rotator writes
/// the webhook certificates into a Secret and waits for them to appear in its certificate
/// directory, where a pod has that Secret mounted.
async fn mount_webhook_certificates() {
    let secrets =
        Api::<k8s_openapi::api::core::v1::Secret>::namespaced(client().await, KUBEFLOW_NAMESPACE);
    let started = Instant::now();
    let data = loop {
        let data = secrets
            .get("training-operator-webhook-cert")
            .await
            .ok()
            .and_then(|s| s.data)
            .filter(|d| d.contains_key("tls.crt") && d.contains_key("tls.key"));
        if let Some(data) = data {
            break data;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "training-operator wrote no certificates into its Secret"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let dir = std::path::Path::new("/tmp/k8s-webhook-server/serving-certs");
    std::fs::create_dir_all(dir).unwrap();
    for (key, value) in data {
        std::fs::write(dir.join(key), value.0).unwrap();
    }
}

async fn http_ok(port: u16, path: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let request = format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut out = String::new();
    let _ = stream.read_to_string(&mut out).await;
    out.starts_with("HTTP/1.1 200") || out.starts_with("HTTP/1.0 200")
}

fn pytorch_jobs(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("kubeflow.org", "v1", "PyTorchJob");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

/// Creates job `name` with `workers` pods of the same template size on either side.
async fn create_job(client: &Client, side: Side, ns: &str, name: &str, workers: usize) {
    match side {
        Side::Ringmaster => {
            let job: TrainingJob = serde_yaml::from_str(&format!(
                "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: {name}}}\n\
                 spec: {{image: {IMAGE}, model: {{architecture: bert, source: /m, numClasses: 2}}, \
                 data: {{train: /d, format: csv}}, distribution: {{workers: {workers}}}}}"
            ))
            .unwrap();
            Api::<TrainingJob>::namespaced(client.clone(), ns)
                .create(&PostParams::default(), &job)
                .await
                .expect("create TrainingJob");
        }
        Side::Kubeflow => {
            let replica = |replicas: usize| {
                serde_json::json!({"replicas": replicas, "restartPolicy": "ExitCode", "template": {"spec": {
                    "containers": [{"name": "pytorch", "image": IMAGE, "command": ["ringmaster", "train"]}]}}})
            };
            let job: DynamicObject = serde_json::from_value(serde_json::json!({
                "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": name},
                "spec": {"pytorchReplicaSpecs": {"Master": replica(1), "Worker": replica(workers - 1)}}
            }))
            .unwrap();
            pytorch_jobs(client, ns)
                .create(&PostParams::default(), &job)
                .await
                .expect("create PyTorchJob");
        }
    }
}

/// User plus system CPU seconds of `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the ')'.
    (ticks(11) + ticks(12)) / 100.0
}

/// Requests `user` made to the API server between `from` and `to` (the audit log of the
/// local control plane, one count per request).
fn api_requests(user: &str, from: Timestamp, to: Timestamp) -> usize {
    let log = kubeconfig().parent().unwrap().join("logs/audit.log");
    let text = std::fs::read_to_string(&log)
        .unwrap_or_else(|e| panic!("read {}: {e} (e2e/cluster.sh records it)", log.display()));
    let mut ids = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if event["user"]["username"] != user {
            continue;
        }
        let Some(at) = event["requestReceivedTimestamp"]
            .as_str()
            .and_then(|t| t.parse::<Timestamp>().ok())
        else {
            continue;
        };
        if at >= from && at <= to {
            ids.insert(event["auditID"].as_str().unwrap_or_default().to_string());
        }
    }
    ids.len()
}

async fn pods_of(pods: &Api<Pod>, side: Side, job: &str) -> Vec<Pod> {
    pods.list(&ListParams::default().labels(&side.job_label(job)))
        .await
        .map(|l| l.items)
        .unwrap_or_default()
}

fn running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

async fn measure(
    client: &Client,
    side: Side,
    jobs: usize,
    workers: usize,
    restarts: usize,
) -> Figures {
    let ns = namespace(
        client,
        &format!("vs-{}", side.name().split(' ').next().unwrap()),
    )
    .await;
    let operator = start(side, &ns).await;
    let pid = operator.pid();
    tokio::time::sleep(Duration::from_secs(2)).await; // leadership and initial watches
    let names: Vec<String> = (0..jobs).map(|i| format!("burst-{i}")).collect();
    let (cpu_before, t0, start_at) = (cpu_seconds(pid), Timestamp::now(), Instant::now());
    futures::stream::iter(&names)
        .for_each_concurrent(32, |name| create_job(client, side, &ns, name, workers))
        .await;
    let applied = start_at.elapsed();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let want = jobs * workers;
    let (all_pods, mut peak) = await_pod_count(&pods, want, start_at, pid).await;
    // Follow-up writes (status, gates) belong to the burst too.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let user = match side {
        Side::Ringmaster => RINGMASTER_USER,
        Side::Kubeflow => KUBEFLOW_USER,
    };
    let requests = api_requests(user, t0, Timestamp::now());
    let cpu = cpu_seconds(pid) - cpu_before;
    peak = peak.max(proc_memory_kib(pid, "VmHWM:"));

    // Every pod runs (bound by a stand-in scheduler, run by kwok), then one worker of each
    // of `restarts` jobs is killed (exit 137, retryable for both).
    let binder = spawn_binder(client.clone(), ns.clone());
    wait_until(Duration::from_secs(600), "every pod running", || async {
        let list = pods.list(&ListParams::default()).await.unwrap();
        list.items.iter().filter(|p| running(p)).count() >= want
    })
    .await;
    let mut victims = BTreeMap::new();
    for name in names.iter().take(restarts) {
        let victim = side.victim(name);
        let uid = pods.get(&victim).await.unwrap().uid().unwrap();
        victims.insert(name.clone(), uid);
    }
    let restart_at = Instant::now();
    for name in victims.keys() {
        exit_pod(client, &ns, &side.victim(name), 137).await;
    }
    let restarted = loop {
        let mut whole = 0;
        for (name, uid) in &victims {
            let gang = pods_of(&pods, side, name).await;
            let live: Vec<&Pod> = gang.iter().filter(|p| running(p)).collect();
            if live.len() == workers && live.iter().all(|p| p.uid().as_deref() != Some(uid)) {
                whole += 1;
            }
        }
        if whole == victims.len() {
            break restart_at.elapsed();
        }
        assert!(
            restart_at.elapsed() < Duration::from_secs(600),
            "{}: {whole}/{} gangs whole again after 10 minutes",
            side.name(),
            victims.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (mut duplicates, mut leftovers) = (0, 0);
    for name in &names {
        let gang = pods_of(&pods, side, name).await;
        let live = gang
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .count();
        duplicates += live.saturating_sub(workers);
        leftovers += gang
            .iter()
            .filter(|p| {
                p.metadata.deletion_timestamp.is_none()
                    && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
            })
            .count();
    }
    binder.abort();
    drop(operator);
    delete_and_wait(client, &ns).await;
    Figures {
        after_last_apply_s: all_pods.saturating_sub(applied).as_secs_f64(),
        requests_per_job: requests as f64 / jobs as f64,
        peak_rss_mib: peak as f64 / 1024.0,
        cpu_s: cpu,
        restart_s: restarted.as_secs_f64(),
        duplicates,
        leftovers,
    }
}

/// Deletes the namespace and waits until it is gone, so the next side starts on a quiet
/// API server.
async fn delete_and_wait(client: &Client, ns: &str) {
    let namespaces = Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
    let _ = namespaces.delete(ns, &Default::default()).await;
    wait_until(
        Duration::from_secs(300),
        "the namespace deleted",
        || async { namespaces.get_opt(ns).await.unwrap().is_none() },
    )
    .await;
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let jobs = args.first().copied().unwrap_or(200);
    let workers = args.get(1).copied().unwrap_or(4).max(2);
    let restarts = args.get(2).copied().unwrap_or(50).min(jobs);
    let rounds = args.get(3).copied().unwrap_or(1).max(1);
    let client = client().await;
    install_kubeflow();

    let mut results: Vec<(Side, Figures)> = Vec::new();
    for round in 0..rounds {
        // The side that runs first alternates, so neither always gets the fresher etcd.
        let order = if round % 2 == 0 {
            [Side::Ringmaster, Side::Kubeflow]
        } else {
            [Side::Kubeflow, Side::Ringmaster]
        };
        for side in order {
            let figures = measure(&client, side, jobs, workers, restarts).await;
            eprintln!("round {round}, {}: {figures:?}", side.name());
            results.push((side, figures));
        }
    }
    let median = |side: Side, f: Figure| {
        let mut v: Vec<f64> = results
            .iter()
            .filter(|(s, _)| *s == side)
            .map(|(_, r)| f(r))
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{jobs} jobs x {workers} pods applied at once; one worker killed in {restarts} running jobs; \
         {rounds} round(s), medians\n"
    );
    println!(
        "| | ringmaster | training-operator v1.8.1 | ringmaster better by |\n|---|---|---|---|"
    );
    let rows: [(&str, Figure, &str); 6] = [
        (
            "all pods exist after the last apply",
            |f| f.after_last_apply_s,
            "s",
        ),
        ("API requests per job (burst)", |f| f.requests_per_job, ""),
        ("operator peak RSS", |f| f.peak_rss_mib, "MiB"),
        ("operator CPU during the burst", |f| f.cpu_s, "s"),
        (
            "restarted jobs running a whole gang again",
            |f| f.restart_s,
            "s",
        ),
        (
            "duplicate + leftover failed pods",
            |f| (f.duplicates + f.leftovers) as f64,
            "",
        ),
    ];
    for (what, f, unit) in rows {
        let (ours, theirs) = (median(Side::Ringmaster, f), median(Side::Kubeflow, f));
        let ratio = if ours > 0.0 {
            format!("{:.2}x", theirs / ours)
        } else if theirs > 0.0 {
            "∞".into()
        } else {
            "-".into()
        };
        println!("| {what} | {ours:.2} {unit} | {theirs:.2} {unit} | {ratio} |");
    }
}
