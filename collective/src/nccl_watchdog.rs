//! NCCL failure semantics: a communicator that a watchdog thread can abort.
//!
//! NCCL collectives are enqueued on a CUDA stream and return at once; a dead or stalled
//! peer shows up only as a kernel that never finishes, and `cuStreamSynchronize` would
//! then wait forever. Every collective therefore records a CUDA event behind it and is
//! registered with the watchdog, which polls the oldest one: if it is not done within the
//! timeout, or NCCL reports an asynchronous error, the watchdog calls `ncclCommAbort`
//! (which makes the stuck kernels exit) and remembers which operation failed. The next
//! call on the communicator, and any host-side wait, returns that error.
//!
//! The communicator is created non-blocking (`ncclConfig_t.blocking = 0`), so init and
//! every call return promptly and are completed by polling `ncclCommGetAsyncError`
//! against a deadline instead of blocking inside NCCL.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::result::{self, NcclError, NcclStatus};
use cudarc::nccl::sys;

use crate::error::{Error, Result};

/// How often the watchdog looks at the oldest collective in flight.
const POLL: Duration = Duration::from_millis(5);

/// An NCCL communicator handle owned here (not by cudarc's `Comm`), so one thread can
/// abort it while another waits on its work.
pub(crate) struct RawComm {
    ptr: sys::ncclComm_t,
    aborted: AtomicBool,
}

// SAFETY: NCCL allows ncclCommAbort and ncclCommGetAsyncError from any thread; collective
// calls are serialised by the owning communicator's `&mut self`.
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

fn nccl_version_code(major: u32, minor: u32, patch: u32) -> u32 {
    major * 10_000 + minor * 100 + patch
}

/// NCCL_CONFIG_INITIALIZER with `blocking = 0`: every field NCCL should choose itself is
/// "undefined" (INT_MIN / NULL). `version` describes this struct's layout (cudarc's
/// bindings for NCCL 2.30), which lets an older library read only the fields it knows.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: nccl_version_code(2, 30, 0),
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

pub(crate) fn describe(code: sys::ncclResult_t) -> String {
    let hint = match code {
        sys::ncclResult_t::ncclUnhandledCudaError => "a CUDA call failed",
        sys::ncclResult_t::ncclSystemError => "a system call failed (network, shared memory)",
        sys::ncclResult_t::ncclInternalError => "NCCL internal error",
        sys::ncclResult_t::ncclInvalidArgument => "an invalid argument",
        sys::ncclResult_t::ncclInvalidUsage => "invalid usage (e.g. ranks disagree)",
        sys::ncclResult_t::ncclRemoteError => "a remote rank failed or disconnected",
        _ => "see NCCL_DEBUG=WARN output",
    };
    format!("{code:?}: {hint}")
}

impl RawComm {
    /// ncclCommInitRankConfig, non-blocking, completed by polling until `deadline`; on
    /// timeout the half-built communicator is aborted.
    pub(crate) fn init(
        rank: usize,
        world: usize,
        id: sys::ncclUniqueId,
        deadline: Instant,
        total: Duration,
    ) -> Result<RawComm> {
        let mut ptr: sys::ncclComm_t = std::ptr::null_mut();
        let mut config = nonblocking_config();
        // SAFETY: valid out-pointer and config; world and rank were validated.
        let started = unsafe {
            result::comm_init_rank_config(&mut ptr, world as i32, id, rank as i32, &mut config)
        };
        if let Err(NcclError(code)) = started {
            return Err(Error::Cuda(format!(
                "NCCL ncclCommInitRankConfig failed: {}",
                describe(code)
            )));
        }
        let comm = RawComm {
            ptr,
            aborted: AtomicBool::new(false),
        };
        comm.settle("ncclCommInitRankConfig (communicator set-up)", deadline)
            .map_err(|e| match e {
                Error::NcclAborted { reason, .. } if reason.starts_with("did not complete") => {
                    Error::RendezvousTimeout {
                        what: format!(
                            "NCCL communicator set-up of rank {rank} (every rank of the job must reach it)"
                        ),
                        secs: total.as_secs_f64(),
                    }
                }
                e => e,
            })?;
        Ok(comm)
    }

    pub(crate) fn ptr(&self) -> sys::ncclComm_t {
        self.ptr
    }

    fn async_error(&self) -> sys::ncclResult_t {
        let mut code = sys::ncclResult_t::ncclSuccess;
        // SAFETY: a live communicator and a valid out-pointer.
        unsafe { sys::ncclCommGetAsyncError(self.ptr, &mut code) };
        code
    }

