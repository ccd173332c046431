//! ringmaster-scheduler against kube-scheduler, one after the other on the same cluster
//! and the same kwok nodes:
//!
//! (a) N one-GPU pods: pods bound per second, and the ratio of the two;
//! (b) G gangs of 8 one-GPU pods arriving together (more than fit; members interleaved,
//!     as when every job's controller creates its pods at once, created while the
//!     scheduler runs): the time from the first creation to binding every gang that
//!     fits, and how many gangs end up whole, partly placed or waiting;
//! (c) the openb trace's GPU pods (`default`: shares of one GPU and whole GPUs, CPU and
//!     memory as recorded) in the trace's arrival order, cycled until the arrived GPU
//!     demand is 130% of the cluster's GPUs, created while the scheduler runs: pods per
//!     second, and at the end the GPU allocation (GPU the placed pods asked for, over
//!     capacity), the GPU held and the fragmentation (the placement crate's FGD measure
//!     against the trace's typical pods).
//!
//! Which kube-scheduler: on the pinned control plane (`e2e/cluster.sh up`), the pinned
//! kube-scheduler, which knows no gangs. On `e2e/cluster.sh up --gang-anchor` (an API
//! server serving `scheduling.k8s.io/v1alpha2` PodGroups), kube-scheduler of the API
//! server's version with its own gang scheduling on (`GenericWorkload`,
//! `GangScheduling`): each gang of (b) gets a PodGroup with `minCount` 8 and its pods
//! name it in `spec.schedulingGroup`. kube-scheduler has no GPU sharing: in (c) a pod
//! asking for a share of one GPU asks it for one whole GPU (what a cluster without
//! sharing gives it); its allocation counts the share the pod asked for, its GPU held
//! the whole GPU.
//!
//!   e2e/build-binaries.sh --with-scheduler && e2e/cluster.sh up     # or: up --gang-anchor
//!   cargo bench -p ringmaster-operator --bench scheduler_vs_kube [-- NODES PODS GANGS TRACE_PODS]
//!
//! Defaults: 500 nodes x 8 GPUs, 5,000 pods, 600 gangs, (c) until 130% of the GPUs
//! (TRACE_PODS caps the pods of (c); 0 skips a part). In (a) the pods are created while
//! no scheduler runs and the clock starts when the scheduler process starts (so it
//! includes its start-up, list and watch); in (b) and (c) it starts at the first
//! creation. It stops at the last bind seen by a watch. Between rounds the pods are
//! force-deleted.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use ringmaster_crds::keys::{GANG, GANG_SIZE, GPU_MILLI, GPU_RESOURCE};
use ringmaster_e2e::{
    client_with_read_timeout, delete_namespace, e2e_cache, kubeconfig, namespace, wait_nodes_ready,
    wait_until,
};
use ringmaster_operator::scheduler::cache;
use ringmaster_placement::policy::FragModel;
use ringmaster_placement::{ClusterState, GpuDemand, PodRequest, trace};
use serde_json::{Value, json};

const BENCH_LABEL: &str = "ringmaster.dev/bench";
const GPUS_PER_NODE: usize = 8;
const GANG_MEMBERS: usize = 8;
/// kube-scheduler's client limits, raised so neither scheduler is throttled by its client.
const KUBE_QPS: u32 = 5000;
const KUBE_BURST: u32 = 10000;
/// Gangs ringmaster-scheduler binds at once (its client has no rate limiter).
const BIND_CONCURRENCY: usize = 64;
/// A round ends when no pod has been bound for this long after the last creation or bind,
/// or when nothing at all was bound for `FIRST_BIND` (a gang scheduler may take its time
/// before the first whole gang).
const STALL: Duration = Duration::from_secs(20);
const FIRST_BIND: Duration = Duration::from_secs(120);
/// The openb trace of (c), and the GPU demand that arrives, as a share of capacity.
const TRACE: &str = "default";
const TRACE_ARRIVAL: f64 = 1.3;

