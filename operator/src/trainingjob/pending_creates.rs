//! Worker pods this operator created that its pod cache has not shown yet. Without them,
//! the reconcile that our own status write triggers sees the gang short and creates the
//! same pods (and re-applies their support objects) again: measured on a burst of 200
//! jobs, a third of the operator's requests were such repeats, answered 409.
//! (Kubernetes' own controllers keep the same "expectations".)

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a created pod may stay unseen before it counts as missing again: the cache
/// normally shows a create within a second, even in a burst; a pod deleted before the
/// cache ever showed it must be recreated soon.
pub const PATIENCE: Duration = Duration::from_secs(5);

struct Pending {
    attempt: i32,
    names: HashSet<String>,
    since: Instant,
}

/// Created pods the cache does not show yet, and how long until they count as missing
/// (reconcile again then: nothing else may wake the job).
pub struct Unseen {
    pub names: HashSet<String>,
    pub expire_in: Duration,
}

/// Per job (by UID). Single writer: a job's reconciles run one at a time.
#[derive(Default)]
pub struct PendingCreates {
    by_job: Mutex<HashMap<String, Pending>>,
}

impl PendingCreates {
    /// Records that this operator created the pods `names` of `attempt` (a create
    /// answered 409 does not count: that name may still belong to an older pod).
    pub fn record(&self, job_uid: &str, attempt: i32, names: Vec<String>, now: Instant) {
        let mut by_job = self.by_job.lock().unwrap_or_else(|e| e.into_inner());
        let pending = by_job.entry(job_uid.to_string()).or_insert(Pending {
            attempt,
            names: HashSet::new(),
            since: now,
        });
        if pending.attempt != attempt {
            pending.names.clear();
            pending.attempt = attempt;
        }
        pending.names.extend(names);
        pending.since = now;
    }

    /// The pods of `attempt` created recently and still missing from `cached` (the names
    /// of the job's cached pods of that attempt), and when they stop counting; forgets
    /// those the cache shows.
    pub fn unseen(
        &self,
        job_uid: &str,
        attempt: i32,
        cached: &HashSet<&str>,
        now: Instant,
    ) -> Option<Unseen> {
        let mut by_job = self.by_job.lock().unwrap_or_else(|e| e.into_inner());
        let pending = by_job.get_mut(job_uid)?;
        pending.names.retain(|name| !cached.contains(name.as_str()));
        let waited = now.duration_since(pending.since);
        if pending.attempt != attempt || pending.names.is_empty() || waited > PATIENCE {
            by_job.remove(job_uid);
            return None;
        }
        Some(Unseen {
            names: pending.names.clone(),
            expire_in: PATIENCE - waited,
        })
    }

    pub fn forget(&self, job_uid: &str) {
        self.by_job
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(job_uid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn created_pods_count_until_the_cache_shows_them() {
        let pending = PendingCreates::default();
        let t0 = Instant::now();
        pending.record("uid", 0, names(&["w-0", "w-1"]), t0);
        let none = HashSet::new();
        let later = t0 + Duration::from_secs(1);
        let unseen = pending.unseen("uid", 0, &none, later).unwrap();
        assert_eq!(unseen.names.len(), 2);
        assert_eq!(unseen.expire_in, PATIENCE - Duration::from_secs(1));
        let one: HashSet<&str> = ["w-0"].into();
        assert_eq!(
            pending.unseen("uid", 0, &one, t0).unwrap().names,
            HashSet::from(["w-1".to_string()])
        );
        let both: HashSet<&str> = ["w-0", "w-1"].into();
        assert!(pending.unseen("uid", 0, &both, t0).is_none());
        // Seen once is enough: a pod deleted afterwards is missing, not pending.
        assert!(pending.unseen("uid", 0, &none, t0).is_none());
    }

    #[test]
    fn another_attempt_or_too_long_unseen_counts_as_missing() {
        let pending = PendingCreates::default();
        let t0 = Instant::now();
        pending.record("uid", 0, names(&["w-0"]), t0);
        let none = HashSet::new();
        assert!(pending.unseen("uid", 1, &none, t0).is_none());
        pending.record("uid", 1, names(&["w-0"]), t0);
        let late = t0 + PATIENCE + Duration::from_secs(1);
        assert!(pending.unseen("uid", 1, &none, late).is_none());
        assert!(pending.unseen("other", 1, &none, t0).is_none());
    }
}
