//! Pure decisions: from a job and its observed pods to the next status and the actions
//! that move the cluster towards it. No I/O here, so every rule is unit-tested.
//!
//! Rules a user can rely on:
//! - The job **succeeds** when worker 0 (rank 0, which writes the final model) exits 0
//!   and no worker has failed; workers still running are then cleaned up.
//! - A worker **failure** restarts the whole gang (a ring cannot continue with a member
//!   gone) under `OnFailure`, and under `ExitCode` only for exit codes 128-255 (killed by
//!   a signal: preemption, OOM) or pods lost without an exit code; `Never` and exit codes
//!   1-127 fail the job at once. Restarts wait `base * 2^(n-1)` (capped at 5 minutes) and
//!   count against `backoffLimit`.
//! - `activeDeadlineSeconds` counts from `status.startTime` (all workers running).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use ringmaster_crds::keys::{ATTEMPT, REPLICA_INDEX, TRAINER_CONTAINER};

use super::desired;
use crate::scheduler::explain;
use crate::writes::PlannedEvent;
use ringmaster_crds::{
    CleanPodPolicy, JobPhase, RestartPolicy, Settling, TrainingJob, TrainingJobStatus,
    WorkerCounts, condition, find_condition, set_settling, upsert_condition,
};

const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// Condition types, in the order `kubectl describe` shows them.
pub mod cond {
    pub const CREATED: &str = "Created";
    pub const SCHEDULED: &str = "Scheduled";
    pub const RUNNING: &str = "Running";
    pub const RESTARTING: &str = "Restarting";
    pub const SUCCEEDED: &str = "Succeeded";
    pub const FAILED: &str = "Failed";
    pub const SUSPENDED: &str = "Suspended";
}

/// What the reconciler must do, and the status to write afterwards.
#[derive(Debug, Default)]
pub struct Plan {
    pub status: TrainingJobStatus,
    /// Worker indices whose pods must be created for the current attempt.
    pub create: Vec<i32>,
    /// Pods whose gang scheduling gate can be lifted (the whole gang exists).
    pub release_gates: Vec<String>,
    pub delete_pods: Vec<String>,
    pub delete_job: bool,
    pub requeue_after: Option<Duration>,
    pub events: Vec<PlannedEvent>,
}

impl Plan {
    /// Does the plan change anything besides the status? (Then its status must be
    /// committed first, so that the actions follow from a status the server confirmed.)
    pub fn has_actions(&self) -> bool {
        !(self.create.is_empty()
            && self.release_gates.is_empty()
            && self.delete_pods.is_empty()
            && self.events.is_empty())
    }
}

/// The status of a job whose children the API server refuses for good (too large,
/// invalid, forbidden by admission): Failed/InvalidSpec with the server's reason.
pub fn invalid_spec(job: &TrainingJob, cause: String, now: Timestamp) -> TrainingJobStatus {
    let mut p = Plan {
        status: operator_status(job),
        ..Plan::default()
    };
    fail(&mut p, "InvalidSpec", cause, now);
    settle(&mut p.status, now);
    p.status
}

/// The job's status as the operator writes it: its own fields, for this generation.
fn operator_status(job: &TrainingJob) -> TrainingJobStatus {
    TrainingJobStatus {
        progress: None, // owned by the trainer's field manager, never written here
        observed_generation: job.metadata.generation,
        ..job.status.clone().unwrap_or_default()
    }
}

/// A pod of the job as the rules see it.
#[derive(Debug, Clone)]
struct Worker {
    name: String,
    index: i32,
    attempt: i32,
    state: WorkerState,
    node: Option<String>,
    gated: bool,
    /// The scheduler's `PodScheduled=False` reason and message.
    unschedulable: Option<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum WorkerState {
    Pending,
    Running,
    Succeeded,
    /// Failed, with the trainer's exit code when it had one.
    Failed(Option<i32>),
    Terminating,
}

impl Worker {
    fn from_pod(pod: &Pod) -> Option<Self> {
        let labels = pod.metadata.labels.as_ref()?;
        let index = labels.get(REPLICA_INDEX)?.parse().ok()?;
        let attempt = labels.get(ATTEMPT)?.parse().ok()?;
        let status = pod.status.as_ref();
        let exit_code = status
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.name == TRAINER_CONTAINER))
            .and_then(|c| c.state.as_ref()?.terminated.as_ref())
            .map(|t| t.exit_code);
        let state = if pod.metadata.deletion_timestamp.is_some() {
            WorkerState::Terminating
        } else {
            match status.and_then(|s| s.phase.as_deref()) {
                Some("Running") => WorkerState::Running,
                Some("Succeeded") => WorkerState::Succeeded,
                Some("Failed") => WorkerState::Failed(exit_code),
                _ => WorkerState::Pending,
            }
        };
        let spec = pod.spec.as_ref();
        let unschedulable = status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| {
                // Only a scheduler's verdict (no room, or a malformed gang); the API
                // server's "SchedulingGated" on gated pods says nothing about either.
                cs.iter().find(|c| {
                    c.type_ == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref().is_some_and(|r| {
                            r == explain::UNSCHEDULABLE || r == explain::INVALID_GANG
                        })
                })
            })
            .map(|c| {
                let reason = c.reason.clone().unwrap_or_default();
                (reason, c.message.clone().unwrap_or_default())
            });
        Some(Self {
            name: pod.metadata.name.clone()?,
            index,
            attempt,
            state,
            node: spec.and_then(|s| s.node_name.clone()),
            gated: spec
                .and_then(|s| s.scheduling_gates.as_ref())
                .is_some_and(|g| !g.is_empty()),
            unschedulable,
        })
    }
}

