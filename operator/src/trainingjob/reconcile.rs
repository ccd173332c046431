//! The only I/O of the TrainingJob controller: fetch, then apply what `status::plan` decided.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, Resource, ResourceExt};
use ringmaster_crds::keys::{JOB_NAME, TOKEN_KEY};
use ringmaster_crds::{TrainingJob, TrainingJobStatus};
use serde::Serialize;
use tracing::{info, warn};

use super::desired::{self, JobRef};
use super::status::{self, Plan};
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// Field manager of everything the operator writes (server-side apply).
pub const FIELD_MANAGER: &str = "ringmaster-operator";

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub pods: Store<Pod>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// First delay of a gang restart; doubles with every restart.
    pub restart_backoff: Duration,
}

pub async fn reconcile(job: Arc<TrainingJob>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&job, &ctx).await;
    ctx.metrics
        .observe_reconcile(started.elapsed(), result.as_ref().err());
    result
}

async fn reconcile_inner(job: &TrainingJob, ctx: &Context) -> Result<Action> {
    if job.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change()); // children go with it through owner references
    }
    let job_ref = JobRef::new(job).ok_or_else(|| Error::MissingMetadata(job.name_any()))?;
    let ns = job_ref.namespace;

    // Fetch: the pods come from the watch cache, so a burst of jobs costs no extra lists.
    let pods: Vec<Pod> = ctx
        .pods
        .state()
        .iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns)
                && p.labels().get(JOB_NAME).map(String::as_str) == Some(job_ref.name)
        })
        .map(|p| (**p).clone())
        .collect();

    let plan = status::plan(job, &pods, Timestamp::now(), ctx.restart_backoff);
    if plan.delete_job {
        info!(
            job = job_ref.name,
            namespace = ns,
            "deleting finished job after ttlSecondsAfterFinished"
        );
        publish(
            ctx,
            job,
            "Deleted",
            "ttlSecondsAfterFinished elapsed; deleting the job",
            false,
        )
        .await;
        Api::<TrainingJob>::namespaced(ctx.client.clone(), ns)
            .delete(job_ref.name, &DeleteParams::background())
            .await
            .map(|_| ())
            .or_else(ignore_not_found)?;
        return Ok(Action::await_change());
    }

    if !plan.create.is_empty() {
        ensure_support_objects(ctx, &job_ref).await?;
        let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), ns);
        let attempt = plan.status.restarts;
        let creates = plan.create.iter().map(|&index| {
            let pod = desired::worker_pod(&job_ref, index, attempt);
            let api = pods_api.clone();
            async move { create_if_absent(api, &pod).await }
        });
        futures::future::try_join_all(creates).await?;
    }
    apply_actions(ctx, &job_ref, &plan).await?;
    for ev in &plan.events {
        publish(ctx, job, ev.reason, &ev.message, ev.warning).await;
    }
    if plan.status.restarts > job.status.as_ref().map_or(0, |s| s.restarts) {
        ctx.metrics.restarts.inc();
    }
    write_status(ctx, &job_ref, &plan.status).await?;

    Ok(match plan.requeue_after {
        Some(after) => Action::requeue(after),
        // Re-check now and then even when nothing is expected, as a safety net.
        None => Action::requeue(Duration::from_secs(300)),
    })
}

async fn apply_actions(ctx: &Context, job: &JobRef<'_>, plan: &Plan) -> Result<()> {
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), job.namespace);
    let ungate = serde_json::json!({"spec": {"schedulingGates": []}});
    let releases = plan.release_gates.iter().map(|name| {
        let pods = pods.clone();
        // A JSON merge patch replaces the list; a strategic one would merge `[]` into it.
        let patch = Patch::Merge(ungate.clone());
        async move {
            pods.patch(name, &PatchParams::default(), &patch)
                .await
                .map(|_| ())
                .or_else(ignore_not_found)
        }
    });
    futures::future::try_join_all(releases).await?;
    let deletes = plan.delete_pods.iter().map(|name| {
        let pods = pods.clone();
        async move {
            pods.delete(name, &DeleteParams::default())
                .await
                .map(|_| ())
                .or_else(ignore_not_found)
        }
    });
    futures::future::try_join_all(deletes).await?;
    Ok(())
}

/// ConfigMap, Service, ServiceAccount, Role, RoleBinding (server-side applied, so a
/// restarted operator converges to the same objects) and the rendezvous token Secret
/// (created once: a new token on every reconcile would lock running ranks out).
async fn ensure_support_objects(ctx: &Context, job: &JobRef<'_>) -> Result<()> {
    let objects = desired::support_objects(job);
    let (c, ns) = (&ctx.client, job.namespace);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(desired::token_secret_name(job.name)),
            namespace: Some(ns.to_string()),
            labels: objects.config_map.metadata.labels.clone(),
            owner_references: Some(vec![job.owner.clone()]),
            ..Default::default()
        },
        string_data: Some([(TOKEN_KEY.to_string(), random_token())].into()),
        ..Secret::default()
    };
    futures::try_join!(
        apply(Api::namespaced(c.clone(), ns), &objects.config_map),
        apply(Api::namespaced(c.clone(), ns), &objects.service),
        apply(Api::namespaced(c.clone(), ns), &objects.service_account),
        apply(Api::namespaced(c.clone(), ns), &objects.role),
        apply(Api::namespaced(c.clone(), ns), &objects.role_binding),
        create_if_absent(Api::namespaced(c.clone(), ns), &secret),
    )?;
    Ok(())
}

fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn apply<K>(api: Api<K>, obj: &K) -> Result<()>
where
    K: Resource + Serialize + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await?;
    Ok(())
}

async fn create_if_absent<K>(api: Api<K>, obj: &K) -> Result<()>
where
    K: Resource + Serialize + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    match api
        .create(
            &PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            obj,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn write_status(ctx: &Context, job: &JobRef<'_>, status: &TrainingJobStatus) -> Result<()> {
    let api = Api::<TrainingJob>::namespaced(ctx.client.clone(), job.namespace);
    let body = serde_json::json!({
        "apiVersion": "ringmaster.dev/v1alpha1",
        "kind": "TrainingJob",
        "status": status,
    });
    api.patch_status(
        job.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map(|_| ())
    .or_else(ignore_not_found)
}

fn ignore_not_found(e: kube::Error) -> Result<()> {
    match e {
        kube::Error::Api(ref s) if s.code == 404 => Ok(()),
        e => Err(e.into()),
    }
}

async fn publish(ctx: &Context, job: &TrainingJob, reason: &str, message: &str, warning: bool) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
        warn!(error = %e, reason, "could not publish event");
    }
}

/// What happens after a failed reconcile: an Event on the job, and a retry with backoff.
pub fn error_policy(job: Arc<TrainingJob>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(job = %ObjectRef::from_obj(&*job), error = %error, "reconcile failed");
    let message = error.to_string();
    let recorder = ctx.recorder.clone();
    let reference = job.object_ref(&());
    tokio::spawn(async move {
        let event = Event {
            type_: EventType::Warning,
            reason: "ReconcileError".into(),
            note: Some(message.chars().take(1000).collect()),
            action: "Reconcile".into(),
            secondary: None,
        };
        let _ = recorder.publish(&event, &reference).await;
    });
    Action::requeue(Duration::from_secs(5))
}
