//! Helpers for tests that run against the local control plane started by
//! `e2e/cluster.sh up` (the README's test command does that). A test without a cluster
//! fails with instructions instead of being skipped.

use std::future::Future;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Binding, Namespace, ObjectReference, Pod};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::{Api, Client, Config, ResourceExt};

pub mod chart;

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Path of the kubeconfig of the local control plane.
pub fn kubeconfig() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(path) => PathBuf::from(path),
        None => repo_root().join(".e2e/kubeconfig"),
    }
}

/// A client for the local control plane, or a panic that says how to start one.
pub async fn client() -> Client {
    client_with_read_timeout(Some(Duration::from_secs(30))).await
}

/// `client()` with another read timeout (None: wait as long as the server takes, for
/// calls such as deleting thousands of pods at once).
pub async fn client_with_read_timeout(read_timeout: Option<Duration>) -> Client {
    let path = kubeconfig();
    let kubeconfig = kube::config::Kubeconfig::read_from(&path).unwrap_or_else(|e| {
        panic!(
            "no local control plane: cannot read kubeconfig {} ({e}). Run `e2e/cluster.sh up` \
             (or the README's test command, `e2e/test.sh`) first",
            path.display()
        )
    });
    let mut config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("valid kubeconfig");
    config.read_timeout = read_timeout;
    Client::try_from(config).expect("client from kubeconfig")
}

/// A fresh namespace for one test, so tests run in parallel without seeing each other.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            ..Default::default()
        },
        ..Default::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    // The ServiceAccount controller must create `default` before pods can be admitted.
    let sa = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &name);
    wait_until(
        Duration::from_secs(30),
        "default service account",
        || async { sa.get_opt("default").await.ok().flatten().is_some() },
    )
    .await;
    name
}

/// Deletes a test namespace (best effort; the cluster is torn down anyway).
pub async fn delete_namespace(client: &Client, name: &str) {
    let _ = Api::<Namespace>::all(client.clone())
        .delete(name, &DeleteParams::background())
        .await;
}

/// Polls `check` until it is true, panicking with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Binds a pod to a node through the `binding` subresource, as a scheduler does; kwok
/// then runs it. Tests of the operator use this to stand in for a scheduler.
pub async fn bind(client: &Client, pod: &Pod, node: &str) -> kube::Result<()> {
    let ns = pod.namespace().unwrap_or_default();
    let path = format!("/api/v1/namespaces/{ns}/pods/{}/binding", pod.name_any());
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(pod.name_any()),
            namespace: Some(ns),
            ..Default::default()
        },
        target: ObjectReference {
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..Default::default()
        },
    };
    let body = serde_json::to_vec(&binding).expect("binding serialises");
    // The typed Api has no call for the binding subresource: post it directly.
    let request = http::Request::post(path)
        .header("content-type", "application/json")
        .body(body)
        .expect("valid request");
    client.request_text(request).await.map(|_| ())
}

