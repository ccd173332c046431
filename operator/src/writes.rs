//! The writes both controllers make: server-side apply under each controller's field manager,
//! create-once, status commits with a precondition, and Events.

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::warn;

use crate::error::{Error, Result};

/// Field managers of the operator's writes, one per controller. Server-side apply keeps
/// what other managers set, so an object both would control (a TrainingJob and an
/// InferenceService of one name both want the Service `<name>`) carries two controller
/// owner references, which the API server refuses, instead of one controller silently
/// rewriting the other's object.
pub const TRAINING_MANAGER: &str = "ringmaster-operator";
pub const SERVING_MANAGER: &str = "ringmaster-operator-inferenceservice";

/// Server-side applies `obj` as `manager` (taking over fields another manager set) and
/// returns the object as the API server now has it.
pub async fn apply<K>(api: Api<K>, obj: &K, manager: &str) -> Result<K>
where
    K: Resource<DynamicType = ()> + Serialize + Clone + std::fmt::Debug + DeserializeOwned,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    api.patch(
        &name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| write_error(obj, source))
}

/// Creates `obj` unless it exists (objects that must never change once made).
pub async fn create_if_absent<K>(api: Api<K>, obj: &K, manager: &str) -> Result<bool>
where
    K: Resource<DynamicType = ()> + Serialize + Clone + std::fmt::Debug + DeserializeOwned,
{
    let params = PostParams {
        field_manager: Some(manager.into()),
        ..Default::default()
    };
    match api.create(&params, obj).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(source) => Err(write_error(obj, source)),
    }
}

/// Writes `status` only if `obj` is still the version it was decided from. Returns the
/// written object, or None when it has changed (or is gone) since: decide again.
pub async fn commit_status<K>(
    client: &Client,
    obj: &K,
    status: &impl Serialize,
    manager: &str,
) -> Result<Option<K>>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + DeserializeOwned,
{
    let api = Api::<K>::namespaced(
        client.clone(),
        obj.meta().namespace.as_deref().unwrap_or_default(),
    );
    let name = obj.name_any();
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": name, "resourceVersion": obj.resource_version()},
        "status": status,
    });
    let params = PatchParams::apply(manager).force();
    match api.patch_status(&name, &params, &Patch::Apply(body)).await {
        Ok(written) => Ok(Some(written)),
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn write_error<K: Resource<DynamicType = ()>>(obj: &K, source: kube::Error) -> Error {
    let name = obj.meta().name.as_deref().unwrap_or_default();
    Error::Write {
        object: format!("{} {name}", K::kind(&())),
        source,
    }
}

pub fn ignore_not_found(e: kube::Error) -> Result<()> {
    match e {
        kube::Error::Api(ref s) if s.code == 404 => Ok(()),
        e => Err(e.into()),
    }
}

/// A Kubernetes Event a pure decision asks for, published once its status is committed.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedEvent {
    pub reason: &'static str,
    pub message: String,
    pub warning: bool,
}

/// Publishes an Event on `obj`; a failure is logged, never fatal.
pub async fn publish<K: Resource<DynamicType = ()>>(
    recorder: &Recorder,
    obj: &K,
    reason: &str,
    message: &str,
    warning: bool,
) {
    publish_on(recorder, &obj.object_ref(&()), reason, message, warning).await
}

/// A failed reconcile as a Warning Event on `obj`, published in the background (error
/// policies are synchronous).
pub fn publish_error<K: Resource<DynamicType = ()>>(recorder: &Recorder, obj: &K, error: &Error) {
    let (recorder, reference, message) = (recorder.clone(), obj.object_ref(&()), error.to_string());
    tokio::spawn(async move {
        publish_on(&recorder, &reference, "ReconcileError", &message, true).await
    });
}

async fn publish_on(
    recorder: &Recorder,
    reference: &ObjectReference,
    reason: &str,
    message: &str,
    warning: bool,
) {
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
    if let Err(e) = recorder.publish(&event, reference).await {
        warn!(error = %e, reason, "could not publish event");
    }
}
