//! The only I/O of the InferenceService controller: resolve the model from the cached
//! TrainingJob, apply the Service, Deployment and autoscaler, then write the status the
//! Deployment's state calls for.
//!
//! Every write is a server-side apply of the whole desired object, so the order needs no
//! bookkeeping: a reconcile that stops half-way is finished by the next one. The status is
//! written with the service's resourceVersion as a precondition, so its Events are never
//! published twice from a view that predates the operator's own last write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use ringmaster_crds::{InferenceService, TrainingJob};
use tracing::{debug, warn};

use super::desired::{self, IsvcRef};
use super::model::{self, Resolved, Unresolved};
use super::status::{self, Plan};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::writes::{
    SERVING_MANAGER, apply, commit_status, ignore_not_found, publish, publish_error, write_error,
};

/// Field manager that co-owns a Deployment's replica count while an autoscaler takes it
/// over (see `desired::needs_replica_handover`).
const HANDOVER_MANAGER: &str = "ringmaster-operator-handover";

/// Shared state of the controller; every read comes from a watch cache.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub jobs: Store<TrainingJob>,
    pub deployments: Store<Deployment>,
    pub autoscalers: Store<HorizontalPodAutoscaler>,
}

pub async fn reconcile(isvc: Arc<InferenceService>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_inner(&isvc, &ctx).await;
    ctx.metrics
        .observe_reconcile("inferenceservice", started.elapsed(), result.as_ref().err());
    result
}

/// The services that serve `job`'s model: re-reconciled when the job changes.
pub fn serving(
    services: &Store<InferenceService>,
    job: &TrainingJob,
) -> Vec<ObjectRef<InferenceService>> {
    services
        .state()
        .iter()
        .filter(|s| {
            s.namespace() == job.namespace()
                && s.spec.model.training_job_ref.as_ref().map(|r| &r.name)
                    == job.metadata.name.as_ref()
        })
        .map(|s| ObjectRef::from_obj(&**s))
        .collect()
}

async fn reconcile_inner(isvc: &InferenceService, ctx: &Context) -> Result<Action> {
    if isvc.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change()); // children go with it through owner references
    }
    // An empty cache before its first list would read as "no job" and "no Deployment".
    let closed = |what| move |_| Error::CacheClosed(what);
    ctx.jobs
        .wait_until_ready()
        .await
        .map_err(closed("trainingjob"))?;
    ctx.deployments
        .wait_until_ready()
        .await
        .map_err(closed("deployment"))?;
    ctx.autoscalers
        .wait_until_ready()
        .await
        .map_err(closed("horizontalpodautoscaler"))?;
    let svc = IsvcRef::new(isvc)
        .ok_or_else(|| Error::MissingMetadata(format!("InferenceService {}", isvc.name_any())))?;

    let job = isvc
        .spec
        .model
        .training_job_ref
        .as_ref()
        .and_then(|r| ctx.jobs.get(&ObjectRef::new(&r.name).within(svc.namespace)));
    let model = model::resolve(&isvc.spec.model, job.as_deref());
    let now = Timestamp::now();
    let plan = match act(ctx, &svc, model.as_ref()).await {
        Ok(deployment) => status::plan(isvc, model.as_ref(), deployment.as_ref(), now),
        // Retrying as built cannot help (an invalid object, or one another controller
        // owns): say so in the status, naming the server's reason.
        Err(e) => match e.permanent_cause() {
            Some(cause) => {
                let (service, namespace) = (svc.name, svc.namespace);
                warn!(service, namespace, %cause, "cannot build the service");
                status::invalid_spec(isvc, cause, now)
            }
            None => return Err(e),
        },
    };
    Ok(match commit(ctx, isvc, &plan).await? {
        // Re-check now and then even when nothing is expected, as a safety net (and for
        // a conflicting object that has gone since).
        true => Action::requeue(Duration::from_secs(300)),
        false => Action::requeue(Duration::from_secs(1)),
    })
}

/// Applies the Service, the Deployment (when there is a model) and the autoscaler (when
/// the bounds call for one); returns the Deployment as the API server has it.
async fn act(
    ctx: &Context,
    svc: &IsvcRef<'_>,
    model: Result<&Resolved, &Unresolved>,
) -> Result<Option<Deployment>> {
    let (c, ns) = (&ctx.client, svc.namespace);
    let services = Api::<Service>::namespaced(c.clone(), ns);
    apply(services, &desired::service(svc), SERVING_MANAGER).await?;
    let deployments = Api::<Deployment>::namespaced(c.clone(), ns);
    let cached = ctx.deployments.get(&ObjectRef::new(svc.name).within(ns));
    let deployment = match model {
        Ok(model) => {
            let wanted = desired::deployment(svc, model);
            if let Some(live) = cached.as_deref()
                && desired::needs_replica_handover(&wanted, live)
            {
                hand_replicas_over(&deployments, live).await?;
            }
            Some(apply(deployments, &wanted, SERVING_MANAGER).await?)
        }
        // Nothing (new) to serve: what exists keeps serving the model it has.
        Err(_) => cached.map(|d| (*d).clone()),
    };

    let autoscalers = Api::<HorizontalPodAutoscaler>::namespaced(c.clone(), ns);
    match desired::autoscaler(svc) {
        Some(hpa) if deployment.is_some() => {
            apply(autoscalers, &hpa, SERVING_MANAGER).await?;
        }
        None if ctx
            .autoscalers
            .get(&ObjectRef::new(svc.name).within(ns))
            .is_some() =>
        {
            autoscalers
                .delete(svc.name, &DeleteParams::default())
                .await
                .map(|_| ())
                .or_else(ignore_not_found)?;
        }
        _ => {}
    }
    Ok(deployment)
}

/// Lets a second field manager co-own `live`'s current replica count, so the operator's
/// apply without a count leaves it for the autoscaler instead of resetting it to 1.
async fn hand_replicas_over(api: &Api<Deployment>, live: &Deployment) -> Result<()> {
    let name = live.name_any();
    let replicas = live.spec.as_ref().and_then(|s| s.replicas);
    debug!(deployment = %name, ?replicas, "handing the replica count over to the autoscaler");
    let body = serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    api.patch(
        &name,
        &PatchParams::apply(HANDOVER_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await
    .map_err(|source| write_error(live, source))?;
    Ok(())
}

/// Writes the status when it changed, then publishes its Events. False when the service
/// changed since it was read: decide again from the newer version.
async fn commit(ctx: &Context, isvc: &InferenceService, plan: &Plan) -> Result<bool> {
    if isvc.status.as_ref() == Some(&plan.status) {
        return Ok(true);
    }
    if commit_status(&ctx.client, isvc, &plan.status, SERVING_MANAGER)
        .await?
        .is_none()
    {
        ctx.metrics.stale_views.inc();
        debug!(service = %isvc.name_any(), "service changed since read: deciding again");
        return Ok(false);
    }
    for ev in &plan.events {
        publish(&ctx.recorder, isvc, ev.reason, &ev.message, ev.warning).await;
    }
    Ok(true)
}

/// What happens after a failed reconcile: an Event on the service, and a retry.
pub fn error_policy(isvc: Arc<InferenceService>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(service = %ObjectRef::from_obj(&*isvc), error = %error, "reconcile failed");
    publish_error(&ctx.recorder, &*isvc, error);
    Action::requeue(Duration::from_secs(5))
}
