//! The only I/O of the TrainingJob controller: fetch, decide (`status::plan`), commit the
//! decision as the job's status, then act on it.
//!
//! Commit before acting: the status write carries the resourceVersion the decision was
//! made from, so a decision taken from an outdated job (the watch lags our own writes, or
//! a restarted operator reads before its caches fill) is rejected by the API server and
//! never acted on. Every action is re-derived from the committed status, so an operator
//! killed between the commit and the actions finishes them on its next reconcile.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use ringmaster_crds::keys::{ATTEMPT, JOB_NAME, TOKEN_KEY};
use ringmaster_crds::{TrainingJob, TrainingJobStatus};
use tracing::{debug, info, warn};

use super::desired::{self, JobRef};
use super::own_writes::OwnWrites;
use super::pending_creates::PendingCreates;
use super::status::{self, Plan};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::writes::{
    TRAINING_MANAGER, apply, create_if_absent, ignore_not_found, publish, publish_error,
};

/// Pod creates or deletes in flight per reconcile: a 2,000-worker job must not open
/// 2,000 requests (and their buffers) at once.
const WRITES_IN_FLIGHT: usize = 16;

/// Shared state of the controller.
pub struct Context {
    pub client: Client,
    pub pods: Store<Pod>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// First delay of a gang restart; doubles with every restart.
    pub restart_backoff: Duration,
    pub own_writes: OwnWrites,
    pub pending_creates: PendingCreates,
}

pub async fn reconcile(job: Arc<TrainingJob>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(job, &ctx).await;
    ctx.metrics
        .observe_reconcile("trainingjob", started.elapsed(), result.as_ref().err());
    result
}

async fn reconcile_inner(cached: Arc<TrainingJob>, ctx: &Context) -> Result<Action> {
    if cached.metadata.deletion_timestamp.is_some() {
        ctx.own_writes.forget(&cached);
        ctx.pending_creates
            .forget(&cached.uid().unwrap_or_default());
        return Ok(Action::await_change()); // children go with it through owner references
    }
    // Before its first list the pod cache is empty, which reads as "every worker
    // vanished": never decide from it.
    ctx.pods
        .wait_until_ready()
        .await
        .map_err(|_| Error::CacheClosed("pod"))?;
    let job = ctx.own_writes.newest(cached);
    let job_ref = JobRef::new(&job)
        .ok_or_else(|| Error::MissingMetadata(format!("TrainingJob {}", job.name_any())))?;
    let ns = job_ref.namespace;

    // Fetch: the pods come from the watch cache, so a burst of jobs costs no extra lists.
    let pods: Vec<Arc<Pod>> = ctx
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.namespace().as_deref() == Some(ns)
                && p.labels().get(JOB_NAME).map(String::as_str) == Some(job_ref.name)
        })
        .collect();

    let now = Timestamp::now();
    let mut plan = status::plan(&job, pods.iter().map(|p| &**p), now, ctx.restart_backoff);
    let uid = job.uid().unwrap_or_default();
    let attempt = plan.status.restarts;
    let attempt_label = attempt.to_string();
    let cached_names: HashSet<&str> = pods
        .iter()
        .filter(|p| p.labels().get(ATTEMPT) == Some(&attempt_label))
        .filter_map(|p| p.metadata.name.as_deref())
        .collect();
    let unseen = ctx
        .pending_creates
        .unseen(&uid, attempt, &cached_names, Instant::now());
    if let Some(unseen) = unseen {
        let before = plan.create.len();
        plan.create.retain(|&i| {
            !unseen
                .names
                .contains(&desired::worker_name(job_ref.name, i))
        });
        if plan.create.len() < before {
            // Should the cache never show them, they are created again after the wait.
            let retry = unseen.expire_in + Duration::from_millis(100);
            plan.requeue_after = Some(plan.requeue_after.map_or(retry, |r| r.min(retry)));
        }
    }
    if plan.delete_job {
        info!(
            job = job_ref.name,
            namespace = ns,
            "deleting finished job after ttlSecondsAfterFinished"
        );
        publish(
            &ctx.recorder,
            &*job,
            "Deleted",
            "ttlSecondsAfterFinished elapsed; deleting the job",
            false,
        )
        .await;
        ctx.own_writes.forget(&job);
        ctx.pending_creates.forget(&uid);
        Api::<TrainingJob>::namespaced(ctx.client.clone(), ns)
            .delete(job_ref.name, &DeleteParams::background())
            .await
            .map(|_| ())
            .or_else(ignore_not_found)?;
        return Ok(Action::await_change());
    }

    let committed = if plan.has_actions() || status_changed(&job, &plan.status) {
        match commit_status(ctx, &job, &plan.status).await? {
            Some(written) => Arc::new(written),
            None => {
                ctx.metrics.stale_views.inc();
                debug!(
                    job = job_ref.name,
                    namespace = ns,
                    "job changed since read: deciding again"
                );
                return Ok(Action::requeue(Duration::from_secs(1)));
            }
        }
    } else {
        job.clone()
    };
    for ev in &plan.events {
        publish(&ctx.recorder, &*job, ev.reason, &ev.message, ev.warning).await;
    }
    if plan.status.restarts > job.status.as_ref().map_or(0, |s| s.restarts) {
        ctx.metrics.restarts.inc();
    }

    if let Err(e) = act(ctx, &job_ref, &plan).await {
        let Some(cause) = e.permanent_cause() else {
            return Err(e);
        };
        // Retrying cannot help: fail the job, naming the object and the server's reason.
        warn!(job = job_ref.name, namespace = ns, %cause, "the job cannot be built");
        let failed = status::invalid_spec(&committed, cause.clone(), Timestamp::now());
        if commit_status(ctx, &committed, &failed).await?.is_none() {
            return Ok(Action::requeue(Duration::from_secs(1)));
        }
        publish(&ctx.recorder, &*job, "InvalidSpec", &cause, true).await;
        return Ok(Action::await_change());
    }

    Ok(match plan.requeue_after {
        Some(after) => Action::requeue(after),
        // Re-check now and then even when nothing is expected, as a safety net.
        None => Action::requeue(Duration::from_secs(300)),
    })
}

