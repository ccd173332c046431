//! Dynamic batching: one thread owns the model; requests queue for it and are gathered
//! until `max_batch` inputs, `max_delay` after the first, or until no other request is
//! expected. One forward pass answers them all, each with its own rows.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::classifier::{Classifier, Instance};
use super::metrics::Metrics;

/// Per-input class probabilities, or why the forward pass failed.
pub type Answer = Result<Vec<Vec<f32>>, String>;

struct Job {
    instances: Vec<Instance>,
    reply: oneshot::Sender<Answer>,
}

/// Longest wait for the next returning client between two arrivals.
const RETURN_GAP: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy)]
pub struct BatchPolicy {
    pub max_batch: usize,
    pub max_delay: Duration,
}

/// The queue in front of the model thread; the thread ends when the last clone drops.
pub struct Batcher {
    jobs: Sender<Job>,
    metrics: Arc<Metrics>,
    pending: Arc<Pending>,
}

impl Batcher {
    pub fn start(
        classifier: Arc<Classifier>,
        policy: BatchPolicy,
        metrics: Arc<Metrics>,
        pending: Arc<Pending>,
    ) -> Self {
        let (jobs, queue) = channel();
        let (thread_metrics, thread_pending) = (metrics.clone(), pending.clone());
        std::thread::Builder::new()
            .name("ringmaster-model".into())
            .spawn(move || {
                run(
                    &classifier,
                    policy,
                    &queue,
                    &thread_metrics,
                    &thread_pending,
                )
            })
            .expect("spawning the model thread");
        Self {
            jobs,
            metrics,
            pending,
        }
    }

    /// Queues `instances` of an admitted request (counted in `Pending` until the model
    /// thread takes it); the receiver yields their probabilities in order.
    pub fn submit(&self, instances: Vec<Instance>) -> oneshot::Receiver<Answer> {
        let (reply, answer) = oneshot::channel();
        self.metrics.queue_depth.inc_by(instances.len() as i64);
        let job = Job { instances, reply };
        if let Err(refused) = self.jobs.send(job) {
            let job = refused.0;
            self.metrics.queue_depth.dec_by(job.instances.len() as i64);
            self.pending.add(-1);
            let _ = job.reply.send(Err("the model thread has stopped".into()));
        }
        answer
    }
}

fn run(
    classifier: &Classifier,
    policy: BatchPolicy,
    queue: &Receiver<Job>,
    metrics: &Metrics,
    pending: &Pending,
) {
    let mut previous_jobs = 1;
    while let Ok(first) = queue.recv() {
        pending.add(-1);
        let jobs = gather(first, policy, queue, pending, previous_jobs);
        previous_jobs = jobs.len();
        let taken: usize = jobs.iter().map(|j| j.instances.len()).sum();
        metrics.queue_depth.dec_by(taken as i64);
        // A request that timed out has dropped its receiver: skip its inputs.
        let live: Vec<Job> = jobs.into_iter().filter(|j| !j.reply.is_closed()).collect();
        answer(classifier, live, policy.max_batch, metrics);
    }
}

/// Takes queued jobs into the batch; when the queue is empty, waits (until `max_delay`
/// after the first) only while more requests are expected: admitted ones not yet taken,
/// or as many as the previous batch answered (closed-loop clients come back together, a
/// moment after their answers; without this a batch of 8 decays into batches of 1 and 7).
fn gather(
    first: Job,
    policy: BatchPolicy,
    queue: &Receiver<Job>,
    pending: &Pending,
    previous_jobs: usize,
) -> Vec<Job> {
    let deadline = Instant::now() + policy.max_delay;
    let mut size = first.instances.len();
    let mut jobs = vec![first];
    while size < policy.max_batch {
        let until_deadline = deadline.saturating_duration_since(Instant::now());
        // Admitted requests are certain to come; returning clients only probably, so
        // they get one short gap each: the model idles while the batch waits.
        let wait = if pending.get() > 0 {
            until_deadline
        } else if previous_jobs > jobs.len() {
            until_deadline.min(RETURN_GAP)
        } else {
            Duration::ZERO
        };
        let next = match queue.try_recv() {
            Ok(job) => Some(job),
            Err(TryRecvError::Disconnected) => None,
            Err(TryRecvError::Empty) if wait.is_zero() => None,
            Err(TryRecvError::Empty) => queue.recv_timeout(wait).ok(),
        };
        let Some(job) = next else { break };
        pending.add(-1);
        size += job.instances.len();
        jobs.push(job);
    }
    jobs
}

/// Runs the inputs of `jobs` in forward passes of at most `max_batch` and replies to each
/// job with its own rows.
fn answer(classifier: &Classifier, jobs: Vec<Job>, max_batch: usize, metrics: &Metrics) {
    let inputs: Vec<&Instance> = jobs.iter().flat_map(|j| &j.instances).collect();
    let mut rows: Answer = Ok(Vec::with_capacity(inputs.len()));
    for chunk in inputs.chunks(max_batch.max(1)) {
        let started = Instant::now();
        // A panic in a kernel answers this batch with an error instead of killing the
        // thread every later request needs.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| classifier.classify(chunk)))
                .unwrap_or_else(|_| Err(crate::Error::Config("the forward pass panicked".into())));
        match outcome {
            Ok(probabilities) => {
                if let Ok(rows) = rows.as_mut() {
                    rows.extend(probabilities);
                }
            }
            Err(e) => rows = Err(e.to_string()),
        }
        metrics.batch_size.observe(chunk.len() as f64);
        metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        if rows.is_err() {
            break;
        }
    }
    let mut offset = 0;
    for job in jobs {
        let n = job.instances.len();
        let reply = match &rows {
            Ok(rows) => Ok(rows[offset..offset + n].to_vec()),
            Err(e) => Err(e.clone()),
        };
        offset += n;
        let _ = job.reply.send(reply);
    }
}

/// Requests admitted and not yet taken into a batch: while there are any, the batch
/// being gathered waits for them (they are being read or tokenised).
#[derive(Default)]
pub struct Pending(AtomicI64);

impl Pending {
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> usize {
        self.0.load(Ordering::Relaxed).max(0) as usize
    }
}
