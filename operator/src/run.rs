//! Wiring: watches, the controller, leader election, and the health/metrics server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use ringmaster_crds::TrainingJob;
use ringmaster_crds::keys::{MANAGED_BY, MANAGED_BY_VALUE};
use tracing::{info, warn};

use crate::serve::{Endpoints, serve, shutdown_signal, until_leading};

use crate::error::Result;
use crate::memory;
use crate::metrics::Metrics;
use crate::trainingjob::reconcile::{self, Context};

/// How the operator runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch one namespace only (None: all).
    pub namespace: Option<String>,
    /// Where /healthz, /readyz and /metrics are served.
    pub listen: SocketAddr,
    /// Identity in the leader lease (the pod name in a cluster).
    pub identity: String,
    /// Namespace of the leader lease.
    pub lease_namespace: String,
    pub lease_name: String,
    /// How long a dead leader blocks a standby.
    pub lease_duration: Duration,
    pub restart_backoff: Duration,
    /// Reconciles running at once.
    pub concurrency: u16,
}

/// Runs until SIGTERM/SIGINT. Only the holder of the lease reconciles; the others wait,
/// serving health, and take over when the leader's lease expires.
pub async fn run(client: Client, settings: Settings) -> Result<()> {
    let metrics = Metrics::new();
    let (jobs_reader, jobs_writer) = reflector::store::<TrainingJob>();
    let endpoints = Endpoints::new({
        let (metrics, jobs) = (metrics.clone(), jobs_reader.clone());
        move || metrics.render(&jobs)
    });
    let server = tokio::spawn(serve(settings.listen, endpoints.clone()));
    let trimmer = memory::spawn_trimmer();

    let lease_secs = settings.lease_duration.as_secs().max(1);
    let lease = LeaseManagerBuilder::new(client.clone(), &settings.lease_name)
        .with_namespace(&settings.lease_namespace)
        .with_identity(&settings.identity)
        .with_duration(lease_secs)
        .with_grace(lease_secs.div_ceil(3))
        .build()
        .await?;
    let (mut leader, lease_task) = lease.watch().await;
    let mut shutdown = Box::pin(shutdown_signal());

    info!(identity = %settings.identity, "waiting for leadership");
    if !until_leading(&mut leader, &mut shutdown).await {
        server.abort();
        trimmer.abort();
        return Ok(());
    }
    info!(identity = %settings.identity, "leading: starting the TrainingJob controller");

    let (jobs_api, pods_api): (Api<TrainingJob>, Api<Pod>) = match &settings.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (Api::all(client.clone()), Api::all(client.clone())),
    };
    let (pods_reader, pods_writer) = reflector::store::<Pod>();
    let pod_events = watcher(
        pods_api,
        watcher::Config::default().labels(&format!("{MANAGED_BY}={MANAGED_BY_VALUE}")),
    )
    .default_backoff()
    // managedFields are a third of a pod object and nothing here reads them.
    .modify(|pod| pod.managed_fields_mut().clear())
    .reflect(pods_writer)
    .touched_objects();
    let job_events = watcher(jobs_api, watcher::Config::default())
        .default_backoff()
        .modify(|job| job.managed_fields_mut().clear())
        .reflect(jobs_writer)
        .touched_objects();
    let ctx = Arc::new(Context {
        client: client.clone(),
        pods: pods_reader,
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "ringmaster-operator".into(),
                instance: Some(settings.identity.clone()),
            },
        ),
        metrics,
        restart_backoff: settings.restart_backoff,
        own_writes: Default::default(),
    });
    endpoints.set_ready(true);

    let lost_leadership = async move {
        while leader.changed().await.is_ok() {
            if !*leader.borrow() {
                break;
            }
        }
        warn!("lost leadership: stopping");
    };
    let stop = async move {
        tokio::select! {
            _ = &mut shutdown => info!("shutting down"),
            _ = lost_leadership => {},
        }
    };
    // A short debounce folds the events of one job's pods being created together into
    // one reconcile. Bounded concurrency keeps the number of API connections (and their
    // TLS buffers, most of the memory) small; the API server is the bottleneck anyway.
    let config = kube::runtime::controller::Config::default()
        .debounce(Duration::from_millis(250))
        .concurrency(settings.concurrency);
    Controller::for_stream(job_events, jobs_reader)
        .owns_stream(pod_events)
        .with_config(config)
        .graceful_shutdown_on(stop)
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile error");
            }
        })
        .await;

    endpoints.set_ready(false);
    drop(lease_task); // dropping the task handle leaves the lease to expire or be released
    server.abort();
    trimmer.abort();
    Ok(())
}
