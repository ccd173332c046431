//! Pure decisions: from a service, its resolved (or unresolved) model and its Deployment
//! as observed to the next status and the Events of its transitions.
//!
//! - `ModelResolved` says whether there is a model to serve (a `source`, or the best model
//!   of a TrainingJob that succeeded) and, if not, what is awaited.
//! - `Ready` is True once a replica is ready and the Deployment's current generation is
//!   rolled out: observed, and every replica on its pod template. While a new version
//!   rolls out the old replicas still serve, but `kubectl wait --for=condition=Ready`
//!   waits for the new one. Scaling is no rollout: an autoscaler adding replicas under
//!   load leaves Ready alone (the message shows the counts).
//! - Without a model there is no Deployment yet; once there is one it keeps serving the
//!   model it has when the job is later deleted (`ttlSecondsAfterFinished`) or re-run.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use ringmaster_crds::keys::MODEL_VERSION;
use ringmaster_crds::{
    InferenceService, InferenceServiceStatus, Settling, condition, find_condition, set_settling,
    upsert_condition,
};

use super::desired;
use super::model::{self, Resolved, Unresolved};
use crate::writes::PlannedEvent;

/// Condition types.
pub mod cond {
    pub const READY: &str = "Ready";
    pub const MODEL_RESOLVED: &str = "ModelResolved";
}

pub mod reason {
    pub const RESOLVED: &str = "Resolved";
    pub const SERVING: &str = "Serving";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const NO_READY_REPLICAS: &str = "NoReadyReplicas";
    pub const ROLLOUT_STALLED: &str = "RolloutStalled";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const NEW_MODEL_VERSION: &str = "NewModelVersion";
}

/// Reasons that need a person: their Events are Warnings.
const WARNINGS: [&str; 5] = [
    model::reason::NOT_FOUND,
    model::reason::FAILED,
    model::reason::NOT_ON_VOLUME,
    reason::ROLLOUT_STALLED,
    reason::INVALID_SPEC,
];

/// The status to write and the Events of its transitions.
#[derive(Debug)]
pub struct Plan {
    pub status: InferenceServiceStatus,
    pub events: Vec<PlannedEvent>,
}

/// A condition as decided, before it is stamped with a time and generation.
struct Verdict {
    on: bool,
    reason: &'static str,
    message: String,
}

impl Verdict {
    fn new(on: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            on,
            reason,
            message: message.into(),
        }
    }
}

pub fn plan(
    isvc: &InferenceService,
    model: Result<&Resolved, &Unresolved>,
    deployment: Option<&Deployment>,
    now: Timestamp,
) -> Plan {
    let resolved = match model {
        Ok(m) => Verdict::new(true, reason::RESOLVED, format!("resolved to {}", m.uri)),
        Err(u) => Verdict::new(false, u.reason, u.message.clone()),
    };
    let ready = match (deployment, model) {
        (Some(d), _) => readiness(isvc, d),
        (None, Err(u)) => Verdict::new(false, u.reason, u.message.clone()),
        (None, Ok(_)) => Verdict::new(false, reason::NO_READY_REPLICAS, "no Deployment yet"),
    };
    let spec = deployment.and_then(|d| d.spec.as_ref());
    let replicas = spec.and_then(|s| s.replicas).unwrap_or(0);
    let ready_replicas = deployment
        .and_then(|d| d.status.as_ref()?.ready_replicas)
        .unwrap_or(0);
    let status = InferenceServiceStatus {
        url: Some(desired::url(
            isvc.metadata.name.as_deref().unwrap_or_default(),
            isvc.metadata.namespace.as_deref().unwrap_or_default(),
        )),
        replicas,
        ready_replicas,
        replicas_display: Some(format!("{ready_replicas}/{replicas}")),
        // What the replicas are made to serve: the Deployment's, which outlives the model's
        // resolution (a deleted job).
        model_version: spec
            .and_then(|s| s.template.metadata.as_ref()?.annotations.as_ref())
            .and_then(|a| a.get(MODEL_VERSION).cloned()),
        observed_generation: isvc.metadata.generation,
        ..isvc.status.clone().unwrap_or_default()
    };
    let mut plan = Plan {
        status,
        events: Vec::new(),
    };
    let old_version = isvc.status.as_ref().and_then(|s| s.model_version.clone());
    if let (Some(old), Some(new)) = (&old_version, &plan.status.model_version)
        && old != new
    {
        plan.events.push(PlannedEvent {
            reason: reason::NEW_MODEL_VERSION,
            message: format!("rolling out {new} (was {old})"),
            warning: false,
        });
    }
    set(&mut plan, isvc, cond::MODEL_RESOLVED, resolved, now);
    set(&mut plan, isvc, cond::READY, ready, now);
    settle(&mut plan.status, now);
    plan
}