#[derive(Clone, Copy, PartialEq)]
enum Which {
    Ringmaster,
    Kube,
}

/// The kube-scheduler this cluster is compared with (see the module comment).
struct KubeScheduler {
    binary: PathBuf,
    version: String,
    /// Upstream gang scheduling is on: gangs get a PodGroup.
    gangs: bool,
}

impl KubeScheduler {
    async fn for_cluster(client: &Client) -> KubeScheduler {
        let version = client
            .apiserver_version()
            .await
            .expect("API server version")
            .git_version;
        let gangs = client
            .list_api_group_resources("scheduling.k8s.io/v1alpha2")
            .await
            .is_ok_and(|list| list.resources.iter().any(|r| r.name == "podgroups"));
        let (binary, build) = if gangs {
            let binary = e2e_cache().join(format!("kubernetes-{version}/kube-scheduler"));
            (binary, "e2e/build-binaries.sh --anchors")
        } else {
            let binary = e2e_cache().join("kube-scheduler");
            (binary, "e2e/build-binaries.sh --with-scheduler")
        };
        assert!(
            binary.exists(),
            "{} missing: run `{build}`",
            binary.display()
        );
        KubeScheduler {
            binary,
            version,
            gangs,
        }
    }

    fn describe(&self) -> String {
        if self.gangs {
            format!(
                "kube-scheduler {} with its gang scheduling (GenericWorkload, GangScheduling; \
                 a PodGroup with minCount {GANG_MEMBERS} per gang)",
                self.version
            )
        } else {
            format!("kube-scheduler {} (no gang scheduling)", self.version)
        }
    }
}

fn pod_groups(client: &Client, ns: &str) -> Api<DynamicObject> {
    let resource = ApiResource {
        group: "scheduling.k8s.io".into(),
        version: "v1alpha2".into(),
        api_version: "scheduling.k8s.io/v1alpha2".into(),
        kind: "PodGroup".into(),
        plural: "podgroups".into(),
    };
    Api::namespaced_with(client.clone(), ns, &resource)
}

impl Which {
    fn label(self) -> &'static str {
        match self {
            Which::Ringmaster => "ringmaster-scheduler",
            Which::Kube => "kube-scheduler",
        }
    }

    /// Prefixes the names of this scheduler's pods and gangs. Names are never reused between
    /// rounds: kwok finishes a deleted pod by name, and would delete its successor.
    fn tag(self) -> &'static str {
        match self {
            Which::Ringmaster => "rm",
            Which::Kube => "kube",
        }
    }

    /// The `spec.schedulerName` this scheduler serves.
    fn scheduler_name(self) -> &'static str {
        match self {
            Which::Ringmaster => "ringmaster-scheduler",
            Which::Kube => "default-scheduler",
        }
    }

    /// Starts the scheduler, logging to `<work>/<part>-<scheduler>.log`.
    fn start(self, ns: &str, work: &std::path::Path, part: &str, kube: &KubeScheduler) -> Child {
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
                let mut cmd = Command::new(&kube.binary);
                cmd.arg(format!("--config={}", config.display()))
                    .arg("--secure-port=0")
                    // KUBE_SCHEDULER_V=4 logs each gang's progress.
                    .arg(format!(
                        "-v={}",
                        std::env::var("KUBE_SCHEDULER_V").unwrap_or("0".into())
                    ));
                if kube.gangs {
                    cmd.arg("--feature-gates=GenericWorkload=true,GangScheduling=true");
                }
                cmd
            }
        };
        cmd.env("KUBECONFIG", kubeconfig())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(work.join(format!("{part}-{}.log", self.label()))).unwrap(),
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", self.label()))
    }
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
    // 5,000 kwok nodes take minutes to report Ready on two busy cores.
    wait_nodes_ready(client, &selector, count, Duration::from_secs(900)).await;
}

