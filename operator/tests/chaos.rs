//! Chaos: `ringmaster-operator` and `ringmaster-scheduler` SIGKILLed at random moments
//! and restarted, during a burst of new jobs and during whole-gang restart waves, against
//! the local control plane (kwok runs the pods). A monitor checks the invariants of
//! docs/operator.md all along; after each wave every job must converge exactly.
//!
//! CI runs the short version (one round: 8 jobs, 2 waves). The long one:
//!   RINGMASTER_CHAOS_ROUNDS=10 RINGMASTER_CHAOS_JOBS=20 RINGMASTER_CHAOS_WAVES=3 \
//!     cargo test -p ringmaster-operator --test chaos -- --nocapture
//! `RINGMASTER_CHAOS_SEED` replays a run (the seed is printed).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ringmaster_crds::keys::{ATTEMPT, JOB_NAME};
use ringmaster_crds::{JobPhase, TrainingJob};
use ringmaster_e2e::{POOL, Pool, ServedProcess, client, delete_namespace, namespace};

const WORKERS: usize = 4;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The two components under test. A restarted one comes back under a new identity half
/// of the time (a Deployment's new pod: it waits for the dead leader's lease to expire)
/// and under the same one otherwise (a StatefulSet's pod: it takes the lease at once).
struct ControlPlane {
    ns: String,
    operator: ServedProcess,
    scheduler: ServedProcess,
    kills: usize,
}

impl ControlPlane {
    fn start(ns: &str) -> Self {
        Self {
            ns: ns.to_string(),
            operator: Self::operator(ns, 0),
            scheduler: Self::scheduler(ns, 0),
            kills: 0,
        }
    }

    fn operator(ns: &str, incarnation: usize) -> ServedProcess {
        ServedProcess::start(
            env!("CARGO_BIN_EXE_ringmaster-operator"),
            ns,
            &[
                "--identity",
                &format!("op-{incarnation}"),
                "--lease-duration-seconds",
                "3",
                // kwok deletes a terminating pod by name without a UID precondition, and
                // under load it can repeat that delete a second or two later: a new pod
                // reusing the name within that window dies too (a kubelet deletes with the
                // UID precondition, so real nodes do not do this). A backoff past that
                // window keeps kwok's artefact out of the restart counts.
                "--restart-backoff-seconds",
                "2",
            ],
        )
    }

    fn scheduler(ns: &str, incarnation: usize) -> ServedProcess {
        ServedProcess::start(
            env!("CARGO_BIN_EXE_ringmaster-scheduler"),
            ns,
            &[
                "--identity",
                &format!("sched-{incarnation}"),
                "--lease-duration-seconds",
                "3",
            ],
        )
    }

    fn kill_operator(&mut self, rng: &mut StdRng) {
        self.operator.kill();
        self.operator = Self::operator(&self.ns, rng.random_range(0..2));
        self.kills += 1;
    }

    fn kill_scheduler(&mut self, rng: &mut StdRng) {
        self.scheduler.kill();
        self.scheduler = Self::scheduler(&self.ns, rng.random_range(0..2));
        self.kills += 1;
    }

    /// Kills one of the two (or both) at random moments for `span`.
    async fn rampage(&mut self, rng: &mut StdRng, span: Duration) {
        let end = Instant::now() + span;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..600))).await;
            match rng.random_range(0..3) {
                0 => self.kill_operator(rng),
                1 => self.kill_scheduler(rng),
                _ => {
                    self.kill_operator(rng);
                    self.kill_scheduler(rng);
                }
            }
        }
    }
}

fn job(name: &str, ns: &str, backoff_limit: u64) -> TrainingJob {
    let yaml = format!(
        r#"
apiVersion: ringmaster.dev/v1alpha1
kind: TrainingJob
metadata: {{name: {name}}}
spec:
  model: {{architecture: bert, source: /models/minilm, labels: [ham, spam]}}
  data: {{train: /data/train.csv, format: csv}}
  distribution: {{workers: {WORKERS}, gpusPerWorker: 1}}
  runPolicy: {{restartPolicy: OnFailure, backoffLimit: {backoff_limit}}}
  template:
    nodeSelector: {{{POOL}: {ns}}}
    tolerations:
    - {{key: {POOL}, operator: Exists, effect: NoSchedule}}
    - {{key: node.kubernetes.io/not-ready, operator: Exists, effect: NoSchedule}}
"#
    );
    serde_yaml::from_str(&yaml).unwrap()
}

fn attempt(pod: &Pod) -> i32 {
    pod.labels()[ATTEMPT].parse().unwrap()
}

fn phase(job: &TrainingJob) -> Option<JobPhase> {
    job.status.as_ref()?.phase
}

fn restarts(job: &TrainingJob) -> i32 {
    job.status.as_ref().map_or(0, |s| s.restarts)
}

/// Failures injected so far, per job; read by the monitor.
type Injected = Arc<Mutex<BTreeMap<String, i32>>>;

