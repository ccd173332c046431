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
            // The first step of a process is written at once: it says training started.
            let first = p.step == 0;
            p.epoch = *epoch as u32 + 1;
            p.step = *step;
            p.loss = Some(round_to(*loss, 4));
            p.samples_per_second = Some(round_to(*samples_per_s, 1));
            if let Some(gbps) = allreduce_gbps {
                p.allreduce_bus_bandwidth_gbps = Some(round_to(*gbps, 3));
            }
            first
        }
        Event::Eval { report, .. } => {
            p.validation_accuracy = Some(round_to(report.accuracy, 4));
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

/// `kubectl get tj` prints numbers as stored: 0.2967, not 0.2967173755168915.
fn round_to(value: f64, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (value * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, loss: f64) -> Event {
        Event::Step {
            epoch: 0,
            step,
            loss,
            lr: 1e-4,
            samples_per_s: 12.345_678,
            allreduce_gbps: Some(0.123_456_7),
        }
    }

    #[test]
    fn first_step_is_written_at_once_and_numbers_are_short() {
        let mut p = Progress::default();
        assert!(apply(&mut p, &step(1, 0.296_717_375_516_891_5)));
        assert_eq!(p.loss, Some(0.2967));
        assert_eq!(p.samples_per_second, Some(12.3));
        assert_eq!(p.allreduce_bus_bandwidth_gbps, Some(0.123));
        assert!(
            !apply(&mut p, &step(2, 0.25)),
            "later steps wait for the interval"
        );
    }
}