/// What a bench pod asks for, and of whom.
struct BenchPod<'a> {
    name: String,
    request: &'a PodRequest,
    /// The gang (ringmaster's label; kube-scheduler's PodGroup where it has gangs).
    gang: Option<String>,
}

/// A one-GPU pod with a small CPU and memory request: the shape of (a) and (b).
fn one_gpu() -> PodRequest {
    PodRequest::new("one-gpu", 100, 64, GpuDemand::Whole(1))
}

/// The pod as each scheduler's users write it: ringmaster takes a share of one GPU as an
/// annotation; kube-scheduler knows only whole GPUs, so a share asks it for one.
fn bench_pod(ns: &str, pod: &BenchPod, which: Which, kube_gangs: bool) -> Value {
    let req = pod.request;
    let name = format!("{}-{}", which.tag(), pod.name);
    let mut metadata = json!({"name": name, "namespace": ns});
    let mut spec = json!({
        "schedulerName": which.scheduler_name(),
        "nodeSelector": {BENCH_LABEL: ns},
        "tolerations": [
            {"key": BENCH_LABEL, "operator": "Exists", "effect": "NoSchedule"},
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoSchedule"},
        ],
    });
    let gpus = match (which, req.gpu) {
        (_, GpuDemand::None) => 0,
        (_, GpuDemand::Whole(k)) => k,
        (Which::Kube, GpuDemand::Share(_)) => 1,
        (Which::Ringmaster, GpuDemand::Share(m)) => {
            metadata["annotations"][GPU_MILLI] = json!(m.to_string());
            0
        }
    };
    match (which, &pod.gang) {
        (_, None) => {}
        (Which::Ringmaster, Some(g)) => {
            metadata["labels"] = json!({GANG: format!("{}-{g}", which.tag())});
            metadata["annotations"][GANG_SIZE] = json!(GANG_MEMBERS.to_string());
        }
        (Which::Kube, Some(g)) if kube_gangs => {
            spec["schedulingGroup"] = json!({"podGroupName": format!("{}-{g}", which.tag())})
        }
        (Which::Kube, Some(_)) => {}
    }
    let mut resources = json!({"requests": {"cpu": format!("{}m", req.cpu_milli), "memory": format!("{}Mi", req.memory_mib)}});
    if gpus > 0 {
        resources["limits"] = json!({GPU_RESOURCE: gpus.to_string()});
    }
    spec["containers"] = json!([{"name": "c", "image": "busybox", "resources": resources}]);
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
}

/// When each pod was first seen bound, by name.
type Binds = Arc<Mutex<HashMap<String, Instant>>>;

struct Round {
    started: Instant,
    binds: HashMap<String, Instant>,
    /// The bench nodes with every pod that was bound at the end of the round.
    end: ClusterState,
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

    /// `<scheduler> <pods> pods bound in <s> s (<rate> pods/s)`, the start of a result line.
    fn bound_line(&self, which: Which) -> String {
        format!(
            "  {:<21} {:>5} pods bound in {:>6.2} s ({:>7.1} pods/s)",
            which.label(),
            self.binds.len(),
            self.last().as_secs_f64(),
            self.rate(),
        )
    }

    /// Pods per second from the clock's start to the last bind.
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
    /// The scheduler runs first; the clock starts with the first pod's creation, and the
    /// pods are created in order (64 requests in flight).
    Live,
}

/// A round's pods and, for kube-scheduler with gangs, their PodGroups.
struct Workload {
    pods: Vec<Value>,
    pod_groups: Vec<String>,
    arrival: Arrival,
}

impl Workload {
    fn live(pods: Vec<Value>, pod_groups: Vec<String>) -> Workload {
        Workload {
            pods,
            pod_groups,
            arrival: Arrival::Live,
        }
    }
}

fn print_ratio(rates: &[f64]) {
    println!(
        "  ratio ringmaster/kube: {:.2}x pods/s",
        rates[0] / rates[1]
    );
}

