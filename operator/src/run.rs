//! Wiring: watches, the controller, leader election, and the health/metrics server.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::{Controller, WatchStreamExt, predicates, reflector, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use ringmaster_crds::keys::{INFERENCE_SERVICE, JOB_NAME, MANAGED_BY, MANAGED_BY_VALUE};
use ringmaster_crds::{InferenceService, TrainingJob};
use tracing::{info, warn};

use crate::serve::{Endpoints, serve, shutdown_signal, until_leading};

use crate::error::Result;
use crate::memory;
use crate::metrics::Metrics;
use crate::{inferenceservice, trainingjob};

/// TrainingJob changes queued for the slower of the two controllers that follow them.
const JOB_EVENTS_BUFFER: usize = 1024;

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
    /// Reconciles running at once, per controller.
    pub concurrency: u16,
}

/// Runs until SIGTERM/SIGINT. Only the holder of the lease reconciles; the others wait,
/// serving health, and take over when the leader's lease expires.
pub async fn run(client: Client, settings: Settings) -> Result<()> {
    let metrics = Metrics::new();
    // One TrainingJob watch feeds both controllers: the jobs' own, and the services that
    // serve a job's model.
    let (jobs_reader, jobs_writer) = reflector::store_shared::<TrainingJob>(JOB_EVENTS_BUFFER);
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
    info!(identity = %settings.identity, "leading: starting the TrainingJob and InferenceService controllers");

    let namespace = settings.namespace.as_deref();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "ringmaster-operator".into(),
            instance: Some(settings.identity.clone()),
        },
    );
    let subscribe = || {
        jobs_writer
            .subscribe()
            .expect("a shared store has subscribers")
    };
    let (jobs_for_training, jobs_for_serving) = (subscribe(), subscribe());
    let job_watch = watcher(scoped(&client, namespace), watcher::Config::default())
        .default_backoff()
        .modify(|job: &mut TrainingJob| job.managed_fields_mut().clear())
        .reflect_shared(jobs_writer)
        .for_each(|_| async {});

    let (pods_reader, pods_writer) = reflector::store::<Pod>();
    // Workers only: serving pods are their Deployments' business.
    let workers = format!("{MANAGED_BY}={MANAGED_BY_VALUE},{JOB_NAME}");
    let pod_events = watcher(
        scoped(&client, namespace),
        watcher::Config::default().labels(&workers),
    )
    .default_backoff()
    // managedFields are a third of a pod object and nothing here reads them.
    .modify(|pod: &mut Pod| pod.managed_fields_mut().clear())
    .reflect(pods_writer)
    .touched_objects();
    let training_ctx = Arc::new(trainingjob::reconcile::Context {
        client: client.clone(),
        pods: pods_reader,
        recorder: recorder.clone(),
        metrics: metrics.clone(),
        restart_backoff: settings.restart_backoff,
        own_writes: Default::default(),
        pending_creates: Default::default(),
    });

    let (services_reader, services_writer) = reflector::store::<InferenceService>();
    let service_events = watcher(scoped(&client, namespace), watcher::Config::default())
        .default_backoff()
        .modify(|isvc: &mut InferenceService| isvc.managed_fields_mut().clear())
        .reflect(services_writer)
        .touched_objects();
    let children = watcher::Config::default().labels(INFERENCE_SERVICE);
    let (deployments_reader, deployments_writer) = reflector::store::<Deployment>();
    // managedFields kept: they tell whether the operator still owns the replica count.
    let deployment_events = watcher(scoped(&client, namespace), children.clone())
        .default_backoff()
        .reflect(deployments_writer)
        .touched_objects();
    let (autoscalers_reader, autoscalers_writer) = reflector::store::<HorizontalPodAutoscaler>();
    // Spec changes only: an autoscaler under load rewrites its status every few seconds.
    let autoscaler_events = watcher(scoped(&client, namespace), children)
        .default_backoff()
        .modify(|hpa: &mut HorizontalPodAutoscaler| hpa.managed_fields_mut().clear())
        .reflect(autoscalers_writer)
        .touched_objects()
        .predicate_filter(predicates::generation, Default::default());
    let serving_ctx = Arc::new(inferenceservice::reconcile::Context {
        client: client.clone(),
        recorder,
        metrics,
        jobs: jobs_reader.clone(),
        deployments: deployments_reader,
        autoscalers: autoscalers_reader,
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
    }
    .shared();
    // A short debounce folds the events of one job's pods being created together into
    // one reconcile. Bounded concurrency keeps the number of API connections (and their
    // TLS buffers, most of the memory) small; the API server is the bottleneck anyway.
    let config = kube::runtime::controller::Config::default()
        .debounce(Duration::from_millis(250))
        .concurrency(settings.concurrency);
    let training = Controller::for_shared_stream(jobs_for_training, jobs_reader)
        .owns_stream(pod_events)
        .with_config(config.clone())
        .graceful_shutdown_on(stop.clone())
        .run(
            trainingjob::reconcile::reconcile,
            trainingjob::reconcile::error_policy,
            training_ctx,
        )
        .for_each(log_error);
    let serving = Controller::for_stream(service_events, services_reader.clone())
        .owns_stream(deployment_events)
        .owns_stream(autoscaler_events)
        .watches_shared_stream(jobs_for_serving, move |job| {
            inferenceservice::reconcile::serving(&services_reader, &job)
        })
        .with_config(config)
        .graceful_shutdown_on(stop)
        .run(
            inferenceservice::reconcile::reconcile,
            inferenceservice::reconcile::error_policy,
            serving_ctx,
        )
        .for_each(log_error);
    // The job watch feeds both controllers and ends with them.
    tokio::select! {
        _ = futures::future::join(training, serving) => {},
        _ = job_watch => {},
    }

    endpoints.set_ready(false);
    drop(lease_task); // dropping the task handle leaves the lease to expire or be released
    server.abort();
    trimmer.abort();
    Ok(())
}

/// An API for one namespace, or all of them.
fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

async fn log_error<T>(result: std::result::Result<T, impl std::fmt::Display>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "reconcile error");
    }
}