/// Stands in for a scheduler: binds every ungated, unbound pod in the namespace to the
/// kwok nodes in turn, until the task is aborted.
pub fn spawn_binder(client: Client, ns: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let nodes = nodes(&client).await;
        let api = Api::<Pod>::namespaced(client.clone(), &ns);
        let mut next = 0;
        loop {
            if let Ok(list) = api.list(&ListParams::default()).await {
                for pod in list.items {
                    let spec = pod.spec.as_ref().unwrap();
                    let gated = spec
                        .scheduling_gates
                        .as_ref()
                        .is_some_and(|g| !g.is_empty());
                    if spec.node_name.is_none()
                        && !gated
                        && pod.metadata.deletion_timestamp.is_none()
                    {
                        let _ = bind(&client, &pod, &nodes[next % nodes.len()]).await;
                        next += 1;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    })
}

/// Ends a running pod through the kwok stage (e2e/kwok/pod-stages.yaml): 0 succeeds,
/// anything else fails with that exit code.
pub async fn exit_pod(client: &Client, ns: &str, pod: &str, code: i32) {
    use kube::api::{Patch, PatchParams};
    let patch = serde_json::json!({"metadata": {"annotations": {"ringmaster.dev/kwok-exit-code": code.to_string()}}});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch(pod, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap_or_else(|e| panic!("end pod {pod}: {e}"));
}

/// Names of the kwok nodes, in order.
pub async fn nodes(client: &Client) -> Vec<String> {
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    let mut names: Vec<String> = nodes
        .list(&Default::default())
        .await
        .expect("list nodes")
        .iter()
        .map(|n| n.name_any())
        .collect();
    names.sort_by_key(|n| {
        n.rsplit('-')
            .next()
            .and_then(|i| i.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
    names
}

/// The pinned kubectl that `e2e/build-binaries.sh` builds beside the control plane.
pub fn kubectl() -> std::process::Command {
    pinned_tool("kubectl")
}

/// `kubectl apply -f -` of `yaml` with the pinned kubectl; panics if it fails.
pub fn kubectl_apply(yaml: &str) {
    kubectl_apply_with(&[], yaml)
}

/// `kubectl apply <args> -f -` of `yaml`; panics with kubectl's message if refused.
pub fn kubectl_apply_with(args: &[&str], yaml: &str) {
    use std::io::Write;
    let mut child = kubectl()
        .arg("apply")
        .args(args)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(yaml.as_bytes())
        .expect("write to kubectl");
    let out = child.wait_with_output().expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl apply {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `/proc/<pid>/status` memory field (`VmHWM:` is the peak RSS) in KiB; 0 once the
/// process is gone.
pub fn proc_memory_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// For operator benchmarks: polls until `want` pods exist in `pods`' namespace (10
/// minutes at most) while following the peak RSS of the operator `pid`. Returns when they
/// all existed, counted from `since`, and that peak in KiB.
pub async fn await_pod_count(
    pods: &Api<Pod>,
    want: usize,
    since: Instant,
    pid: u32,
) -> (Duration, u64) {
    let mut peak = 0;
    loop {
        peak = peak.max(proc_memory_kib(pid, "VmHWM:"));
        let have = pods
            .list_metadata(&ListParams::default())
            .await
            .map(|l| l.items.len())
            .unwrap_or(0);
        if have >= want {
            return (since.elapsed(), peak);
        }
        assert!(
            since.elapsed() < Duration::from_secs(600),
            "only {have}/{want} pods after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `e2e/gitops-health`, built by `e2e/build-binaries.sh`: Argo CD's Lua health check and
/// Flux's kstatus on one object.
pub fn gitops_health() -> std::process::Command {
    pinned_tool("gitops-health")
}

/// The pinned helm, built by `e2e/build-binaries.sh`.
pub fn helm() -> std::process::Command {
    pinned_tool("helm")
}

/// Where `e2e/build-binaries.sh` keeps what it builds (per version).
pub fn e2e_cache() -> PathBuf {
    std::env::var_os("RINGMASTER_E2E_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
                })
                .join("ringmaster-e2e")
        })
}

fn pinned_tool(name: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(e2e_cache().join(name));
    cmd.env("KUBECONFIG", kubeconfig());
    cmd
}

/// A kubeconfig (YAML) for the local control plane that authenticates with a bearer
/// token, as a pod with that ServiceAccount would.
pub fn token_kubeconfig_yaml(token: &str) -> String {
    let admin = kube::config::Kubeconfig::read_from(kubeconfig()).expect("kubeconfig");
    let cluster = admin.clusters[0].cluster.clone().expect("cluster entry");
    format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: {:?}, certificate-authority: {:?}}}}}]\n\
         users: [{{name: u, user: {{token: {token:?}}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
        cluster.server.unwrap_or_default(),
        cluster.certificate_authority.unwrap_or_default(),
    )
}

/// A client that authenticates with a bearer token (a ServiceAccount's), as a pod would.
pub async fn client_with_token(token: &str) -> Client {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&token_kubeconfig_yaml(token))
        .expect("token kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("token config");
    Client::try_from(config).expect("token client")
}

/// A control-plane binary under test (operator, scheduler) serving `/healthz`, `/readyz`
/// and `/metrics` on a free loopback port; killed on drop, also when the test panics.
/// It runs as the chart installs it: with its ServiceAccount's credentials (never as
/// cluster admin, so every test also proves the chart's RBAC) and its leader lease in
/// the release namespace.
pub struct ServedProcess {
    child: std::process::Child,
    port: u16,
}

impl ServedProcess {
    /// Starts `exe` watching namespace `ns`, with `args` plus `--listen 127.0.0.1:<free
    /// port>`, against the local control plane. Processes started for the same `ns`
    /// share a leader lease.
    pub fn start(exe: &str, ns: &str, args: &[&str]) -> Self {
        let name = exe_name(exe);
        let component = name.strip_prefix("ringmaster-").unwrap_or_else(|| {
            panic!("{exe}: not a chart component (ringmaster-operator or ringmaster-scheduler)")
        });
        let credentials = chart::kubeconfig(component);
        let lease = format!("{name}-{ns}");
        let mut all = vec![
            "--lease-namespace",
            chart::RELEASE_NAMESPACE,
            "--lease-name",
            &lease,
        ];
        all.extend(args);
        Self::start_as(exe, ns, &credentials, &all)
    }

    /// `start` with other credentials (`kubeconfig`), and no lease arguments of its own.
    pub fn start_as(exe: &str, ns: &str, kubeconfig: &std::path::Path, args: &[&str]) -> Self {
        let name = exe_name(exe);
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // RINGMASTER_TEST_LOG_DIR keeps each binary's log (they log to stdout) for a
        // failure to be read afterwards.
        let log = std::env::var_os("RINGMASTER_TEST_LOG_DIR").map(|dir| {
            let path = PathBuf::from(dir).join(&name).with_extension("log");
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
        });
        let stdout = match &log {
            Some(file) => Stdio::from(file.try_clone().expect("log file handle")),
            None => Stdio::null(),
        };
        let stderr = log.map_or(Stdio::inherit(), Stdio::from);
        let child = std::process::Command::new(exe)
            .args(["--namespace", ns])
            .args(args)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("start {exe}: {e}"));
        Self { child, port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `GET path`: the status code and the whole response, or None while not serving.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .ok()?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .ok()?;
        let mut out = String::new();
        stream.read_to_string(&mut out).await.ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        Some((code, out))
    }

    /// Whether it holds its lease (`/readyz` is 200 only on the leader).
    pub async fn leading(&self) -> bool {
        self.get("/readyz")
            .await
            .is_some_and(|(code, _)| code == 200)
    }
}

fn exe_name(exe: &str) -> String {
    std::path::Path::new(exe)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string()
}

impl Drop for ServedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until `count` nodes matching the label `selector` are Ready (kwok's node stage).
pub async fn wait_nodes_ready(client: &Client, selector: &str, count: usize, timeout: Duration) {
    let nodes = Api::<k8s_openapi::api::core::v1::Node>::all(client.clone());
    wait_until(
        timeout,
        &format!("{count} nodes {selector} Ready"),
        || async {
            let list = nodes
                .list(&ListParams::default().labels(selector))
                .await
                .map(|l| l.items)
                .unwrap_or_default();
            let ready = list.iter().filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            });
            ready.count() == count
        },
    )
    .await;
}

/// Label (and taint) of a test's own kwok nodes: its pods select and tolerate it, so
/// other tests' pods on the shared nodes do not matter.
pub const POOL: &str = "ringmaster.dev/test-pool";

/// One test's kwok nodes (named `<ns>-n<i>`); deleted on drop, also when the test panics.
pub struct Pool {
    ns: String,
    count: usize,
}

impl Pool {
    pub fn new(ns: &str) -> Self {
        Self {
            ns: ns.to_string(),
            count: 0,
        }
    }

    /// Adds `count` nodes with `gpus` GPUs each; node i is in zone-a or zone-b by i % 2.
    pub async fn add(&mut self, client: &Client, count: usize, gpus: u32) {
        let mut yaml = String::new();
        for i in self.count..self.count + count {
            let name = format!("{}-n{i}", self.ns);
            let zone = if i.is_multiple_of(2) {
                "zone-a"
            } else {
                "zone-b"
            };
            yaml += &format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  annotations: {{kwok.x-k8s.io/node: fake, node.alpha.kubernetes.io/ttl: '0'}}\n  \
                 labels: {{kubernetes.io/hostname: {name}, type: kwok, topology.kubernetes.io/zone: {zone}, {POOL}: {ns}, nvidia.com/gpu.product: NVIDIA-H200}}\n\
                 spec:\n  taints: [{{key: {POOL}, value: {ns}, effect: NoSchedule}}]\n\
                 status:\n  allocatable: {{cpu: '64', memory: 512Gi, pods: '110', nvidia.com/gpu: '{gpus}'}}\n  \
                 capacity: {{cpu: '64', memory: 512Gi, pods: '110', nvidia.com/gpu: '{gpus}'}}\n---\n",
                ns = self.ns
            );
        }
        self.count += count;
        kubectl_apply(&yaml);
        let selector = format!("{POOL}={}", self.ns);
        wait_nodes_ready(client, &selector, self.count, Duration::from_secs(60)).await;
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let _ = kubectl()
            .args(["delete", "nodes", "-l", &format!("{POOL}={}", self.ns)])
            .args(["--wait=false"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
