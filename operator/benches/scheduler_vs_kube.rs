//! ringmaster-scheduler against kube-scheduler (default profile, same Kubernetes version
//! as the control plane), one after the other on the same cluster and the same kwok nodes:
//!
//! (a) N one-GPU pods: pods bound per second, and the ratio of the two;
//! (b) G gangs of 8 one-GPU pods arriving together (more than fit; members interleaved,
//!     as when every job's controller creates its pods at once, created while the
//!     scheduler runs): our time from the first creation to binding every gang that
//!     fits, and for kube-scheduler (which knows no gangs) how many jobs end up partly
//!     placed.
//!
//!   e2e/build-binaries.sh --with-scheduler && e2e/cluster.sh up
//!   cargo bench -p ringmaster-operator --bench scheduler_vs_kube [-- NODES PODS GANGS]
//!
//! Defaults: 500 nodes x 8 GPUs, 5,000 pods, 600 gangs. In (a) the pods are created
//! while no scheduler runs and the clock starts when the scheduler process starts (so
//! it includes its start-up, list and watch); in (b) it starts at the first creation.
//! It stops at the last bind seen by a watch. Between rounds the pods are
//! force-deleted.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use ringmaster_crds::keys::{GANG, GANG_SIZE};
use ringmaster_e2e::{
    client_with_read_timeout, delete_namespace, kubeconfig, namespace, wait_nodes_ready, wait_until,
};
use serde_json::json;

const BENCH_LABEL: &str = "ringmaster.dev/bench";
const GPUS_PER_NODE: usize = 8;
const GANG_MEMBERS: usize = 8;
/// kube-scheduler's client limits, raised so neither scheduler is throttled by its client.
const KUBE_QPS: u32 = 5000;
const KUBE_BURST: u32 = 10000;
/// Gangs ringmaster-scheduler binds at once (its client has no rate limiter).
const BIND_CONCURRENCY: usize = 64;
/// A round ends when no pod has been bound for this long.
const STALL: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, PartialEq)]
enum Which {
    Ringmaster,
    Kube,
}

impl Which {
    fn label(self) -> &'static str {
        match self {
            Which::Ringmaster => "ringmaster-scheduler",
            Which::Kube => "kube-scheduler",
        }
    }

    /// The `spec.schedulerName` this scheduler serves.
    fn scheduler_name(self) -> &'static str {
        match self {
            Which::Ringmaster => "ringmaster-scheduler",
            Which::Kube => "default-scheduler",
        }
    }

    fn start(self, ns: &str, work: &std::path::Path) -> Child {
        let mut cmd = match self {
            Which::Ringmaster => {
                let port = std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port();
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringmaster-scheduler"));
                cmd.args(["--namespace", ns, "--lease-namespace", ns])
                    .args(["--identity", "bench", "--listen"])
                    .arg(format!("127.0.0.1:{port}"))
                    .args(["--bind-concurrency", &BIND_CONCURRENCY.to_string()])
                    .env("RUST_LOG", "warn");
                cmd
            }
            Which::Kube => {
                let config = work.join("kube-scheduler.yaml");
                std::fs::write(
                    &config,
                    format!(
                        "apiVersion: kubescheduler.config.k8s.io/v1\nkind: KubeSchedulerConfiguration\n\
                         clientConnection: {{kubeconfig: {:?}, qps: {KUBE_QPS}, burst: {KUBE_BURST}}}\n\
                         leaderElection: {{leaderElect: false}}\n",
                        kubeconfig().display().to_string()
                    ),
                )
                .expect("write kube-scheduler config");
                let mut cmd = Command::new(pinned("kube-scheduler"));
                cmd.arg(format!("--config={}", config.display()))
                    .args(["--secure-port=0", "-v=0"]);
                cmd
            }
        };
        cmd.env("KUBECONFIG", kubeconfig())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(work.join(format!("{}.log", self.label()))).unwrap(),
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.label()))
    }
}