async fn create_all(api: &Api<DynamicObject>, objects: Vec<Value>) -> Duration {
    let created = Instant::now();
    futures::stream::iter(objects)
        .for_each_concurrent(64, |object| {
            let api = api.clone();
            async move {
                let object: DynamicObject = serde_json::from_value(object).expect("bench object");
                api.create(&PostParams::default(), &object)
                    .await
                    .unwrap_or_else(|e| panic!("create {}: {e}", object.name_any()));
            }
        })
        .await;
    created.elapsed()
}

/// Runs `which` on `workload` (see `Arrival`) and records binds until `expected` pods
/// are bound or nothing is bound for `STALL`; then removes the pods.
async fn round(
    client: &Client,
    ns: &str,
    (part, which, kube): (&str, Which, &KubeScheduler),
    workload: Workload,
    expected: usize,
    work: &std::path::Path,
) -> Round {
    let api = Api::<Pod>::namespaced(client.clone(), ns);
    let dynamic =
        Api::<DynamicObject>::namespaced_with(client.clone(), ns, &ApiResource::erase::<Pod>(&()));
    let groups = pod_groups(client, ns);
    let total = workload.pods.len();
    let names: Vec<String> = workload
        .pods
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect();
    let group_objects: Vec<Value> = workload
        .pod_groups
        .iter()
        .map(|g| {
            json!({
                "apiVersion": "scheduling.k8s.io/v1alpha2", "kind": "PodGroup",
                "metadata": {"name": g, "namespace": ns},
                "spec": {"schedulingPolicy": {"gang": {"minCount": GANG_MEMBERS}}},
            })
        })
        .collect();
    create_all(&groups, group_objects).await;
    let mut pods = Some(workload.pods);
    if workload.arrival == Arrival::Backlog {
        let took = create_all(&dynamic, pods.take().unwrap()).await;
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
    let mut scheduler = which.start(ns, work, part, kube);
    let mut started = Instant::now();
    if let Some(pods) = pods {
        // Leadership, informers synced: then the pods arrive.
        tokio::time::sleep(Duration::from_secs(3)).await;
        started = Instant::now();
        let took = create_all(&dynamic, pods).await;
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
        let stalled = if bound == 0 {
            progress.elapsed() > FIRST_BIND
        } else {
            progress.elapsed() > STALL
        };
        if bound >= expected || stalled {
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
    let end = end_state(client, ns).await;
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
    if !workload.pod_groups.is_empty() {
        let _ = groups
            .delete_collection(&DeleteParams::default(), &ListParams::default())
            .await;
    }
    wait_until(Duration::from_secs(300), "bench pods deleted", || async {
        api.list(&ListParams::default().limit(1))
            .await
            .is_ok_and(|l| l.items.is_empty())
    })
    .await;
    Round {
        started,
        binds,
        end,
    }
}

/// The bench nodes as the placement engine sees them, with every pod bound there (GPU
/// devices from ringmaster's annotation, else the first that fit, as kube-scheduler's
/// device plugin would hand them out).
async fn end_state(client: &Client, ns: &str) -> ClusterState {
    let selector = format!("{BENCH_LABEL}={ns}");
    let nodes = Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await
        .expect("list bench nodes")
        .items;
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list bench pods")
        .items;
    cache::build_state(&nodes, &pods, &HashMap::new())
}

/// Gangs by how many of their members were bound: (whole, partly, none).
fn gang_outcome(round: &Round, gangs: usize) -> (usize, usize, usize) {
    let mut bound: BTreeMap<usize, usize> = BTreeMap::new();
    for name in round.binds.keys() {
        let gang = name
            .split_once("-gang-")
            .map(|(_tag, rest)| rest)
            .and_then(|rest| rest.split('-').next())
            .and_then(|g| g.parse().ok())
            .expect("gang pod name");
        *bound.entry(gang).or_default() += 1;
    }
    let whole = bound.values().filter(|&&n| n == GANG_MEMBERS).count();
    let partly = bound.values().filter(|&&n| n < GANG_MEMBERS).count();
    (whole, partly, gangs - whole - partly)
}

/// The trace's GPU pods in arrival order (the CSV is in creation order), cycled until
/// their GPU demand reaches `TRACE_ARRIVAL` of `capacity_milli`, at most `cap` pods; GPU
/// models are dropped (every bench node has the same).
fn trace_stream(capacity_milli: u64, cap: usize) -> Vec<PodRequest> {
    let path = trace::default_dir().join(format!("alibaba-gpu-v2023/openb_pod_list_{TRACE}.csv"));
    let pods: Vec<PodRequest> = trace::read_pods(&path)
        .unwrap_or_else(|e| panic!("{e}"))
        .into_iter()
        .filter(|p| p.gpu != GpuDemand::None)
        .map(|p| PodRequest {
            gpu_models: Vec::new(),
            ..p
        })
        .collect();
    let target = (capacity_milli as f64 * TRACE_ARRIVAL) as u64;
    let mut arrived = 0;
    let mut stream = Vec::new();
    for (i, p) in pods.iter().cycle().enumerate() {
        if arrived >= target || stream.len() >= cap {
            break;
        }
        arrived += p.gpu.total_milli();
        stream.push(PodRequest {
            name: format!("trace-{i}"),
            ..p.clone()
        });
    }
    stream
}

/// (allocation, GPU held, fragmentation), each in % of the cluster's GPUs: the GPU the
/// bound pods asked for, the GPU their devices hold, and FGD's expected fragmentation.
/// Held and fragmentation cover the nodes Ready at the end (`end_state`); the caller
/// warns when kwok has let some lapse.
fn gpu_use(
    round: &Round,
    capacity_milli: u64,
    asked: &HashMap<String, u64>,
    typical: &FragModel,
) -> (f64, f64, f64) {
    let allocated: u64 = round
        .binds
        .keys()
        .filter_map(|n| asked.get(n.split_once('-')?.1))
        .sum();
    let held: u64 = round.end.nodes().iter().map(|n| n.gpu_used_total()).sum();
    let frag: f64 = round.end.nodes().iter().map(|n| typical.node_frag(n)).sum();
    let pct = |x: f64| 100.0 * x / capacity_milli as f64;
    (pct(allocated as f64), pct(held as f64), pct(frag))
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
    let trace_cap = args.get(3).copied().unwrap_or(usize::MAX);
    let gpus = nodes * GPUS_PER_NODE;
    // Deleting thousands of pods in one call outlasts the tests' 30 s read timeout.
    let client = client_with_read_timeout(None).await;
    let kube = KubeScheduler::for_cluster(&client).await;
    let ns = namespace(&client, "bench-sched").await;
    let work = std::env::temp_dir().join(&ns);
    std::fs::create_dir_all(&work).unwrap();
    println!("scheduler_vs_kube: {nodes} kwok nodes x {GPUS_PER_NODE} GPUs = {gpus} GPUs");
    println!("against: {}", kube.describe());
    println!(
        "limits: kube-scheduler client qps={KUBE_QPS} burst={KUBE_BURST}; ringmaster-scheduler: kube-rs client \
         (no client-side rate limit), --bind-concurrency {BIND_CONCURRENCY}; kube-apiserver (e2e/cluster.sh): \
         --max-requests-inflight=2000 --max-mutating-requests-inflight=1000 --enable-priority-and-fairness=false"
    );
    let t = Instant::now();
    create_nodes(&client, &ns, nodes).await;
    eprintln!("nodes Ready in {:.1} s", t.elapsed().as_secs_f64());
    let one = one_gpu();

    if single_pods > 0 {
        println!("\n(a) {single_pods} one-GPU pods");
        let mut rates = Vec::new();
        for which in [Which::Ringmaster, Which::Kube] {
            let pods = (0..single_pods)
                .map(|i| {
                    let pod = BenchPod {
                        name: format!("pod-{i}"),
                        request: &one,
                        gang: None,
                    };
                    bench_pod(&ns, &pod, which, kube.gangs)
                })
                .collect();
            let workload = Workload {
                pods,
                pod_groups: Vec::new(),
                arrival: Arrival::Backlog,
            };
            let expected = single_pods.min(gpus);
            let r = round(&client, &ns, ("a", which, &kube), workload, expected, &work).await;
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
    }

    if gangs > 0 {
        let fit = (gpus / GANG_MEMBERS).min(gangs);
        println!("\n(b) {gangs} gangs x {GANG_MEMBERS} one-GPU pods arriving together ({fit} fit)");
        let mut rates = Vec::new();
        for which in [Which::Ringmaster, Which::Kube] {
            // Every job's controller creates its pods at once: members interleave.
            let pods = (0..GANG_MEMBERS)
                .flat_map(|m| (0..gangs).map(move |g| (g, m)))
                .map(|(g, m)| {
                    let gang = Some(format!("gang-{g}"));
                    let pod = BenchPod {
                        name: format!("gang-{g}-{m}"),
                        request: &one,
                        gang,
                    };
                    bench_pod(&ns, &pod, which, kube.gangs)
                })
                .collect();
            let pod_groups = if which == Which::Kube && kube.gangs {
                (0..gangs)
                    .map(|g| format!("{}-gang-{g}", which.tag()))
                    .collect()
            } else {
                Vec::new()
            };
            let workload = Workload::live(pods, pod_groups);
            let r = round(
                &client,
                &ns,
                ("b", which, &kube),
                workload,
                fit * GANG_MEMBERS,
                &work,
            )
            .await;
            let (whole, partly, none) = gang_outcome(&r, gangs);
            println!(
                "{}: {whole} gangs whole, {partly} partly placed, {none} waiting",
                r.bound_line(which)
            );
            rates.push(r.rate());
        }
        print_ratio(&rates);
    }

    if trace_cap > 0 {
        let stream = trace_stream((gpus * 1000) as u64, trace_cap);
        let asked: HashMap<String, u64> = stream
            .iter()
            .map(|p| (p.name.clone(), p.gpu.total_milli()))
            .collect();
        let shares = stream
            .iter()
            .filter(|p| matches!(p.gpu, GpuDemand::Share(_)))
            .count();
        let arrived: u64 = asked.values().sum();
        let typical = FragModel::from_workload(&stream);
        println!(
            "\n(c) openb `{TRACE}` GPU pods in arrival order: {} pods ({shares} GPU shares), {:.0}% of the GPUs arrive",
            stream.len(),
            100.0 * arrived as f64 / (gpus * 1000) as f64
        );
        let mut rates = Vec::new();
        for which in [Which::Ringmaster, Which::Kube] {
            let pods = stream
                .iter()
                .map(|p| {
                    let pod = BenchPod {
                        name: p.name.clone(),
                        request: p,
                        gang: None,
                    };
                    bench_pod(&ns, &pod, which, kube.gangs)
                })
                .collect();
            let workload = Workload::live(pods, Vec::new());
            let r = round(
                &client,
                &ns,
                ("c", which, &kube),
                workload,
                stream.len(),
                &work,
            )
            .await;
            let (allocation, held, frag) = gpu_use(&r, (gpus * 1000) as u64, &asked, &typical);
            if r.end.nodes().len() < nodes {
                println!(
                    "  (only {} of {nodes} nodes Ready at the end: held and fragmentation leave out the others)",
                    r.end.nodes().len()
                );
            }
            println!(
                "{}: GPU allocation {allocation:.2}%, held {held:.2}%, fragmentation {frag:.2}%",
                r.bound_line(which)
            );
            rates.push(r.rate());
        }
        print_ratio(&rates);
    }

    let _ = Api::<Node>::all(client.clone())
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("{BENCH_LABEL}={ns}")),
        )
        .await;
    delete_namespace(&client, &ns).await;
}