/// Reasons for not being Ready that no waiting cures.
const STALLED: [&str; 4] = [
    model::reason::FAILED,
    model::reason::NOT_ON_VOLUME,
    reason::ROLLOUT_STALLED,
    reason::INVALID_SPEC,
];

/// The kstatus reading of `Ready`: serving is current; a failed job, a missing
/// checkpoint, a stalled rollout or a refused spec is stalled; anything else (waiting for
/// the job, rolling out) is in progress.
fn settle(status: &mut InferenceServiceStatus, now: Timestamp) {
    let Some(ready) = find_condition(&status.conditions, cond::READY) else {
        return;
    };
    let (reason, message) = (ready.reason.clone(), ready.message.clone());
    let settling = if ready.status == "True" {
        Settling::Current { reason }
    } else if STALLED.contains(&reason.as_str()) {
        Settling::Stalled { reason, message }
    } else {
        Settling::InProgress { reason, message }
    };
    let generation = status.observed_generation;
    set_settling(&mut status.conditions, settling, generation, Time(now));
}

/// The status of a service whose children the API server refuses for good (invalid,
/// forbidden by admission): Ready=False/InvalidSpec with the server's reason.
pub fn invalid_spec(isvc: &InferenceService, cause: String, now: Timestamp) -> Plan {
    let mut plan = Plan {
        status: InferenceServiceStatus {
            observed_generation: isvc.metadata.generation,
            ..isvc.status.clone().unwrap_or_default()
        },
        events: Vec::new(),
    };
    set(
        &mut plan,
        isvc,
        cond::READY,
        Verdict::new(false, reason::INVALID_SPEC, cause),
        now,
    );
    settle(&mut plan.status, now);
    plan
}

/// Sets a condition for this generation, with an Event when its status or reason changed
/// (the same Event once, when both conditions change to the same reason).
fn set(plan: &mut Plan, isvc: &InferenceService, type_: &str, v: Verdict, now: Timestamp) {
    let generation = isvc.metadata.generation;
    let old = isvc
        .status
        .as_ref()
        .and_then(|s| find_condition(&s.conditions, type_));
    let changed = old.is_none_or(|c| (c.status == "True") != v.on || c.reason != v.reason);
    if changed
        && !plan
            .events
            .iter()
            .any(|e| e.reason == v.reason && e.message == v.message)
    {
        plan.events.push(PlannedEvent {
            reason: v.reason,
            message: v.message.clone(),
            warning: WARNINGS.contains(&v.reason),
        });
    }
    upsert_condition(
        &mut plan.status.conditions,
        condition(type_, v.on, v.reason, v.message, generation, Time(now)),
    );
}

