//! Live progress in the TrainingJob's `status.progress` when rank 0 runs in a pod (the
//! operator sets RINGMASTER_JOB and RINGMASTER_NAMESPACE and a ServiceAccount that may
//! patch only that status). Writes go out from a thread of their own, at most one per
//! `MIN_INTERVAL` for steps and at once for evaluations, so the API server sees a bounded
//! rate however fast training steps are, and training never waits for it.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

use ringmaster_crds::{Progress, ProgressReporter};
use tracing::warn;

use crate::events::Event;

const MIN_INTERVAL: Duration = Duration::from_secs(5);

pub struct StatusReport {
    tx: Option<Sender<Event>>,
    writer: Option<std::thread::JoinHandle<()>>,
}

impl StatusReport {
    /// None outside a cluster (no RINGMASTER_JOB): `launch` reports to the terminal.
    pub fn from_env() -> Option<Self> {
        std::env::var_os("RINGMASTER_JOB")?;
        let (tx, rx) = channel();
        let writer = std::thread::Builder::new()
            .name("status-report".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => return warn!(error = %e, "no runtime for status reports"),
                };
                runtime.block_on(report(rx));
            })
            .ok()?;
        Some(Self {
            tx: Some(tx),
            writer: Some(writer),
        })
    }

    pub fn send(&self, event: &Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(event.clone());
        }
    }
}

impl Drop for StatusReport {
    /// The last report (the end of training) is written before the process exits.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

async fn report(rx: Receiver<Event>) {
    let Some(reporter) = ProgressReporter::from_env().await else {
        return warn!("RINGMASTER_JOB is set but no in-cluster credentials: no status.progress");
    };
    let mut progress = Progress::default();
    let mut last_write: Option<Instant> = None;
    let mut dirty = false;
    loop {
        let event = match rx.recv_timeout(MIN_INTERVAL) {
            Ok(event) => Some(event),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let urgent = match &event {
            Some(e) => apply(&mut progress, e),
            None => false,
        };
        dirty |= event.is_some();
        let due = last_write.is_none_or(|t| t.elapsed() >= MIN_INTERVAL);
        if dirty && (urgent || due) {
            if let Err(e) = reporter.report(&progress).await {
                warn!(error = %e, "could not write status.progress");
            }
            last_write = Some(Instant::now());
            dirty = false;
        }
    }
}

/// Folds an event into the progress; true when it should be written at once.
fn apply(p: &mut Progress, event: &Event) -> bool {
    match event {
        Event::Start {
            epochs,
            total_steps,
            ..
        } => {
            p.total_epochs = *epochs as u32;
            p.total_steps = *total_steps;
            p.epoch = p.epoch.max(1);
            true
        }
        Event::Step {
            epoch,
            step,
            loss,
            samples_per_s,
            allreduce_gbps,
            ..
        } => {
            p.epoch = *epoch as u32 + 1;
            p.step = *step;
            p.loss = Some(*loss);
            p.samples_per_second = Some(*samples_per_s);
            if allreduce_gbps.is_some() {
                p.allreduce_bus_bandwidth_gbps = *allreduce_gbps;
            }
            false
        }
        Event::Eval { report, .. } => {
            p.validation_accuracy = Some(report.accuracy);
            true
        }
        Event::Checkpoint { .. } => false,
        Event::Ring { order } => {
            p.ring_order = Some(order.clone());
            true
        }
        Event::Done { output, .. } => {
            p.best_checkpoint = Some(format!("{output}/best"));
            true
        }
    }
}