/// Samples pods then jobs (so a job is never older than its pods) and records every
/// broken invariant:
/// - one attempt per job at a time (no pod of a new attempt before the old ones are gone);
/// - no pod of an attempt the job's status has not committed;
/// - `status.restarts` never decreases and never exceeds the failures injected;
/// - never more pods than workers.
async fn monitor(
    client: Client,
    ns: String,
    injected: Injected,
    violations: Arc<Mutex<Vec<String>>>,
) {
    let pods_api = Api::<Pod>::namespaced(client.clone(), &ns);
    let jobs_api = Api::<TrainingJob>::namespaced(client, &ns);
    let mut seen_restarts: BTreeMap<String, i32> = BTreeMap::new();
    loop {
        let pods = pods_api.list(&ListParams::default()).await;
        let jobs = jobs_api.list(&ListParams::default()).await;
        let (Ok(pods), Ok(jobs)) = (pods, jobs) else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut by_job: BTreeMap<String, Vec<&Pod>> = BTreeMap::new();
        for pod in &pods.items {
            by_job
                .entry(pod.labels()[JOB_NAME].clone())
                .or_default()
                .push(pod);
        }
        let injected = injected.lock().unwrap().clone();
        let mut found = Vec::new();
        for job in &jobs.items {
            let name = job.name_any();
            let committed = restarts(job);
            let pods = by_job.remove(&name).unwrap_or_default();
            let attempts: BTreeSet<i32> = pods.iter().map(|p| attempt(p)).collect();
            if attempts.len() > 1 {
                found.push(format!("{name}: pods of attempts {attempts:?} at once"));
            }
            if let Some(a) = attempts.iter().find(|a| **a > committed) {
                found.push(format!(
                    "{name}: a pod of attempt {a} but status.restarts is {committed}"
                ));
            }
            if pods.len() > WORKERS {
                found.push(format!("{name}: {} pods for {WORKERS} workers", pods.len()));
            }
            let before = seen_restarts.insert(name.clone(), committed).unwrap_or(0);
            if committed < before {
                found.push(format!(
                    "{name}: status.restarts went from {before} to {committed}"
                ));
            }
            let failures = injected.get(&name).copied().unwrap_or(0);
            if committed > failures {
                found.push(format!(
                    "{name}: status.restarts is {committed} after {failures} injected failures"
                ));
            }
        }
        if !found.is_empty() {
            eprintln!("chaos monitor: {found:?}");
            violations.lock().unwrap().extend(found);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until every job is Running on attempt `want` with a whole gang: exactly
/// `WORKERS` pods, all of that attempt, all bound and running. Panics with the jobs that
/// did not get there.
async fn converge(client: &Client, ns: &str, jobs: &[String], want: i32, timeout: Duration) {
    let pods_api = Api::<Pod>::namespaced(client.clone(), ns);
    let jobs_api = Api::<TrainingJob>::namespaced(client.clone(), ns);
    let start = Instant::now();
    loop {
        let pods = pods_api.list(&ListParams::default()).await.unwrap().items;
        let mut lagging = Vec::new();
        for name in jobs {
            let job = jobs_api.get(name).await.unwrap();
            let mine: Vec<&Pod> = pods
                .iter()
                .filter(|p| p.labels()[JOB_NAME] == *name)
                .collect();
            let whole = mine.len() == WORKERS
                && mine.iter().all(|p| {
                    attempt(p) == want
                        && p.metadata.deletion_timestamp.is_none()
                        && p.spec.as_ref().unwrap().node_name.is_some()
                        && p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                });
            if !(whole && phase(&job) == Some(JobPhase::Running) && restarts(&job) == want) {
                let states: Vec<String> = mine
                    .iter()
                    .map(|p| {
                        format!(
                            "{}@{} {} {}",
                            p.name_any(),
                            attempt(p),
                            p.status
                                .as_ref()
                                .and_then(|s| s.phase.clone())
                                .unwrap_or_default(),
                            p.spec
                                .as_ref()
                                .unwrap()
                                .node_name
                                .as_deref()
                                .unwrap_or("unbound")
                        )
                    })
                    .collect();
                lagging.push(format!(
                    "{name}: {:?} restarts {} pods {states:?}",
                    phase(&job),
                    restarts(&job)
                ));
            }
        }
        if lagging.is_empty() {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "not converged to attempt {want} after {timeout:?}:\n{}",
            lagging.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn fail_one_worker(client: &Client, ns: &str, job: &str, rng: &mut StdRng) {
    let pod = format!("{job}-worker-{}", rng.random_range(0..WORKERS));
    let patch =
        serde_json::json!({"metadata": {"annotations": {"ringmaster.dev/kwok-exit-code": "1"}}});
    Api::<Pod>::namespaced(client.clone(), ns)
        .patch(&pod, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
}

/// One round: a burst of new jobs under fire, `waves` restart waves under fire, then every
/// job finishes and is deleted.
struct Round<'a> {
    client: &'a Client,
    ns: &'a str,
    names: Vec<String>,
    waves: i32,
    injected: &'a Injected,
    converge_within: Duration,
}

impl Round<'_> {
    async fn run(&self, plane: &mut ControlPlane, rng: &mut StdRng) {
        let (client, ns) = (self.client, self.ns);
        // A burst of new jobs while both components die and come back.
        let api = Api::<TrainingJob>::namespaced(client.clone(), ns);
        let burst = {
            let (api, ns, names) = (api.clone(), ns.to_string(), self.names.clone());
            let backoff_limit = (self.waves + 1) as u64;
            tokio::spawn(async move {
                for name in &names {
                    api.create(&PostParams::default(), &job(name, &ns, backoff_limit))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        };
        plane.rampage(rng, Duration::from_secs(4)).await;
        burst.await.unwrap();
        converge(client, ns, &self.names, 0, self.converge_within).await;

        // Restart waves: one worker of every job fails, and the components die 0.05-0.6 s
        // later (while the operator deletes and recreates gangs and the scheduler binds).
        for wave in 1..=self.waves {
            let started = Instant::now();
            for name in &self.names {
                fail_one_worker(client, ns, name, rng).await;
                *self
                    .injected
                    .lock()
                    .unwrap()
                    .entry(name.clone())
                    .or_default() += 1;
            }
            tokio::time::sleep(Duration::from_millis(rng.random_range(50..600))).await;
            plane.kill_operator(rng);
            let span = Duration::from_millis(rng.random_range(1000..3000));
            plane.rampage(rng, span).await;
            converge(client, ns, &self.names, wave, self.converge_within).await;
            eprintln!(
                "chaos: wave {wave}/{} converged in {:.1}s ({} kills so far)",
                self.waves,
                started.elapsed().as_secs_f64(),
                plane.kills
            );
        }

        // Every job finishes (worker 0 exits 0) while the operator restarts once more.
        let pods = Api::<Pod>::namespaced(client.clone(), ns);
        for name in &self.names {
            let patch = serde_json::json!({"metadata": {"annotations": {"ringmaster.dev/kwok-exit-code": "0"}}});
            let worker = format!("{name}-worker-0");
            pods.patch(&worker, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .unwrap();
        }
        plane.kill_operator(rng);
        let start = Instant::now();
        loop {
            let mut done = 0;
            for name in &self.names {
                let job = api.get(name).await.unwrap();
                if phase(&job) == Some(JobPhase::Succeeded) && restarts(&job) == self.waves {
                    done += 1;
                }
            }
            if done == self.names.len() {
                break;
            }
            assert!(
                start.elapsed() < self.converge_within,
                "{done}/{} jobs Succeeded with restarts {}",
                self.names.len(),
                self.waves
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        for name in &self.names {
            api.delete(name, &DeleteParams::background()).await.unwrap();
        }
        let gone = Instant::now();
        while !pods
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
        {
            assert!(
                gone.elapsed() < self.converge_within,
                "pods of deleted jobs remain"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test]
async fn operator_and_scheduler_killed_at_random_stay_correct() {
    let rounds = env_or("RINGMASTER_CHAOS_ROUNDS", 1);
    let jobs = env_or("RINGMASTER_CHAOS_JOBS", 8) as usize;
    let waves = env_or("RINGMASTER_CHAOS_WAVES", 2) as i32;
    let seed = env_or("RINGMASTER_CHAOS_SEED", rand::random::<u32>().into());
    eprintln!(
        "chaos: {rounds} rounds of {jobs} jobs x {WORKERS} workers, {waves} restart waves each, seed {seed}"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let client = client().await;
    let ns = namespace(&client, "chaos").await;
    let mut pool = Pool::new(&ns);
    pool.add(&client, (jobs * WORKERS).div_ceil(8), 8).await;
    let mut plane = ControlPlane::start(&ns);

    let injected: Injected = Arc::default();
    let violations = Arc::new(Mutex::new(Vec::new()));
    let monitor = tokio::spawn(monitor(
        client.clone(),
        ns.clone(),
        injected.clone(),
        violations.clone(),
    ));
    let started = Instant::now();
    for r in 0..rounds {
        let round = Round {
            client: &client,
            ns: &ns,
            names: (0..jobs).map(|i| format!("r{r}-job-{i}")).collect(),
            waves,
            injected: &injected,
            converge_within: Duration::from_secs(60 + 3 * jobs as u64),
        };
        round.run(&mut plane, &mut rng).await;
        eprintln!("chaos: round {}/{rounds} done", r + 1);
    }
    monitor.abort();
    let violations = violations.lock().unwrap().clone();
    assert!(violations.is_empty(), "invariants broken: {violations:#?}");
    eprintln!(
        "chaos: {rounds} rounds, {} jobs, {} restart waves, {} kills in {:.0}s: no invariant broken",
        rounds as usize * jobs,
        rounds as i32 * waves,
        plane.kills,
        started.elapsed().as_secs_f64()
    );
    delete_namespace(&client, &ns).await;
}