/// Creates missing workers (with their support objects), lifts gates, deletes pods.
async fn act(ctx: &Context, job: &JobRef<'_>, plan: &Plan) -> Result<()> {
    if !plan.create.is_empty() {
        ensure_support_objects(ctx, job).await?;
        let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), job.namespace);
        let attempt = plan.status.restarts;
        let created = bounded(
            plan.create
                .iter()
                .map(|&index| {
                    let pod = desired::worker_pod(job, index, attempt);
                    let api = pods_api.clone();
                    async move {
                        let created = create_if_absent(api, &pod, TRAINING_MANAGER).await?;
                        Ok(created.then(|| desired::worker_name(job.name, index)))
                    }
                })
                .collect(),
        )
        .await?;
        // Only pods this call created: a name still held by the previous attempt's
        // terminating pod (409) must be created again once that pod is gone.
        let created = created.into_iter().flatten().collect();
        ctx.pending_creates
            .record(&job.owner.uid, attempt, created, Instant::now());
    }
    apply_actions(ctx, job, plan).await
}

/// Runs `writes` with at most `WRITES_IN_FLIGHT` at once; the first error wins. (A Vec,
/// not a lazy iterator: a closure inside the stream fails the controller's Send check.)
async fn bounded<T>(writes: Vec<impl Future<Output = Result<T>>>) -> Result<Vec<T>> {
    futures::stream::iter(writes)
        .buffer_unordered(WRITES_IN_FLIGHT)
        .try_collect()
        .await
}

/// Did the decision change the status? (`progress` belongs to the trainer.)
fn status_changed(job: &TrainingJob, next: &TrainingJobStatus) -> bool {
    let old = job.status.clone().unwrap_or_default();
    TrainingJobStatus {
        progress: None,
        ..old
    } != *next
}

/// Writes `status` only if the job is still the version it was decided from. Returns the
/// written job, or None when the job has changed (or is gone) since: decide again.
async fn commit_status(
    ctx: &Context,
    job: &TrainingJob,
    status: &TrainingJobStatus,
) -> Result<Option<TrainingJob>> {
    let written = crate::writes::commit_status(&ctx.client, job, status, TRAINING_MANAGER).await?;
    if let Some(written) = &written {
        ctx.own_writes.record(job, written.clone());
    }
    Ok(written)
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
    bounded(releases.collect()).await?;
    let deletes = plan.delete_pods.iter().map(|name| {
        let pods = pods.clone();
        async move {
            pods.delete(name, &DeleteParams::default())
                .await
                .map(|_| ())
                .or_else(ignore_not_found)
        }
    });
    bounded(deletes.collect()).await.map(drop)
}

/// ConfigMap, Service, ServiceAccount, Role, RoleBinding (server-side applied, so a
/// restarted operator converges to the same objects) and the rendezvous token Secret
/// (created once: a new token on every reconcile would lock running ranks out).
/// Quick retries of a RoleBinding whose fresh Role the API server has not cached yet.
const ROLE_CACHE_RETRIES: u32 = 5;

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
    // The Role strictly before its RoleBinding: for anyone but a cluster admin, the API
    // server's escalation check resolves the Role a binding names and answers NotFound
    // while it does not exist (and try_join would cancel the Role's own apply with it).
    // It resolves it from its RBAC cache, which can lag the Role's creation by a moment.
    let rbac = async {
        apply(
            Api::namespaced(c.clone(), ns),
            &objects.role,
            TRAINING_MANAGER,
        )
        .await?;
        let mut retries = 0;
        loop {
            match apply(
                Api::namespaced(c.clone(), ns),
                &objects.role_binding,
                TRAINING_MANAGER,
            )
            .await
            {
                Err(Error::Write {
                    source: kube::Error::Api(status),
                    ..
                }) if status.code == 404 && retries < ROLE_CACHE_RETRIES => {
                    retries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                done => return done,
            }
        }
    };
    futures::try_join!(
        apply(
            Api::namespaced(c.clone(), ns),
            &objects.config_map,
            TRAINING_MANAGER
        ),
        apply(
            Api::namespaced(c.clone(), ns),
            &objects.service,
            TRAINING_MANAGER
        ),
        apply(
            Api::namespaced(c.clone(), ns),
            &objects.service_account,
            TRAINING_MANAGER
        ),
        rbac,
        create_if_absent(Api::namespaced(c.clone(), ns), &secret, TRAINING_MANAGER),
    )?;
    Ok(())
}

fn random_token() -> String {
    use rand::Rng;
    let bytes: [u8; 32] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What happens after a failed reconcile: an Event on the job, and a retry with backoff.
pub fn error_policy(job: Arc<TrainingJob>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(job = %ObjectRef::from_obj(&*job), error = %error, "reconcile failed");
    publish_error(&ctx.recorder, &*job, error);
    Action::requeue(Duration::from_secs(5))
}