/// A binary that `e2e/build-binaries.sh` caches.
fn pinned(name: &str) -> PathBuf {
    let cache = std::env::var_os("RINGMASTER_E2E_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
                .join("ringmaster-e2e")
        });
    let path = cache.join(name);
    assert!(
        path.exists(),
        "{} missing: run `e2e/build-binaries.sh --with-scheduler`",
        path.display()
    );
    path
}

/// The bench's kwok nodes, tainted so that only bench pods land there.
async fn create_nodes(client: &Client, ns: &str, count: usize) {
    let api = Api::<Node>::all(client.clone());
    futures::stream::iter(0..count)
        .for_each_concurrent(32, |i| {
            let api = api.clone();
            async move {
                let name = format!("{ns}-n{i}");
                let node: Node = serde_json::from_value(json!({
                    "metadata": {
                        "name": name,
                        "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                        "labels": {"kubernetes.io/hostname": name, "type": "kwok", BENCH_LABEL: ns,
                                   "topology.kubernetes.io/zone": format!("zone-{}", i % 4),
                                   "nvidia.com/gpu.product": "NVIDIA-H200"},
                    },
                    "spec": {"taints": [{"key": BENCH_LABEL, "value": ns, "effect": "NoSchedule"}]},
                    "status": {
                        "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": GPUS_PER_NODE.to_string()},
                        "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", "nvidia.com/gpu": GPUS_PER_NODE.to_string()},
                    },
                }))
                .unwrap();
                api.create(&PostParams::default(), &node)
                    .await
                    .expect("create node");
            }
        })
        .await;
    let selector = format!("{BENCH_LABEL}={ns}");
    wait_nodes_ready(client, &selector, count, Duration::from_secs(300)).await;
}

fn bench_pod(ns: &str, name: &str, which: Which, gang: Option<&str>) -> Pod {
    let mut metadata = json!({"name": name, "namespace": ns});
    if let Some(g) = gang {
        metadata["labels"] = json!({GANG: g});
        metadata["annotations"] = json!({GANG_SIZE: GANG_MEMBERS.to_string()});
    }
    serde_json::from_value(json!({
        "metadata": metadata,
        "spec": {
            "schedulerName": which.scheduler_name(),
            "nodeSelector": {BENCH_LABEL: ns},
            "tolerations": [
                {"key": BENCH_LABEL, "operator": "Exists", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"},
            ],
            "containers": [{"name": "c", "image": "busybox",
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"},
                              "limits": {"nvidia.com/gpu": "1"}}}],
        }
    }))
    .unwrap()
}

/// When each pod was first seen bound, by name.
type Binds = Arc<Mutex<HashMap<String, Instant>>>;

struct Round {
    started: Instant,
    binds: HashMap<String, Instant>,
}

impl Round {
    fn last(&self) -> Duration {
        self.binds
            .values()
            .max()
            .map_or(Duration::ZERO, |t| t.duration_since(self.started))
    }

    fn first(&self) -> Duration {
        self.binds
            .values()
            .min()
            .map_or(Duration::ZERO, |t| t.duration_since(self.started))
    }

    /// Pods per second from the scheduler's start to the last bind.
    fn rate(&self) -> f64 {
        self.binds.len() as f64 / self.last().as_secs_f64().max(1e-9)
    }

    /// Pods per second from the first bind to the last (start-up excluded).
    fn steady_rate(&self) -> f64 {
        (self.binds.len().saturating_sub(1)) as f64
            / (self.last() - self.first()).as_secs_f64().max(1e-9)
    }
}

/// How the pods of a round meet the scheduler.
#[derive(Clone, Copy, PartialEq)]
enum Arrival {
    /// All pods exist before the scheduler starts; the clock starts with the scheduler.
    Backlog,
    /// The scheduler runs first; the clock starts with the first pod's creation.
    Live,
}