/// Decides the next step for `job`, given all of its pods (any attempt) at time `now`.
pub fn plan<'a>(
    job: &TrainingJob,
    pods: impl IntoIterator<Item = &'a Pod>,
    now: Timestamp,
    backoff_base: Duration,
) -> Plan {
    let mut p = decide(job, pods, now, backoff_base);
    settle(&mut p.status, now);
    p
}

/// The kstatus reading of the phase: a gang being placed or restarted is in progress, a
/// failed job is stalled; a running, finished or suspended one is what its spec asked.
fn settle(status: &mut TrainingJobStatus, now: Timestamp) {
    let message_of = |type_: &str| {
        find_condition(&status.conditions, type_)
            .map(|c| (c.reason.clone(), c.message.clone()))
            .unwrap_or_default()
    };
    let settling = match status.phase {
        None | Some(JobPhase::Pending) => Settling::InProgress {
            reason: "Pending".into(),
            message: "the gang is being created and placed".into(),
        },
        Some(JobPhase::Restarting) => Settling::InProgress {
            reason: "Restarting".into(),
            message: message_of(cond::RESTARTING).1,
        },
        Some(JobPhase::Failed) => {
            let (reason, message) = message_of(cond::FAILED);
            Settling::Stalled {
                reason: if reason.is_empty() {
                    "Failed".into()
                } else {
                    reason
                },
                message,
            }
        }
        Some(phase @ (JobPhase::Running | JobPhase::Succeeded | JobPhase::Suspended)) => {
            Settling::Current {
                reason: format!("{phase:?}"),
            }
        }
    };
    let generation = status.observed_generation;
    set_settling(&mut status.conditions, settling, generation, Time(now));
}

