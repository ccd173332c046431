//! Publishes a rank's fatal error in the store so that ranks which only see the cascade
//! (a neighbour closing its sockets) can name the rank that actually failed.

use std::time::Duration;

use tracing::{error, warn};

use crate::error::Error;
use crate::store::StoreClient;

const COUNTER: &str = "failures";
/// Counts ranks that finished reporting (and reading the first report).
const DONE: &str = "failures/done";

pub(crate) struct FailureLog {
    store: Option<StoreClient>,
    rank: usize,
    world: usize,
    /// How long a rank that timed out waits for the other live ranks to time out too.
    grace: Duration,
}

impl FailureLog {
    pub(crate) fn new(
        store: Option<StoreClient>,
        rank: usize,
        world: usize,
        timeout: Duration,
    ) -> Self {
        FailureLog {
            store,
            rank,
            world,
            grace: (timeout / 4).clamp(Duration::from_millis(500), Duration::from_secs(5)),
        }
    }

    /// Records `err` and returns it, enriched with the job-wide picture. Best effort: a
    /// dead store (rank 0 gone) only means the error is returned as observed.
    pub(crate) fn record(&mut self, err: Error) -> Error {
        let Some(store) = self.store.as_mut() else {
            error!(rank = self.rank, error = %err, "collective failed");
            return err;
        };
        let mut err = err;
        // A stall propagates: every live rank ends up waiting on someone and times out at
        // about the same moment, while the stalled rank never reports. The ranks that did
        // not report within the grace period are the suspects.
        if let Err(e) = store.set(&format!("responsive/{}", self.rank), b"") {
            warn!(rank = self.rank, error = %e, "cannot report the failure to the store");
        }
        if matches!(err, Error::PeerTimeout { .. }) {
            std::thread::sleep(self.grace);
            let silent: Vec<String> = (0..self.world)
                .filter(|&r| r != self.rank)
                .filter(|&r| match store.try_get(&format!("responsive/{r}")) {
                    Ok(v) => v.is_none(),
                    Err(e) => {
                        warn!(rank = self.rank, error = %e, "cannot read failure reports from the store");
                        false
                    }
                })
                .map(|r| format!("rank {r}"))
                .collect();
            if !silent.is_empty() {
                err = err.with_note(&format!(
                    "ranks that stopped responding (no failure report from them within {:.1} s): {}",
                    self.grace.as_secs_f64(),
                    silent.join(", ")
                ));
            }
        }
        if let Ok(seq) = store.add(COUNTER, 1) {
            let _ = store.set(
                &format!("failure/{seq}"),
                format!("rank {}: {err}", self.rank).as_bytes(),
            );
            if seq != 1
                && let Ok(first) = store.get("failure/1", Duration::from_secs(2))
            {
                err = err.with_note(&format!(
                    "first failure reported in this job: {}",
                    String::from_utf8_lossy(&first)
                ));
            }
        }
        let _ = store.add(DONE, 1);
        error!(rank = self.rank, error = %err, "collective failed");
        err
    }

    /// Rank 0 serves the store from its own process: if it returned (and its process
    /// exited) at once, the other ranks could no longer read or publish the failure
    /// reports. It waits, bounded, until every other live rank has reported.
    pub(crate) fn linger_if_hosting(&mut self, hosting: bool) {
        let Some(store) = self.store.as_mut().filter(|_| hosting) else {
            return;
        };
        let bound = self.grace + Duration::from_secs(5);
        // The failed rank (dead or stalled) never reports; everyone else does.
        let _ = store.wait_at_least(DONE, self.world.saturating_sub(1) as i64, bound);
    }
}
