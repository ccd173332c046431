//! What a rank tells its launcher, one JSON object per stdout line: `ringmaster launch`
//! draws its progress bars and tables from rank 0's lines; in a pod they are the log.

use serde::{Deserialize, Serialize};

use crate::evaluate::EvalReport;
use crate::status_report::StatusReport;

/// Where rank 0's events go: stdout (read by `launch`, the pod log in a cluster) and, in
/// a pod, the job's `status.progress`.
pub struct Sink {
    status: Option<StatusReport>,
}

impl Sink {
    pub fn new() -> Self {
        Self {
            status: StatusReport::from_env(),
        }
    }

    pub fn send(&self, event: Event) {
        event.emit();
        if let Some(status) = &self.status {
            status.send(&event);
        }
    }
}

impl Default for Sink {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Start {
        epochs: u64,
        /// Optimizer steps per epoch.
        steps_per_epoch: u64,
        total_steps: u64,
        train_examples: usize,
        validation_examples: usize,
        world_size: usize,
        labels: Vec<String>,
        /// The step of the checkpoint this run resumed from.
        resumed_at_step: Option<u64>,
    },
    Step {
        epoch: u64,
        step: u64,
        loss: f64,
        lr: f64,
        samples_per_s: f64,
        /// Bus bandwidth of this step's gradient all-reduces, GB/s (None with one rank).
        #[serde(default)]
        allreduce_gbps: Option<f64>,
    },
    Eval {
        epoch: u64,
        step: u64,
        best: bool,
        report: EvalReport,
    },
    Checkpoint {
        step: u64,
        path: String,
    },
    /// The all-reduce ring as it was built (ranks in ring order).
    Ring {
        order: String,
    },
    Done {
        steps: u64,
        /// The best value of `spec.output.bestMetric`.
        best: Option<f64>,
        output: String,
        seconds: f64,
    },
}

impl Event {
    /// Writes the event as one line on stdout.
    fn emit(&self) {
        use std::io::Write;
        let line = serde_json::to_string(self).expect("events serialise");
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }

    /// Parses a line of a rank's stdout; None for anything else it printed.
    pub fn parse(line: &str) -> Option<Self> {
        serde_json::from_str(line).ok()
    }
}
