//! Pod-spec pieces the TrainingJob and InferenceService builders share.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use ringmaster_crds::keys::GPU_RESOURCE;

/// A container's resources: the user's, plus `gpus` whole GPUs as both request and limit
/// (extended resources cannot be overcommitted). None when nothing is asked for.
pub fn resources_with_gpus(
    resources: Option<&ResourceRequirements>,
    gpus: i32,
) -> Option<ResourceRequirements> {
    let mut resources = resources.cloned().unwrap_or_default();
    if gpus > 0 {
        let gpus = Quantity(gpus.to_string());
        resources
            .limits
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), gpus.clone());
        resources
            .requests
            .get_or_insert_with(BTreeMap::new)
            .insert(GPU_RESOURCE.into(), gpus);
    }
    Some(resources).filter(|r| *r != ResourceRequirements::default())
}