    /// Waits until a non-blocking call has been carried out (its work enqueued, or the
    /// communicator built); aborts and fails after `deadline`.
    pub(crate) fn settle(&self, op: &str, deadline: Instant) -> Result<()> {
        loop {
            match self.async_error() {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {}
                code => {
                    self.abort();
                    return Err(Error::NcclAborted {
                        op: op.to_string(),
                        reason: describe(code),
                    });
                }
            }
            if Instant::now() >= deadline {
                self.abort();
                return Err(Error::NcclAborted {
                    op: op.to_string(),
                    reason: "did not complete before the deadline".into(),
                });
            }
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Checks the return code of a non-blocking collective call and completes it.
    pub(crate) fn issued(
        &self,
        op: &str,
        r: Result<NcclStatus, NcclError>,
        deadline: Instant,
    ) -> Result<()> {
        match r {
            Ok(NcclStatus::InProgress) => self.settle(op, deadline),
            Ok(_) => Ok(()),
            Err(NcclError(code)) => {
                self.abort();
                Err(Error::NcclAborted {
                    op: op.to_string(),
                    reason: describe(code),
                })
            }
        }
    }

    pub(crate) fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: a live communicator, aborted exactly once.
            let _ = unsafe { result::comm_abort(self.ptr) };
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        // Abort rather than finalize: finalize waits for peers, which may be gone.
        self.abort();
    }
}

struct InFlight {
    op: String,
    done: CudaEvent,
    started: Instant,
}

struct Shared {
    comm: Arc<RawComm>,
    queue: Mutex<VecDeque<InFlight>>,
    wake: Condvar,
    /// The first failure: (operation, reason). Once set the communicator is aborted.
    failure: Mutex<Option<(String, String)>>,
    stop: AtomicBool,
    timeout: Duration,
}

impl Shared {
    fn fail(&self, op: &str, reason: String) {
        let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            tracing::error!(op, %reason, "NCCL collective failed; aborting the communicator");
            *f = Some((op.to_string(), reason));
        }
        drop(f);
        self.comm.abort();
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    fn error(&self) -> Option<Error> {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(op, reason)| Error::NcclAborted {
                op: op.clone(),
                reason: reason.clone(),
            })
    }

    fn run(&self, ctx: &CudaContext) {
        if let Err(e) = ctx.bind_to_thread() {
            self.fail(
                "the NCCL watchdog",
                format!("cannot bind the CUDA context: {e:?}"),
            );
            return;
        }
        loop {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            while q.is_empty() && !self.stop.load(Ordering::SeqCst) {
                q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let front = q.front().expect("not empty");
            let verdict = match front.done.try_is_complete() {
                Ok(true) => {
                    q.pop_front();
                    continue;
                }
                Err(e) => Some(format!("CUDA reported {e:?} while it ran")),
                Ok(false) => match self.comm.async_error() {
                    sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => {
                        (front.started.elapsed() > self.timeout).then(|| {
                            format!(
                                "did not complete within {:.1} s: a rank died, stalled, or called a different collective (raise RINGMASTER_TIMEOUT_S if it is only slow)",
                                self.timeout.as_secs_f64()
                            )
                        })
                    }
                    code => Some(describe(code)),
                },
            };
            if let Some(reason) = verdict {
                let op = front.op.clone();
                drop(q);
                self.fail(&op, reason);
                return;
            }
            drop(q);
            std::thread::sleep(POLL);
        }
    }
}

/// Watches the collectives of one communicator; aborts it on the first one that fails or
/// overruns the timeout.
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    pub(crate) fn start(comm: Arc<RawComm>, ctx: Arc<CudaContext>, timeout: Duration) -> Watchdog {
        let shared = Arc::new(Shared {
            comm,
            queue: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
            failure: Mutex::new(None),
            stop: AtomicBool::new(false),
            timeout,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nccl-watchdog".into())
            .spawn(move || s.run(&ctx))
            .ok();
        Watchdog { shared, thread }
    }

    /// The error of an earlier collective, if one failed (the communicator is then aborted).
    pub(crate) fn check(&self) -> Result<()> {
        match self.shared.error() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    pub(crate) fn comm(&self) -> &RawComm {
        &self.shared.comm
    }

    /// Registers the collective just enqueued on `stream` as `op`.
    pub(crate) fn watch(&self, op: String, stream: &CudaStream) -> Result<()> {
        let done = stream
            .record_event(None)
            .map_err(|e| Error::Cuda(format!("recording an event after {op}: {e:?}")))?;
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(InFlight {
                op,
                done,
                started: Instant::now(),
            });
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Waits on the host for `done` (an event recorded behind watched work); returns the
    /// watchdog's error instead if a collective failed or overran.
    pub(crate) fn wait(&self, done: &CudaEvent) -> Result<()> {
        loop {
            self.check()?;
            match done.try_is_complete() {
                Ok(true) => return self.check(),
                Ok(false) => std::thread::yield_now(),
                Err(e) => {
                    return self
                        .check()
                        .and(Err(Error::Cuda(format!("waiting for a collective: {e:?}"))));
                }
            }
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