fn decide<'a>(
    job: &TrainingJob,
    pods: impl IntoIterator<Item = &'a Pod>,
    now: Timestamp,
    backoff_base: Duration,
) -> Plan {
    let old = job.status.clone().unwrap_or_default();
    let mut p = Plan {
        status: operator_status(job),
        ..Plan::default()
    };
    let generation = job.metadata.generation;
    let spec = &job.spec;
    let workers: Vec<Worker> = pods.into_iter().filter_map(Worker::from_pod).collect();
    let set = |p: &mut Plan, type_: &str, on: bool, reason: &str, msg: String| {
        upsert_condition(
            &mut p.status.conditions,
            condition(type_, on, reason, msg, generation, Time(now)),
        );
    };

    if let Some(phase) = old.phase.filter(|ph| ph.is_finished()) {
        finish_cleanup(job, &workers, phase, now, &mut p);
        return p;
    }

    if let Err(problem) = validate(job) {
        if old.phase != Some(JobPhase::Failed) {
            fail(&mut p, "InvalidSpec", problem, now);
        }
        return p;
    }

    if spec.run_policy.suspend {
        p.delete_pods = workers
            .iter()
            .filter(|w| w.state != WorkerState::Terminating)
            .map(|w| w.name.clone())
            .collect();
        if old.phase != Some(JobPhase::Suspended) {
            p.events.push(event(
                "Suspended",
                "spec.runPolicy.suspend is true: worker pods removed, job kept",
                false,
            ));
        }
        p.status.phase = Some(JobPhase::Suspended);
        p.status.start_time = None;
        set(
            &mut p,
            cond::SUSPENDED,
            true,
            "Suspended",
            "spec.runPolicy.suspend is true; set it to false to resume".into(),
        );
        set(
            &mut p,
            cond::RUNNING,
            false,
            "Suspended",
            "the job is suspended".into(),
        );
        p.status.workers = count(&workers, old.restarts);
        p.status.workers_ready = Some(format!("0/{}", spec.distribution.workers));
        return p;
    }
    if old.phase == Some(JobPhase::Suspended) {
        set(
            &mut p,
            cond::SUSPENDED,
            false,
            "Resumed",
            "spec.runPolicy.suspend is false".into(),
        );
        p.events
            .push(event("Resumed", "recreating the worker pods", false));
        p.status.phase = Some(JobPhase::Pending);
    }

    let attempt = old.restarts;
    let (current, stale): (Vec<&Worker>, Vec<&Worker>) =
        workers.iter().partition(|w| w.attempt == attempt);
    p.delete_pods.extend(
        stale
            .iter()
            .filter(|w| w.state != WorkerState::Terminating)
            .map(|w| w.name.clone()),
    );
    let total = spec.distribution.workers;
    p.status.workers = count(&workers, attempt);
    let running = p.status.workers.running;
    p.status.workers_ready = Some(format!("{running}/{total}"));

    // A failed worker, or one that vanished from a running gang, ends this attempt.
    let lost = (old.phase == Some(JobPhase::Running))
        .then(|| (0..total).find(|i| !current.iter().any(|w| w.index == *i)))
        .flatten();
    let failure = current
        .iter()
        .filter_map(|w| match w.state {
            WorkerState::Failed(code) => Some((w.index, code)),
            _ => None,
        })
        .min_by_key(|(index, _)| *index)
        .or(lost.map(|i| (i, None)));
    if let Some((index, code)) = failure {
        handle_failure(job, &current, index, code, now, backoff_base, &mut p);
        return p;
    }

    if current
        .iter()
        .any(|w| w.index == 0 && w.state == WorkerState::Succeeded)
    {
        p.status.phase = Some(JobPhase::Succeeded);
        p.status.completion_time = Some(Time(now));
        set(
            &mut p,
            cond::SUCCEEDED,
            true,
            "Rank0Succeeded",
            "worker 0 exited 0: training finished".into(),
        );
        set(
            &mut p,
            cond::RUNNING,
            false,
            "Succeeded",
            "training finished".into(),
        );
        set(
            &mut p,
            cond::RESTARTING,
            false,
            "Succeeded",
            "training finished".into(),
        );
        p.events.push(event(
            "Succeeded",
            "worker 0 exited 0: training finished",
            false,
        ));
        finish_cleanup(job, &workers, JobPhase::Succeeded, now, &mut p);
        return p;
    }

    if let (Some(start), Some(deadline)) =
        (&old.start_time, spec.run_policy.active_deadline_seconds)
    {
        let ends = start.0 + SignedDuration::from_secs(deadline);
        if now >= ends {
            let msg = format!(
                "the job ran longer than spec.runPolicy.activeDeadlineSeconds ({deadline}s)"
            );
            fail(&mut p, "DeadlineExceeded", msg, now);
            finish_cleanup(job, &workers, JobPhase::Failed, now, &mut p);
            return p;
        }
        requeue_at(&mut p, now, ends);
    }

    // Restart backoff: the new attempt starts once the delay has passed and the old pods
    // are gone (the new pods reuse their names).
    if old.phase == Some(JobPhase::Restarting) && current.is_empty() {
        let since = find_condition(&old.conditions, cond::RESTARTING)
            .filter(|c| c.status == "True")
            .map(|c| c.last_transition_time.0)
            .unwrap_or(now);
        let ready_at =
            since + SignedDuration::try_from(backoff(backoff_base, attempt)).unwrap_or_default();
        if now < ready_at {
            requeue_at(&mut p, now, ready_at);
            return p;
        }
    }
    if !stale.is_empty() {
        p.requeue_after = Some(
            p.requeue_after
                .map_or(Duration::from_secs(1), |d| d.min(Duration::from_secs(1))),
        );
        return p;
    }

    p.create = (0..total)
        .filter(|i| !current.iter().any(|w| w.index == *i))
        .collect();
    if p.create.is_empty() {
        p.release_gates = current
            .iter()
            .filter(|w| w.gated)
            .map(|w| w.name.clone())
            .collect();
    }
    let created = p.create.is_empty();
    if find_condition(&old.conditions, cond::CREATED).is_none_or(|c| c.status != "True") {
        if created {
            set(
                &mut p,
                cond::CREATED,
                true,
                "WorkersCreated",
                format!("{total} worker pods and their Service exist"),
            );
        } else {
            let msg = format!("creating {} of {total} worker pods", p.create.len());
            set(&mut p, cond::CREATED, false, "CreatingWorkers", msg);
        }
    }

    let scheduled = current.iter().filter(|w| w.node.is_some()).count() as i32;
    if created && scheduled == total {
        set(
            &mut p,
            cond::SCHEDULED,
            true,
            "GangScheduled",
            format!("all {total} workers are bound to nodes"),
        );
    } else if let Some((reason, message)) = current.iter().find_map(|w| w.unschedulable.clone()) {
        set(&mut p, cond::SCHEDULED, false, &reason, message);
    } else {
        set(
            &mut p,
            cond::SCHEDULED,
            false,
            "WaitingForScheduler",
            format!(
                "{scheduled}/{total} workers bound; the gang is placed all-or-nothing by {}",
                spec.scheduling.scheduler_name
            ),
        );
    }

    if created && running == total {
        if old.phase != Some(JobPhase::Running) {
            p.events.push(event(
                "Running",
                &format!("all {total} workers are running"),
                false,
            ));
        }
        p.status.phase = Some(JobPhase::Running);
        p.status.start_time.get_or_insert(Time(now));
        set(
            &mut p,
            cond::RUNNING,
            true,
            "AllWorkersRunning",
            format!("{total}/{total} workers running"),
        );
        if old.phase == Some(JobPhase::Restarting) {
            set(
                &mut p,
                cond::RESTARTING,
                false,
                "GangRestarted",
                format!("attempt {} is running", attempt + 1),
            );
        }
        if let Some(deadline) = spec.run_policy.active_deadline_seconds {
            let start = p.status.start_time.as_ref().map_or(now, |t| t.0);
            requeue_at(&mut p, now, start + SignedDuration::from_secs(deadline));
        }
    } else if old.phase != Some(JobPhase::Restarting) {
        p.status.phase = Some(JobPhase::Pending);
    }
    p
}