async fn create_pods(api: &Api<Pod>, pods: Vec<Pod>) -> Duration {
    let created = Instant::now();
    futures::stream::iter(pods)
        .for_each_concurrent(64, |p| {
            let api = api.clone();
            async move {
                api.create(&PostParams::default(), &p)
                    .await
                    .expect("create pod");
            }
        })
        .await;
    created.elapsed()
}

/// Runs `which` on `pods` (see `Arrival`) and records binds until `expected` pods are
/// bound or nothing is bound for `STALL`; then removes the pods.
async fn round(
    client: &Client,
    ns: &str,
    which: Which,
    (pods, arrival): (Vec<Pod>, Arrival),
    expected: usize,
    work: &std::path::Path,
) -> Round {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let total = pods.len();
    let names: Vec<String> = pods.iter().map(|p| p.name_any()).collect();
    let mut pods = Some(pods);
    if arrival == Arrival::Backlog {
        let took = create_pods(&api, pods.take().unwrap()).await;
        eprintln!(
            "  {}: created {total} pods in {:.1} s",
            which.label(),
            took.as_secs_f64()
        );
    }
    let binds: Binds = Arc::default();
    let watch = tokio::spawn({
        let (api, binds) = (api.clone(), binds.clone());
        async move {
            let mut events = watcher(api, watcher::Config::default()).boxed();
            while let Some(event) = events.next().await {
                let pods = match event {
                    Ok(watcher::Event::Apply(p) | watcher::Event::InitApply(p)) => vec![p],
                    _ => continue,
                };
                let now = Instant::now();
                let mut binds = binds.lock().unwrap();
                for p in pods {
                    if p.spec.as_ref().is_some_and(|s| s.node_name.is_some()) {
                        binds.entry(p.name_any()).or_insert(now);
                    }
                }
            }
        }
    });
    let mut scheduler = which.start(ns, work);
    let mut started = Instant::now();
    if let Some(pods) = pods {
        // Leadership, informers synced: then the pods arrive.
        tokio::time::sleep(Duration::from_secs(3)).await;
        started = Instant::now();
        let took = create_pods(&api, pods).await;
        eprintln!(
            "  {}: created {total} pods in {:.1} s while it ran",
            which.label(),
            took.as_secs_f64()
        );
    }
    let (mut seen, mut progress) = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let bound = binds.lock().unwrap().len();
        if bound != seen {
            (seen, progress) = (bound, Instant::now());
        }
        if bound >= expected || progress.elapsed() > STALL {
            break;
        }
        if let Ok(Some(status)) = scheduler.try_wait() {
            panic!(
                "{} exited early ({status}); see {}",
                which.label(),
                work.display()
            );
        }
    }
    let _ = scheduler.kill();
    let _ = scheduler.wait();
    watch.abort();
    let binds = binds.lock().unwrap().clone();
    // Force-delete (grace 0): the pods are gone at once, their GPUs free. One call per
    // pod: a deletecollection of thousands outlasts the API server's request timeout.
    let force = DeleteParams {
        grace_period_seconds: Some(0),
        ..DeleteParams::default()
    };
    futures::stream::iter(names)
        .for_each_concurrent(64, |name| {
            let (api, force) = (api.clone(), force.clone());
            async move {
                let _ = api.delete(&name, &force).await;
            }
        })
        .await;
    wait_until(Duration::from_secs(300), "bench pods deleted", || async {
        api.list(&ListParams::default().limit(1))
            .await
            .is_ok_and(|l| l.items.is_empty())
    })
    .await;
    Round { started, binds }
}

