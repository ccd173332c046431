//! Publishes a rank's fatal error in the store so that ranks which only see the cascade
//! (a neighbour closing its sockets) can name the rank that actually failed.

use std::time::Duration;

use tracing::error;

use crate::error::Error;
use crate::store::StoreClient;

const COUNTER: &str = "failures";

pub(crate) struct FailureLog {
    store: Option<StoreClient>,
    rank: usize,
}

impl FailureLog {
    pub(crate) fn new(store: Option<StoreClient>, rank: usize) -> Self {
        FailureLog { store, rank }
    }

    /// Records `err` and returns it, enriched with the job's first reported failure when
    /// another rank reported earlier. Best effort: a dead store (rank 0 gone) only means
    /// the error is returned as observed.
    pub(crate) fn record(&mut self, err: Error) -> Error {
        error!(rank = self.rank, error = %err, "collective failed");
        let Some(store) = self.store.as_mut() else {
            return err;
        };
        let Ok(seq) = store.add(COUNTER, 1) else {
            self.store = None;
            return err;
        };
        let _ = store.set(&format!("failure/{seq}"), format!("rank {}: {err}", self.rank).as_bytes());
        if seq == 1 {
            return err;
        }
        match store.get("failure/1", Duration::from_secs(2)) {
            Ok(first) => err.with_cause(&String::from_utf8_lossy(&first)),
            Err(_) => err,
        }
    }
}