/// Rules the CRD schema cannot express; a job breaking one fails with the reason instead
/// of producing pods that could never start.
pub fn validate(job: &TrainingJob) -> Result<(), String> {
    let spec = &job.spec;
    for mount in &spec.volume_mounts {
        if !spec.volumes.iter().any(|v| v.name == mount.name) {
            return Err(format!(
                "spec.volumeMounts: {:?} mounts volume {:?}, which spec.volumes does not define",
                mount.mount_path, mount.name
            ));
        }
    }
    if spec
        .volume_mounts
        .iter()
        .any(|m| m.mount_path == ringmaster_crds::keys::SPEC_MOUNT_DIR)
    {
        return Err(format!(
            "spec.volumeMounts: {} is reserved for the job spec",
            ringmaster_crds::keys::SPEC_MOUNT_DIR
        ));
    }
    let name = job.metadata.name.as_deref().unwrap_or_default();
    // Pod hostnames `<job>-worker-<i>` must stay DNS labels (63 characters).
    let longest = desired::worker_name(name, spec.distribution.workers - 1);
    if longest.len() > 63 {
        return Err(format!(
            "metadata.name: {name:?} is too long: worker hostname {longest:?} exceeds 63 characters"
        ));
    }
    Ok(())
}

fn handle_failure(
    job: &TrainingJob,
    current: &[&Worker],
    index: i32,
    code: Option<i32>,
    now: Timestamp,
    backoff_base: Duration,
    p: &mut Plan,
) {
    let policy = &job.spec.run_policy;
    let restarts = job.status.as_ref().map_or(0, |s| s.restarts);
    let what = match code {
        Some(code) => format!("worker {index} exited with code {code}"),
        None => {
            format!("worker {index} was lost (no exit code: evicted, deleted or its node failed)")
        }
    };
    let retryable = match policy.restart_policy {
        RestartPolicy::Never => false,
        RestartPolicy::OnFailure => true,
        RestartPolicy::ExitCode => code.is_none_or(|c| c >= 128),
    };
    if !retryable {
        let reason = if policy.restart_policy == RestartPolicy::Never {
            "WorkerFailed"
        } else {
            "NonRetryableExitCode"
        };
        let hint = if policy.restart_policy == RestartPolicy::Never {
            "restartPolicy is Never"
        } else {
            "exit codes 1-127 are not retried under restartPolicy ExitCode; check the worker's logs"
        };
        fail(p, reason, format!("{what}; {hint}"), now);
    } else if restarts >= policy.backoff_limit {
        fail(
            p,
            "BackoffLimitExceeded",
            format!(
                "{what}; the gang was already restarted {restarts} times (backoffLimit {})",
                policy.backoff_limit
            ),
            now,
        );
    } else {
        let delay = backoff(backoff_base, restarts + 1);
        let msg = format!(
            "{what}; restarting the whole gang in {}s (restart {} of {})",
            delay.as_secs(),
            restarts + 1,
            policy.backoff_limit
        );
        p.status.restarts = restarts + 1;
        p.status.phase = Some(JobPhase::Restarting);
        p.status.start_time = None;
        p.delete_pods.extend(
            current
                .iter()
                .filter(|w| w.state != WorkerState::Terminating)
                .map(|w| w.name.clone()),
        );
        upsert_condition(
            &mut p.status.conditions,
            condition(
                cond::RESTARTING,
                true,
                "WorkerFailed",
                msg.clone(),
                job.metadata.generation,
                Time(now),
            ),
        );
        upsert_condition(
            &mut p.status.conditions,
            condition(
                cond::RUNNING,
                false,
                "Restarting",
                msg.clone(),
                job.metadata.generation,
                Time(now),
            ),
        );
        p.events.push(PlannedEvent {
            reason: "Restarting",
            message: msg,
            warning: true,
        });
        p.requeue_after = Some(delay);
        return;
    }
    let workers: Vec<Worker> = current.iter().map(|w| (*w).clone()).collect();
    finish_cleanup(job, &workers, JobPhase::Failed, now, p);
}

