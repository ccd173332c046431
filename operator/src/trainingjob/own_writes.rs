//! The operator's own last status write per job. The job watch can deliver that write
//! after the pod events it causes; reconciling from the older job would decide again what
//! was already decided (a second restart, deleting the new attempt's pods). Substituting
//! the written object saves the round trip of a rejected commit; the commit's
//! resourceVersion precondition is what makes a stale view harmless either way.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kube::ResourceExt;
use ringmaster_crds::TrainingJob;

/// Versions a written object supersedes that are remembered; older ones are long gone
/// from any watch.
const MAX_SUPERSEDED: usize = 16;

struct Written {
    /// resourceVersions known to be older than `job`.
    superseded: Vec<String>,
    job: Arc<TrainingJob>,
}

/// Single writer (the reconciler of each job runs one at a time), so a mutex held for a
/// lookup is enough.
#[derive(Default)]
pub struct OwnWrites {
    by_uid: Mutex<HashMap<String, Written>>,
}

impl OwnWrites {
    /// The newest known version of `cached`: our own write when the cache still shows a
    /// version that write replaced, else the cache (which then has caught up or moved on).
    pub fn newest(&self, cached: Arc<TrainingJob>) -> Arc<TrainingJob> {
        let (Some(uid), Some(rv)) = (cached.uid(), cached.resource_version()) else {
            return cached;
        };
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|e| e.into_inner());
        match by_uid.get(&uid) {
            Some(w) if w.superseded.contains(&rv) => w.job.clone(),
            Some(_) => {
                by_uid.remove(&uid);
                cached
            }
            None => cached,
        }
    }

    /// Records that `written` replaced `before` on the server.
    pub fn record(&self, before: &TrainingJob, written: TrainingJob) {
        let (Some(uid), Some(rv)) = (before.uid(), before.resource_version()) else {
            return;
        };
        let mut by_uid = self.by_uid.lock().unwrap_or_else(|e| e.into_inner());
        let mut superseded = match by_uid.remove(&uid) {
            // A chain of writes the cache has not shown yet: all of them are older.
            Some(w) if w.job.resource_version().as_ref() == Some(&rv) => w.superseded,
            _ => Vec::new(),
        };
        superseded.push(rv);
        if superseded.len() > MAX_SUPERSEDED {
            superseded.remove(0);
        }
        by_uid.insert(
            uid,
            Written {
                superseded,
                job: Arc::new(written),
            },
        );
    }

    pub fn forget(&self, job: &TrainingJob) {
        if let Some(uid) = job.uid() {
            let mut by_uid = self.by_uid.lock().unwrap_or_else(|e| e.into_inner());
            by_uid.remove(&uid);
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.by_uid.lock().unwrap().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(rv: &str, restarts: i32) -> TrainingJob {
        let yaml = format!(
            "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\n\
             metadata: {{name: j, namespace: ns, uid: u, resourceVersion: '{rv}'}}\n\
             spec:\n  model: {{architecture: bert, source: /m, numClasses: 2}}\n  data: {{train: /d, format: csv}}\n\
             status: {{restarts: {restarts}}}"
        );
        serde_yaml::from_str(&yaml).unwrap()
    }

    fn restarts(job: &TrainingJob) -> i32 {
        job.status.as_ref().unwrap().restarts
    }

    #[test]
    fn a_lagging_cache_is_replaced_by_our_writes_until_it_catches_up() {
        let writes = OwnWrites::default();
        let v1 = Arc::new(job("1", 0));
        assert_eq!(restarts(&writes.newest(v1.clone())), 0);
        writes.record(&v1, job("2", 1));
        writes.record(&job("2", 1), job("3", 1));
        // The watch still shows version 1 or 2: both were replaced by our write 3.
        assert_eq!(
            writes.newest(v1.clone()).resource_version().as_deref(),
            Some("3")
        );
        assert_eq!(
            writes.newest(Arc::new(job("2", 1))).resource_version(),
            Some("3".into())
        );
        // The cache shows 3 (or anything newer, written by someone else): it wins, and the
        // record is dropped.
        assert_eq!(
            writes.newest(Arc::new(job("4", 1))).resource_version(),
            Some("4".into())
        );
        assert!(writes.is_empty());
        assert_eq!(writes.newest(v1).resource_version(), Some("1".into()));
    }
}
