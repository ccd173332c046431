//! Operator throughput on the local control plane: apply N TrainingJobs of W workers at
//! once and measure how long until every worker pod exists, reconciles per second, and
//! the operator's peak RSS.
//!
//!   e2e/cluster.sh up && cargo bench -p ringmaster-operator --bench operator_burst [-- JOBS WORKERS]

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use ringmaster_crds::TrainingJob;
use ringmaster_e2e::{await_pod_count, client, delete_namespace, namespace, proc_memory_kib};

#[tokio::main]
async fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let jobs = args.first().copied().unwrap_or(200);
    let workers = args.get(1).copied().unwrap_or(4);
    let client = client().await;
    let ns = namespace(&client, "bench-burst").await;
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut operator = Command::new(env!("CARGO_BIN_EXE_ringmaster-operator"))
        .args([
            "--namespace",
            &ns,
            "--lease-namespace",
            &ns,
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("KUBECONFIG", ringmaster_e2e::kubeconfig())
        .env("RUST_LOG", "warn")
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start ringmaster-operator");
    let pid = operator.id();
    tokio::time::sleep(Duration::from_secs(2)).await; // leadership and initial watches

    let api = Api::<TrainingJob>::namespaced(client.clone(), &ns);
    let start = Instant::now();
    futures::stream::iter(0..jobs)
        .for_each_concurrent(32, |i| {
            let api = api.clone();
            async move {
                let job: TrainingJob = serde_yaml::from_str(&format!(
                    "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: burst-{i}}}\n\
                     spec: {{model: {{architecture: bert, source: /m, numClasses: 2}}, data: {{train: /d, format: csv}}, distribution: {{workers: {workers}}}}}"
                ))
                .unwrap();
                api.create(&PostParams::default(), &job).await.expect("create job");
            }
        })
        .await;
    let applied = start.elapsed();

    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let want = jobs * workers;
    let (all_pods, mut peak_rss_kib) = await_pod_count(&pods, want, start, pid).await;
    // Let the follow-up reconciles (gates lifted, status written) settle, then read counters.
    tokio::time::sleep(Duration::from_secs(3)).await;
    peak_rss_kib = peak_rss_kib.max(proc_memory_kib(pid, "VmHWM:"));
    let reconciles = scrape(port, "ringmaster_operator_reconciles_total").await;
    let busy = scrape(port, "ringmaster_operator_reconcile_duration_seconds_sum").await;

    println!("| metric | value |\n|---|---|");
    println!("| jobs x workers | {jobs} x {workers} = {want} pods |");
    println!(
        "| all jobs applied after | {:.2} s |",
        applied.as_secs_f64()
    );
    println!(
        "| all pods exist after first apply | {:.2} s |",
        all_pods.as_secs_f64()
    );
    println!(
        "| all pods exist after last apply | {:.2} s |",
        (all_pods.saturating_sub(applied)).as_secs_f64()
    );
    println!(
        "| reconciles | {reconciles:.0} ({:.0}/s over the burst, {:.1} ms mean) |",
        reconciles / all_pods.as_secs_f64(),
        1000.0 * busy / reconciles.max(1.0)
    );
    println!(
        "| operator peak RSS (VmHWM) | {:.1} MiB |",
        peak_rss_kib as f64 / 1024.0
    );
    let _ = operator.kill();
    let _ = operator.wait();
    delete_namespace(&client, &ns).await;
}

async fn scrape(port: u16, metric: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("metrics endpoint");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body.lines()
        .find(|l| l.starts_with(metric))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0.0)
}