fn fail(p: &mut Plan, reason: &'static str, msg: String, now: Timestamp) {
    p.status.phase = Some(JobPhase::Failed);
    p.status.completion_time = Some(Time(now));
    let generation = p.status.observed_generation;
    upsert_condition(
        &mut p.status.conditions,
        condition(
            cond::FAILED,
            true,
            reason,
            msg.clone(),
            generation,
            Time(now),
        ),
    );
    upsert_condition(
        &mut p.status.conditions,
        condition(
            cond::RUNNING,
            false,
            reason,
            msg.clone(),
            generation,
            Time(now),
        ),
    );
    upsert_condition(
        &mut p.status.conditions,
        condition(
            cond::RESTARTING,
            false,
            reason,
            "the job failed",
            generation,
            Time(now),
        ),
    );
    p.events.push(PlannedEvent {
        reason,
        message: msg,
        warning: true,
    });
}

/// After the end: delete pods as `cleanPodPolicy` says and the job itself after its TTL.
fn finish_cleanup(
    job: &TrainingJob,
    workers: &[Worker],
    phase: JobPhase,
    now: Timestamp,
    p: &mut Plan,
) {
    let policy = &job.spec.run_policy;
    let doomed = workers.iter().filter(|w| match policy.clean_pod_policy {
        CleanPodPolicy::All => w.state != WorkerState::Terminating,
        CleanPodPolicy::Running => matches!(w.state, WorkerState::Running | WorkerState::Pending),
        CleanPodPolicy::None => false,
    });
    for w in doomed {
        if !p.delete_pods.contains(&w.name) {
            p.delete_pods.push(w.name.clone());
        }
    }
    p.status.workers_ready = Some(format!("0/{}", job.spec.distribution.workers));
    p.status.phase = Some(phase);
    if let Some(ttl) = policy.ttl_seconds_after_finished {
        let finished = p.status.completion_time.as_ref().map_or(now, |t| t.0);
        let expires = finished + SignedDuration::from_secs(ttl.into());
        if now >= expires {
            p.delete_job = true;
        } else {
            requeue_at(p, now, expires);
        }
    }
}

fn count(workers: &[Worker], attempt: i32) -> WorkerCounts {
    let mut c = WorkerCounts::default();
    for w in workers.iter().filter(|w| w.attempt == attempt) {
        match w.state {
            WorkerState::Pending => c.pending += 1,
            WorkerState::Running => c.running += 1,
            WorkerState::Succeeded => c.succeeded += 1,
            WorkerState::Failed(_) => c.failed += 1,
            WorkerState::Terminating => {}
        }
    }
    c
}

fn backoff(base: Duration, restart: i32) -> Duration {
    let exp = u32::try_from(restart.saturating_sub(1))
        .unwrap_or(0)
        .min(16);
    base.saturating_mul(1 << exp).min(MAX_BACKOFF)
}

fn requeue_at(p: &mut Plan, now: Timestamp, at: Timestamp) {
    let wait =
        Duration::try_from(at.duration_since(now)).unwrap_or_default() + Duration::from_millis(50);
    p.requeue_after = Some(p.requeue_after.map_or(wait, |d| d.min(wait)));
}

fn event(reason: &'static str, message: &str, warning: bool) -> PlannedEvent {
    PlannedEvent {
        reason,
        message: message.to_string(),
        warning,
    }
}

