//! What a waiting gang tells its pods: a `PodScheduled=False` condition whose message is
//! the engine's explanation in numbers, or what is wrong with the gang's keys.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

/// The API server rejects condition messages past 32 KiB; stay far below.
const MAX_MESSAGE: usize = 4000;

/// `PodScheduled=False` reason: the gang does not fit, or was rolled back to be placed whole.
pub const UNSCHEDULABLE: &str = "Unschedulable";
/// `PodScheduled=False` reason: the gang's label and annotations contradict each other.
pub const INVALID_GANG: &str = "InvalidGang";

/// The message for every member of a gang that did not fit.
pub fn message(gang: &str, size: usize, why: &impl std::fmt::Display) -> String {
    bounded(format!("gang {gang} ({size} pods) does not fit: {why}"))
}

/// The message for every member of a gang whose keys are inconsistent.
pub fn invalid_message(gang: &str, why: &str) -> String {
    bounded(format!(
        "gang {gang} is not scheduled until its pods agree: {why}"
    ))
}

/// The message for the waiting members of a gang found partly bound.
pub fn rollback_message(gang: &str, size: usize, bound: usize) -> String {
    bounded(format!(
        "gang {gang} ({size} pods) was partly bound ({bound} bound, the rest not): the bound \
         members were deleted so that the whole gang is placed again"
    ))
}

fn bounded(text: String) -> String {
    text.chars().take(MAX_MESSAGE).collect()
}

/// Does the pod already carry this exact condition? (Skip the write.)
pub fn already_says(pod: &Pod, reason: &str, message: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some(reason)
                && c.message.as_deref() == Some(message)
        })
}

/// Strategic-merge status patch setting `PodScheduled=False` with `reason`.
pub fn condition_patch(reason: &str, message: &str, now: Timestamp) -> Value {
    json!({"status": {"conditions": [{
        "type": "PodScheduled",
        "status": "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": now.to_string(),
    }]}})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_is_bounded_and_recognised() {
        let long = "x".repeat(10_000);
        assert_eq!(message("g", 4, &long).chars().count(), MAX_MESSAGE);
        let m = message("ns/g", 4, &"0/2 nodes are available");
        assert_eq!(
            m,
            "gang ns/g (4 pods) does not fit: 0/2 nodes are available"
        );
        let patch = condition_patch(UNSCHEDULABLE, &m, Timestamp::UNIX_EPOCH);
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "status": patch["status"]}))
                .unwrap();
        assert!(already_says(&pod, UNSCHEDULABLE, &m));
        assert!(!already_says(&pod, UNSCHEDULABLE, "other"));
        assert!(!already_says(&pod, INVALID_GANG, &m));
    }
}
