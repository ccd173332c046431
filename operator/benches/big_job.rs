//! Memory of the operator and the scheduler around one very large TrainingJob: RSS before,
//! at the peak and after the job is deleted (the gang cannot be placed on the small local
//! cluster, so the scheduler holds and explains all of it).
//!
//!   e2e/cluster.sh up && cargo bench -p ringmaster-operator --bench big_job [-- WORKERS]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use ringmaster_crds::TrainingJob;
use ringmaster_e2e::{ServedProcess, client, delete_namespace, namespace, proc_memory_kib};

#[tokio::main]
async fn main() {
    let workers: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let client = client().await;
    let ns = namespace(&client, "bench-big").await;
    let operator = ServedProcess::start(env!("CARGO_BIN_EXE_ringmaster-operator"), &ns, &[]);
    let scheduler = ServedProcess::start(env!("CARGO_BIN_EXE_ringmaster-scheduler"), &ns, &[]);
    let both = [
        ("ringmaster-operator", &operator),
        ("ringmaster-scheduler", &scheduler),
    ];
    tokio::time::sleep(Duration::from_secs(5)).await; // leadership and initial watches
    let before: Vec<u64> = both
        .iter()
        .map(|(_, p)| proc_memory_kib(p.pid(), "VmRSS"))
        .collect();

    let job: TrainingJob = serde_yaml::from_str(&format!(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: big}}\n\
         spec: {{model: {{architecture: bert, source: /m, numClasses: 2}}, data: {{train: /d, format: csv}}, \
         distribution: {{workers: {workers}, gpusPerWorker: 1}}}}"
    ))
    .unwrap();
    let jobs = Api::<TrainingJob>::namespaced(client.clone(), &ns);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns);
    let start = Instant::now();
    jobs.create(&PostParams::default(), &job)
        .await
        .expect("create job");
    let count = || async {
        pods.list_metadata(&ListParams::default())
            .await
            .map_or(0, |l| l.items.len())
    };
    while count().await < workers {
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "pods not created in 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let created = start.elapsed();
    // Gates lifted, the gang found unplaceable and explained on every member.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let peak: Vec<u64> = both
        .iter()
        .map(|(_, p)| proc_memory_kib(p.pid(), "VmHWM"))
        .collect();

    jobs.delete("big", &DeleteParams::background())
        .await
        .expect("delete job");
    let deleting = Instant::now();
    while count().await > 0 {
        assert!(
            deleting.elapsed() < Duration::from_secs(600),
            "pods not gone in 10 minutes"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(25)).await; // two heap trims
    let after: Vec<u64> = both
        .iter()
        .map(|(_, p)| proc_memory_kib(p.pid(), "VmRSS"))
        .collect();

    println!(
        "{workers} workers: all pods created {:.1} s after the apply\n",
        created.as_secs_f64()
    );
    println!("| process | RSS before | peak (VmHWM) | RSS after deletion |\n|---|---|---|---|");
    for (i, (name, _)) in both.iter().enumerate() {
        println!(
            "| {name} | {:.1} MiB | {:.1} MiB | {:.1} MiB |",
            mib(before[i]),
            mib(peak[i]),
            mib(after[i])
        );
    }
    delete_namespace(&client, &ns).await;
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