/// The conditions a finished job shows; used by tests and `kubectl wait`.
pub fn is_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, PodSpec, PodStatus,
    };
    use kube::api::ObjectMeta;
    use std::collections::BTreeMap;

    const BASE: Duration = Duration::from_secs(10);

    fn job(extra: &str) -> TrainingJob {
        let yaml = format!(
            "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {{name: j, namespace: ns, uid: u, generation: 2}}\n\
             spec:\n  model: {{architecture: bert, source: /m, numClasses: 2}}\n  data: {{train: /d, format: csv}}\n  distribution: {{workers: 2}}\n{extra}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn pod(index: i32, attempt: i32, phase: &str, exit: Option<i32>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(format!("j-worker-{index}")),
                labels: Some(BTreeMap::from([
                    (REPLICA_INDEX.to_string(), index.to_string()),
                    (ATTEMPT.to_string(), attempt.to_string()),
                ])),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("n".into()),
                ..Default::default()
            }),
            status: Some(PodStatus {
                phase: Some(phase.into()),
                container_statuses: exit.map(|code| {
                    vec![ContainerStatus {
                        name: TRAINER_CONTAINER.into(),
                        state: Some(ContainerState {
                            terminated: Some(ContainerStateTerminated {
                                exit_code: code,
                                ..Default::default()
                            }),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            }),
        }
    }

    fn with_status(mut job: TrainingJob, phase: JobPhase, restarts: i32) -> TrainingJob {
        job.status = Some(TrainingJobStatus {
            phase: Some(phase),
            restarts,
            ..Default::default()
        });
        job
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_000_000).unwrap()
    }

    #[test]
    fn a_job_that_cannot_be_built_fails_with_the_cause_and_keeps_its_counts() {
        let job = with_status(job(""), JobPhase::Pending, 1);
        let status = invalid_spec(
            &job,
            "ConfigMap j-spec cannot be created: too long".into(),
            now(),
        );
        assert_eq!(status.phase, Some(JobPhase::Failed));
        assert_eq!(status.restarts, 1);
        let failed = find_condition(&status.conditions, cond::FAILED).unwrap();
        assert_eq!(failed.reason, "InvalidSpec");
        assert!(failed.message.starts_with("ConfigMap j-spec"));
        // Once failed, the next plan only cleans up: no pods are created again.
        let mut done = job.clone();
        done.status = Some(status);
        let p = plan(&done, &[], now(), BASE);
        assert!(p.create.is_empty());
        assert!(!p.has_actions());
    }

    #[test]
    fn new_job_creates_every_worker() {
        let p = plan(&job(""), &[], now(), BASE);
        assert_eq!(p.create, vec![0, 1]);
        assert_eq!(p.status.phase, Some(JobPhase::Pending));
        assert!(!is_true(&p.status.conditions, cond::CREATED));
    }

    #[test]
    fn gates_are_lifted_only_when_the_whole_gang_exists() {
        let mut gated = pod(0, 0, "Pending", None);
        gated.spec.as_mut().unwrap().scheduling_gates = Some(vec![Default::default()]);
        gated.spec.as_mut().unwrap().node_name = None;
        let p = plan(&job(""), std::slice::from_ref(&gated), now(), BASE);
        assert_eq!(p.create, vec![1]);
        assert!(p.release_gates.is_empty(), "half a gang must stay gated");
        let mut second = gated.clone();
        second.metadata.name = Some("j-worker-1".into());
        second
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(REPLICA_INDEX.into(), "1".into());
        let p = plan(&job(""), &[gated, second], now(), BASE);
        assert_eq!(
            p.release_gates,
            vec!["j-worker-0".to_string(), "j-worker-1".to_string()]
        );
        assert!(is_true(&p.status.conditions, cond::CREATED));
    }

    #[test]
    fn all_running_is_running_with_start_time() {
        let pods = [pod(0, 0, "Running", None), pod(1, 0, "Running", None)];
        let p = plan(&job(""), &pods, now(), BASE);
        assert_eq!(p.status.phase, Some(JobPhase::Running));
        assert_eq!(p.status.workers_ready.as_deref(), Some("2/2"));
        assert!(is_true(&p.status.conditions, cond::RUNNING));
        assert!(is_true(&p.status.conditions, cond::SCHEDULED));
        assert_eq!(p.status.start_time, Some(Time(now())));
    }

    #[test]
    fn failure_under_on_failure_restarts_the_whole_gang_with_backoff() {
        let pods = [pod(0, 0, "Running", None), pod(1, 0, "Failed", Some(1))];
        let p = plan(
            &with_status(job(""), JobPhase::Running, 0),
            &pods,
            now(),
            BASE,
        );
        assert_eq!(p.status.phase, Some(JobPhase::Restarting));
        assert_eq!(p.status.restarts, 1);
        assert_eq!(
            p.delete_pods,
            vec!["j-worker-0".to_string(), "j-worker-1".to_string()]
        );
        assert_eq!(p.requeue_after, Some(BASE));
        assert!(p.events[0].message.contains("worker 1 exited with code 1"));
        // Second restart waits twice as long.
        let pods = [pod(0, 1, "Failed", Some(1)), pod(1, 1, "Running", None)];
        let p = plan(
            &with_status(job(""), JobPhase::Running, 1),
            &pods,
            now(),
            BASE,
        );
        assert_eq!(p.requeue_after, Some(BASE * 2));
    }

    #[test]
    fn backoff_limit_fails_the_job() {
        let pods = [pod(0, 3, "Failed", Some(2)), pod(1, 3, "Running", None)];
        let p = plan(
            &with_status(job(""), JobPhase::Running, 3),
            &pods,
            now(),
            BASE,
        );
        assert_eq!(p.status.phase, Some(JobPhase::Failed));
        let failed = find_condition(&p.status.conditions, cond::FAILED).unwrap();
        assert_eq!(failed.reason, "BackoffLimitExceeded");
        assert_eq!(
            p.delete_pods,
            vec!["j-worker-1".to_string()],
            "cleanPodPolicy Running deletes the running one"
        );
    }

    #[test]
    fn exit_code_policy_retries_signals_only() {
        let policy = "  runPolicy: {restartPolicy: ExitCode}\n";
        let killed = [pod(0, 0, "Failed", Some(137)), pod(1, 0, "Running", None)];
        let p = plan(
            &with_status(job(policy), JobPhase::Running, 0),
            &killed,
            now(),
            BASE,
        );
        assert_eq!(p.status.phase, Some(JobPhase::Restarting));
        let bug = [pod(0, 0, "Failed", Some(3)), pod(1, 0, "Running", None)];
        let p = plan(
            &with_status(job(policy), JobPhase::Running, 0),
            &bug,
            now(),
            BASE,
        );
        assert_eq!(
            find_condition(&p.status.conditions, cond::FAILED)
                .unwrap()
                .reason,
            "NonRetryableExitCode"
        );
    }

    #[test]
    fn never_policy_fails_at_once() {
        let pods = [pod(0, 0, "Failed", Some(137)), pod(1, 0, "Running", None)];
        let p = plan(
            &with_status(
                job("  runPolicy: {restartPolicy: Never}\n"),
                JobPhase::Running,
                0,
            ),
            &pods,
            now(),
            BASE,
        );
        assert_eq!(
            find_condition(&p.status.conditions, cond::FAILED)
                .unwrap()
                .reason,
            "WorkerFailed"
        );
    }

    #[test]
    fn a_worker_vanishing_from_a_running_gang_is_a_failure() {
        let pods = [pod(0, 0, "Running", None)];
        let p = plan(
            &with_status(job(""), JobPhase::Running, 0),
            &pods,
            now(),
            BASE,
        );
        assert_eq!(p.status.phase, Some(JobPhase::Restarting));
        assert!(p.create.is_empty(), "no replacement joins a broken ring");
    }

    #[test]
    fn restart_waits_for_backoff_and_old_pods() {
        let mut j = with_status(job(""), JobPhase::Restarting, 1);
        let since = Timestamp::from_second(1_000_000 - 4).unwrap();
        j.status.as_mut().unwrap().conditions.push(condition(
            cond::RESTARTING,
            true,
            "WorkerFailed",
            "x",
            None,
            Time(since),
        ));
        let p = plan(&j, &[], now(), BASE);
        assert!(p.create.is_empty());
        assert!(p.requeue_after.unwrap() > Duration::from_secs(5));
        let later = Timestamp::from_second(1_000_000 + 7).unwrap();
        let stale = [pod(0, 0, "Failed", Some(1))];
        let p = plan(&j, &stale, later, BASE);
        assert!(
            p.create.is_empty(),
            "new pods reuse the names of the old ones"
        );
        assert_eq!(p.delete_pods, vec!["j-worker-0".to_string()]);
        let p = plan(&j, &[], later, BASE);
        assert_eq!(p.create, vec![0, 1]);
        assert_eq!(p.status.phase, Some(JobPhase::Restarting));
    }

    #[test]
    fn rank_zero_success_succeeds_and_cleans_running_workers() {
        let pods = [pod(0, 0, "Succeeded", Some(0)), pod(1, 0, "Running", None)];
        let p = plan(
            &with_status(job(""), JobPhase::Running, 0),
            &pods,
            now(),
            BASE,
        );
        assert_eq!(p.status.phase, Some(JobPhase::Succeeded));
        assert!(is_true(&p.status.conditions, cond::SUCCEEDED));
        assert_eq!(p.delete_pods, vec!["j-worker-1".to_string()]);
    }

    #[test]
    fn clean_pod_policy_all_and_none() {
        let pods = [pod(0, 0, "Succeeded", Some(0)), pod(1, 0, "Running", None)];
        let all = plan(
            &with_status(
                job("  runPolicy: {cleanPodPolicy: All}\n"),
                JobPhase::Running,
                0,
            ),
            &pods,
            now(),
            BASE,
        );
        assert_eq!(all.delete_pods.len(), 2);
        let none = plan(
            &with_status(
                job("  runPolicy: {cleanPodPolicy: None}\n"),
                JobPhase::Running,
                0,
            ),
            &pods,
            now(),
            BASE,
        );
        assert!(none.delete_pods.is_empty());
    }

    #[test]
    fn ttl_deletes_the_job_after_it_finishes() {
        let mut j = with_status(
            job("  runPolicy: {ttlSecondsAfterFinished: 60}\n"),
            JobPhase::Succeeded,
            0,
        );
        j.status.as_mut().unwrap().completion_time =
            Some(Time(Timestamp::from_second(1_000_000 - 30).unwrap()));
        let p = plan(&j, &[], now(), BASE);
        assert!(!p.delete_job);
        assert!(p.requeue_after.unwrap() <= Duration::from_secs(31));
        let p = plan(
            &j,
            &[],
            Timestamp::from_second(1_000_000 + 31).unwrap(),
            BASE,
        );
        assert!(p.delete_job);
    }

    #[test]
    fn deadline_fails_a_job_that_runs_too_long() {
        let mut j = with_status(
            job("  runPolicy: {activeDeadlineSeconds: 100}\n"),
            JobPhase::Running,
            0,
        );
        j.status.as_mut().unwrap().start_time =
            Some(Time(Timestamp::from_second(1_000_000 - 101).unwrap()));
        let pods = [pod(0, 0, "Running", None), pod(1, 0, "Running", None)];
        let p = plan(&j, &pods, now(), BASE);
        assert_eq!(
            find_condition(&p.status.conditions, cond::FAILED)
                .unwrap()
                .reason,
            "DeadlineExceeded"
        );
        assert_eq!(p.delete_pods.len(), 2);
    }

    #[test]
    fn suspend_removes_pods_and_resume_recreates_them() {
        let pods = [pod(0, 0, "Running", None), pod(1, 0, "Running", None)];
        let p = plan(
            &with_status(job("  runPolicy: {suspend: true}\n"), JobPhase::Running, 0),
            &pods,
            now(),
            BASE,
        );
        assert_eq!(p.status.phase, Some(JobPhase::Suspended));
        assert_eq!(p.delete_pods.len(), 2);
        assert!(is_true(&p.status.conditions, cond::SUSPENDED));
        let p = plan(
            &with_status(job(""), JobPhase::Suspended, 0),
            &[],
            now(),
            BASE,
        );
        assert_eq!(p.create, vec![0, 1]);
        assert!(!is_true(&p.status.conditions, cond::SUSPENDED));
    }

    #[test]
    fn invalid_spec_fails_with_the_field() {
        let j = job("  volumeMounts: [{name: data, mountPath: /data}]\n");
        let p = plan(&j, &[], now(), BASE);
        let failed = find_condition(&p.status.conditions, cond::FAILED).unwrap();
        assert_eq!(failed.reason, "InvalidSpec");
        assert!(
            failed.message.contains("spec.volumeMounts") && failed.message.contains("\"data\"")
        );
        assert!(p.create.is_empty());
    }

    #[test]
    fn unschedulable_reason_reaches_the_scheduled_condition() {
        let mut waiting = pod(0, 0, "Pending", None);
        waiting.spec.as_mut().unwrap().node_name = None;
        waiting.status.as_mut().unwrap().conditions =
            Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                message: Some("gang 1/2 placeable: zone-a has 6 free GPUs but needs 8".into()),
                ..Default::default()
            }]);
        let mut other = waiting.clone();
        other.metadata.name = Some("j-worker-1".into());
        other
            .metadata
            .labels
            .as_mut()
            .unwrap()
            .insert(REPLICA_INDEX.into(), "1".into());
        let p = plan(&job(""), &[waiting, other], now(), BASE);
        let scheduled = find_condition(&p.status.conditions, cond::SCHEDULED).unwrap();
        assert_eq!(scheduled.reason, "Unschedulable");
        assert!(scheduled.message.contains("zone-a has 6 free GPUs"));
    }

    #[test]
    fn scheduling_gated_is_not_a_scheduler_verdict() {
        let mut gated = pod(0, 0, "Pending", None);
        gated.spec.as_mut().unwrap().node_name = None;
        gated.status.as_mut().unwrap().conditions =
            Some(vec![k8s_openapi::api::core::v1::PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("SchedulingGated".into()),
                message: Some("Scheduling is blocked due to non-empty scheduling gates".into()),
                ..Default::default()
            }]);
        let p = plan(&job(""), &[gated], now(), BASE);
        let scheduled = find_condition(&p.status.conditions, cond::SCHEDULED).unwrap();
        assert_eq!(scheduled.reason, "WaitingForScheduler");
    }
}
