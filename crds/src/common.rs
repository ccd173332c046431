//! Types shared by TrainingJob and InferenceService.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Model families ringmaster can fine-tune and serve.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// BERT encoder with a sequence-classification head (text).
    #[default]
    Bert,
    /// ResNet-18/34/50 with a new classification head (images).
    Resnet,
}

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Bert => "bert",
            Architecture::Resnet => "resnet",
        }
    }
}

/// Sets or replaces the condition of the same type, keeping `lastTransitionTime` when the
/// status did not change (so `kubectl describe` shows when it really flipped).
pub fn upsert_condition(conditions: &mut Vec<Condition>, mut new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            if existing.status == new.status {
                new.last_transition_time = existing.last_transition_time.clone();
            }
            *existing = new;
        }
        None => conditions.push(new),
    }
}

/// Builds a `metav1.Condition`.
pub fn condition(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
    now: Time,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: now,
    }
}

/// Where an object stands, as kstatus reads it (Flux's health checks, `kubectl wait`,
/// cli-utils): through the `Reconciling` and `Stalled` conditions, which are abnormal
/// when True.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settling {
    /// Still converging (a gang being placed, a rollout): kstatus `InProgress`.
    InProgress { reason: String, message: String },
    /// Where the spec asked it to be, for now: kstatus `Current`.
    Current { reason: String },
    /// Will not get there without a person: kstatus `Failed`.
    Stalled { reason: String, message: String },
}

/// The kstatus condition types.
pub mod kstatus {
    pub const RECONCILING: &str = "Reconciling";
    pub const STALLED: &str = "Stalled";
}

/// Sets `Reconciling` and `Stalled` from `settling` (both always present, so a watcher
/// sees each flip back to False).
pub fn set_settling(
    conditions: &mut Vec<Condition>,
    settling: Settling,
    observed_generation: Option<i64>,
    now: Time,
) {
    let (reconciling, stalled, reason, message) = match settling {
        Settling::InProgress { reason, message } => (true, false, reason, message),
        Settling::Current { reason } => (false, false, reason, String::new()),
        Settling::Stalled { reason, message } => (false, true, reason, message),
    };
    // The message belongs to whichever condition is True.
    let said = |on: bool| if on { message.clone() } else { String::new() };
    for (type_, on) in [
        (kstatus::RECONCILING, reconciling),
        (kstatus::STALLED, stalled),
    ] {
        let c = condition(
            type_,
            on,
            &reason,
            said(on),
            observed_generation,
            now.clone(),
        );
        upsert_condition(conditions, c);
    }
}

/// Looks a condition up by type.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;

    fn at(secs: i64) -> Time {
        Time(Timestamp::from_second(secs).unwrap())
    }

    #[test]
    fn upsert_keeps_transition_time_when_status_is_unchanged() {
        let mut conds = vec![condition("Running", true, "A", "a", Some(1), at(10))];
        upsert_condition(
            &mut conds,
            condition("Running", true, "B", "b", Some(2), at(20)),
        );
        assert_eq!(conds.len(), 1);
        assert_eq!(conds[0].reason, "B");
        assert_eq!(conds[0].last_transition_time, at(10));
        upsert_condition(
            &mut conds,
            condition("Running", false, "C", "c", Some(2), at(30)),
        );
        assert_eq!(conds[0].last_transition_time, at(30));
        upsert_condition(
            &mut conds,
            condition("Failed", true, "D", "d", Some(2), at(40)),
        );
        assert_eq!(conds.len(), 2);
    }

    #[test]
    fn settling_sets_both_kstatus_conditions_with_the_message_on_the_true_one() {
        let status_of = |conds: &[Condition], t: &str| {
            let c = find_condition(conds, t).unwrap();
            (c.status.clone(), c.reason.clone(), c.message.clone())
        };
        let mut conds = Vec::new();
        let waiting = Settling::InProgress {
            reason: "Pending".into(),
            message: "placing".into(),
        };
        let failed = Settling::Stalled {
            reason: "BackoffLimitExceeded".into(),
            message: "gave up".into(),
        };
        let cases = [
            (
                waiting,
                kstatus::RECONCILING,
                kstatus::STALLED,
                "Pending",
                "placing",
            ),
            (
                failed,
                kstatus::STALLED,
                kstatus::RECONCILING,
                "BackoffLimitExceeded",
                "gave up",
            ),
        ];
        for (when, (settling, on, off, reason, message)) in [10, 20].into_iter().zip(cases) {
            set_settling(&mut conds, settling, Some(1), at(when));
            assert_eq!(
                status_of(&conds, on),
                ("True".into(), reason.into(), message.into())
            );
            assert_eq!(
                status_of(&conds, off),
                ("False".into(), reason.into(), String::new())
            );
        }
        let done = Settling::Current {
            reason: "Succeeded".into(),
        };
        set_settling(&mut conds, done, Some(2), at(30));
        assert!(conds.iter().all(|c| c.status == "False"));
        assert!(conds.iter().all(|c| c.observed_generation == Some(2)));
        assert_eq!(conds.len(), 2);
    }
}
