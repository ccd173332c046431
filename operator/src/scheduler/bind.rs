//! The API calls of a placement: bind through `pods/binding` (with the GPU indices and the
//! node's zone and rack as annotations and the pod's UID as precondition), roll back by
//! deleting, report unschedulable.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use ringmaster_crds::keys::GPU_INDICES;

use super::{Error, Result};
use ringmaster_crds::keys::{RACK_ANNOTATION, RACK_LABEL, ZONE_ANNOTATION, ZONE_LABEL};

/// Field manager of every write.
pub const MANAGER: &str = "ringmaster-scheduler";

/// What a bind writes onto the pod: the GPU indices, and the zone and rack of the node
/// where it has those labels (absent otherwise, which the pod reads as unknown).
pub fn binding_annotations(
    gpus: &[usize],
    node_labels: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let indices = gpus
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut annotations = BTreeMap::from([(GPU_INDICES.to_string(), indices)]);
    for (label, annotation) in [(ZONE_LABEL, ZONE_ANNOTATION), (RACK_LABEL, RACK_ANNOTATION)] {
        if let Some(value) = node_labels.get(label) {
            annotations.insert(annotation.to_string(), value.clone());
        }
    }
    annotations
}

/// Binds with `annotations` (from `binding_annotations`) in one request: the API server
/// copies a Binding's annotations onto the pod. The UID precondition makes the bind fail
/// if the pod was deleted and recreated under the same name since we read it.
pub async fn bind(
    client: &Client,
    pod: &Pod,
    node: &str,
    annotations: BTreeMap<String, String>,
) -> Result<()> {
    let ns = pod.namespace().unwrap_or_default();
    let name = pod.name_any();
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            uid: pod.uid(),
            annotations: Some(annotations),
            ..Default::default()
        },
        target: ObjectReference {
            kind: Some("Node".into()),
            name: Some(node.into()),
            ..Default::default()
        },
    };
    let body = serde_json::to_vec(&binding).map_err(|source| Error::Serialize {
        what: "Binding",
        source,
    })?;
    // The typed Api has no call for the binding subresource: post it directly.
    let request = http::Request::post(format!("/api/v1/namespaces/{ns}/pods/{name}/binding"))
        .header("content-type", "application/json")
        .body(body)?;
    client.request_text(request).await?;
    Ok(())
}

/// Did a bind fail because the pod is bound already (by a previous leader)?
pub fn already_bound(e: &Error) -> bool {
    matches!(e, Error::Kube(kube::Error::Api(s))
        if s.code == 409 && s.message.contains("already assigned to node"))
}

/// Deletes a bound member of a gang that could not be bound whole; its controller
/// recreates it and the new gang is placed from scratch.
pub async fn delete(client: &Client, pod: &Pod) -> Result<()> {
    let api = Api::<Pod>::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: pod.uid(),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&pod.name_any(), &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sets `PodScheduled=False` with `reason` and the explanation.
pub async fn not_scheduled(client: &Client, pod: &Pod, reason: &str, message: &str) -> Result<()> {
    let api = Api::<Pod>::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    let patch =
        super::explain::condition_patch(reason, message, k8s_openapi::jiff::Timestamp::now());
    api.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Strategic(patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn binding_carries_gpus_and_the_nodes_zone_and_rack() {
        let node = labels(&[(ZONE_LABEL, "zone-a"), (RACK_LABEL, "rack-1"), ("x", "y")]);
        assert_eq!(
            binding_annotations(&[0, 3], &node),
            labels(&[
                (GPU_INDICES, "0,3"),
                (ZONE_ANNOTATION, "zone-a"),
                (RACK_ANNOTATION, "rack-1"),
            ])
        );
    }

    #[test]
    fn labels_the_node_lacks_are_left_out() {
        let zone_only = labels(&[(ZONE_LABEL, "zone-b")]);
        assert_eq!(
            binding_annotations(&[], &zone_only),
            labels(&[(GPU_INDICES, ""), (ZONE_ANNOTATION, "zone-b")])
        );
        assert_eq!(
            binding_annotations(&[1], &BTreeMap::new()),
            labels(&[(GPU_INDICES, "1")])
        );
    }
}
