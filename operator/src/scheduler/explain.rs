//! What an unschedulable gang tells its pods: a `PodScheduled=False` condition whose
//! message is the engine's explanation in numbers.

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};

/// The API server rejects condition messages past 32 KiB; stay far below.
const MAX_MESSAGE: usize = 4000;

/// The message for every member of a gang that did not fit.
pub fn message(gang: &str, size: usize, why: &impl std::fmt::Display) -> String {
    let text = format!("gang {gang} ({size} pods) does not fit: {why}");
    text.chars().take(MAX_MESSAGE).collect()
}

/// Does the pod already carry this exact unschedulable message? (Skip the write.)
pub fn already_says(pod: &Pod, message: &str) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
        .any(|c| {
            c.type_ == "PodScheduled"
                && c.status == "False"
                && c.reason.as_deref() == Some("Unschedulable")
                && c.message.as_deref() == Some(message)
        })
}

/// Strategic-merge status patch setting `PodScheduled=False/Unschedulable`.
pub fn condition_patch(message: &str, now: Timestamp) -> Value {
    json!({"status": {"conditions": [{
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
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
        let patch = condition_patch(&m, Timestamp::UNIX_EPOCH);
        let pod: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "status": patch["status"]}))
                .unwrap();
        assert!(already_says(&pod, &m));
        assert!(!already_says(&pod, "other"));
    }
}