/// Ready from the Deployment: a replica ready, the current generation observed, and no
/// replica left on an older pod template.
fn readiness(isvc: &InferenceService, d: &Deployment) -> Verdict {
    let status = d.status.clone().unwrap_or_default();
    let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let ready = status.ready_replicas.unwrap_or(0);
    let updated = status.updated_replicas.unwrap_or(0);
    let older = status.replicas.unwrap_or(0) - updated;
    let observed = status.observed_generation >= d.metadata.generation;
    let stalled = status.conditions.iter().flatten().find(|c| {
        c.type_ == "Progressing" && c.reason.as_deref() == Some("ProgressDeadlineExceeded")
    });
    // What a user who asked for scale to zero must know.
    let note = if isvc.spec.replicas.min == 0 {
        " (replicas.min 0 runs as 1: the autoscaler scales to zero only with the \
         HPAScaleToZero feature gate)"
    } else {
        ""
    };
    let counts = format!("{ready}/{desired} replicas ready");
    if let Some(c) = stalled {
        let why = c.message.as_deref().unwrap_or_default();
        Verdict::new(
            false,
            reason::ROLLOUT_STALLED,
            format!("{counts}; rollout stalled: {why}{note}"),
        )
    } else if ready < 1 {
        Verdict::new(
            false,
            reason::NO_READY_REPLICAS,
            format!("{counts} (scheduling, or loading the model){note}"),
        )
    } else if !observed || older > 0 {
        Verdict::new(
            false,
            reason::ROLLING_OUT,
            format!("{counts}; rolling out: {updated} replicas updated, {older} to replace{note}"),
        )
    } else {
        Verdict::new(true, reason::SERVING, format!("{counts}{note}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DeploymentSpec, DeploymentStatus};
    use k8s_openapi::api::core::v1::PodTemplateSpec;
    use kube::api::ObjectMeta;
    use std::collections::BTreeMap;

    fn isvc(min: i32) -> InferenceService {
        serde_yaml::from_str(&format!(
            "apiVersion: ringmaster.dev/v1alpha1\nkind: InferenceService\n\
             metadata: {{name: spam, namespace: ml, generation: 3}}\n\
             spec: {{model: {{architecture: bert, trainingJobRef: {{name: job}}}}, replicas: {{min: {min}, max: 3}}}}"
        ))
        .unwrap()
    }

    /// A Deployment of 2 replicas wanted, `total` existing, `updated` on the current template.
    fn deployment(
        generation: i64,
        observed: i64,
        total: i32,
        updated: i32,
        ready: i32,
    ) -> Deployment {
        Deployment {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..ObjectMeta::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(2),
                template: PodTemplateSpec {
                    metadata: Some(ObjectMeta {
                        annotations: Some(BTreeMap::from([(
                            MODEL_VERSION.to_string(),
                            "job@/out/best#t2".to_string(),
                        )])),
                        ..ObjectMeta::default()
                    }),
                    spec: None,
                },
                ..DeploymentSpec::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(observed),
                replicas: Some(total),
                updated_replicas: Some(updated),
                ready_replicas: Some(ready),
                ..DeploymentStatus::default()
            }),
        }
    }

    fn resolved() -> Resolved {
        Resolved {
            uri: "/out/best".into(),
            version: "job@/out/best#t2".into(),
            volumes: Vec::new(),
            volume_mounts: Vec::new(),
        }
    }

    fn ready_of(plan: &Plan) -> (String, String) {
        let c = find_condition(&plan.status.conditions, cond::READY).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn waiting_for_the_job_is_not_ready_and_says_why_once() {
        let waiting = Unresolved {
            reason: model::reason::WAITING,
            message: "waiting for TrainingJob job to succeed (phase Running)".into(),
        };
        let plan = plan(&isvc(1), Err(&waiting), None, Timestamp::UNIX_EPOCH);
        assert_eq!(
            ready_of(&plan),
            ("False".into(), "WaitingForTrainingJob".into())
        );
        assert_eq!(
            plan.status.url.as_deref(),
            Some("http://spam.ml.svc.cluster.local")
        );
        assert_eq!(plan.status.replicas_display.as_deref(), Some("0/0"));
        assert_eq!(plan.events.len(), 1, "{:?}", plan.events);
        let c = find_condition(&plan.status.conditions, cond::MODEL_RESOLVED).unwrap();
        assert_eq!(c.observed_generation, Some(3));
    }

    #[test]
    fn ready_needs_a_ready_replica_and_every_replica_on_the_current_template() {
        let m = resolved();
        let at = Timestamp::UNIX_EPOCH;
        let starting = plan(&isvc(1), Ok(&m), Some(&deployment(2, 2, 2, 2, 0)), at);
        assert_eq!(ready_of(&starting).1, reason::NO_READY_REPLICAS);
        let rolling = plan(&isvc(1), Ok(&m), Some(&deployment(3, 3, 3, 1, 2)), at);
        assert_eq!(ready_of(&rolling).1, reason::ROLLING_OUT);
        let unobserved = plan(&isvc(1), Ok(&m), Some(&deployment(4, 3, 2, 2, 2)), at);
        assert_eq!(ready_of(&unobserved).1, reason::ROLLING_OUT);
        let done = plan(&isvc(1), Ok(&m), Some(&deployment(3, 3, 2, 2, 2)), at);
        assert_eq!(ready_of(&done), ("True".into(), reason::SERVING.into()));
        assert_eq!(done.status.replicas_display.as_deref(), Some("2/2"));
        assert_eq!(
            done.status.model_version.as_deref(),
            Some("job@/out/best#t2")
        );
        // Scaling up is no rollout: still serving, on fewer replicas than wanted.
        let scaling = plan(&isvc(1), Ok(&m), Some(&deployment(5, 5, 1, 1, 1)), at);
        assert_eq!(ready_of(&scaling).0, "True");
        assert_eq!(scaling.status.replicas_display.as_deref(), Some("1/2"));
        let zero = plan(&isvc(0), Ok(&m), Some(&deployment(3, 3, 2, 2, 2)), at);
        let c = find_condition(&zero.status.conditions, cond::READY).unwrap();
        assert!(c.message.contains("HPAScaleToZero"), "{}", c.message);
    }

    #[test]
    fn events_only_on_transitions_and_new_versions() {
        let m = resolved();
        let at = Timestamp::UNIX_EPOCH;
        let mut served = isvc(1);
        let first = plan(&served, Ok(&m), Some(&deployment(3, 3, 2, 2, 2)), at);
        assert_eq!(first.events.len(), 2, "ModelResolved and Ready");
        served.status = Some(first.status);
        let again = plan(&served, Ok(&m), Some(&deployment(3, 3, 2, 2, 2)), at);
        assert!(again.events.is_empty(), "{:?}", again.events);
        served.status.as_mut().unwrap().model_version = Some("job@/out/best#t1".into());
        let newer = plan(&served, Ok(&m), Some(&deployment(3, 3, 2, 2, 2)), at);
        assert_eq!(newer.events[0].reason, reason::NEW_MODEL_VERSION);
    }
}