/// Gangs by how many of their members were bound: (whole, partly, none).
fn gang_outcome(round: &Round, gangs: usize) -> (usize, usize, usize) {
    let mut bound: BTreeMap<usize, usize> = BTreeMap::new();
    for name in round.binds.keys() {
        let gang = name
            .strip_prefix("gang-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|g| g.parse().ok())
            .expect("gang pod name");
        *bound.entry(gang).or_default() += 1;
    }
    let whole = bound.values().filter(|&&n| n == GANG_MEMBERS).count();
    let partly = bound.values().filter(|&&n| n < GANG_MEMBERS).count();
    (whole, partly, gangs - whole - partly)
}

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let nodes = args.first().copied().unwrap_or(500);
    let single_pods = args.get(1).copied().unwrap_or(5000);
    let gangs = args.get(2).copied().unwrap_or(600);
    let gpus = nodes * GPUS_PER_NODE;
    // Deleting thousands of pods in one call outlasts the tests' 30 s read timeout.
    let client = client_with_read_timeout(None).await;
    let ns = namespace(&client, "bench-sched").await;
    let work = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&work).unwrap();
    println!("scheduler_vs_kube: {nodes} kwok nodes x {GPUS_PER_NODE} GPUs = {gpus} GPUs");
    println!(
        "limits: kube-scheduler client qps={KUBE_QPS} burst={KUBE_BURST}; ringmaster-scheduler: kube-rs client \
         (no client-side rate limit), --bind-concurrency {BIND_CONCURRENCY}; kube-apiserver (e2e/cluster.sh): \
         --max-requests-inflight=2000 --max-mutating-requests-inflight=1000 --enable-priority-and-fairness=false"
    );
    let t = Instant::now();
    create_nodes(&client, &ns, nodes).await;
    eprintln!("nodes Ready in {:.1} s", t.elapsed().as_secs_f64());

    println!("\n(a) {single_pods} one-GPU pods");
    let mut rates = Vec::new();
    for which in [Which::Ringmaster, Which::Kube] {
        let pods = (0..single_pods)
            .map(|i| bench_pod(&ns, &format!("pod-{i}"), which, None))
            .collect();
        let expected = single_pods.min(gpus);
        let r = round(
            &client,
            &ns,
            which,
            (pods, Arrival::Backlog),
            expected,
            &work,
        )
        .await;
        println!(
            "  {:<21} bound {:>5}/{expected} in {:>6.2} s: {:>7.1} pods/s from start ({:>7.1} pods/s first to last bind; first bind at {:.2} s)",
            which.label(),
            r.binds.len(),
            r.last().as_secs_f64(),
            r.rate(),
            r.steady_rate(),
            r.first().as_secs_f64(),
        );
        rates.push((r.rate(), r.steady_rate()));
    }
    println!(
        "  ratio ringmaster/kube: {:.2}x from start, {:.2}x first to last bind",
        rates[0].0 / rates[1].0,
        rates[0].1 / rates[1].1
    );

    let fit = (gpus / GANG_MEMBERS).min(gangs);
    println!("\n(b) {gangs} gangs x {GANG_MEMBERS} one-GPU pods arriving together ({fit} fit)");
    for which in [Which::Ringmaster, Which::Kube] {
        // Every job's controller creates its pods at once: members interleave.
        let pods = (0..GANG_MEMBERS)
            .flat_map(|m| {
                let ns = &ns;
                (0..gangs).map(move |g| {
                    bench_pod(
                        ns,
                        &format!("gang-{g}-{m}"),
                        which,
                        Some(&format!("gang-{g}")),
                    )
                })
            })
            .collect();
        let r = round(
            &client,
            &ns,
            which,
            (pods, Arrival::Live),
            fit * GANG_MEMBERS,
            &work,
        )
        .await;
        let (whole, partly, none) = gang_outcome(&r, gangs);
        println!(
            "  {:<21} {:>5} pods bound in {:>6.2} s: {whole} gangs whole, {partly} partly placed, {none} not placed",
            which.label(),
            r.binds.len(),
            r.last().as_secs_f64(),
        );
    }

    let _ = Api::<Node>::all(client.clone())
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{BENCH_LABEL}={ns}")),
        )
        .await;
    delete_namespace(&client, &ns).await;
}
