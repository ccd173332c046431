//! NCCL backend (feature `nccl`): one process per GPU; rank 0 creates the NCCL unique id
//! and ships it to the others through the rendezvous store.
//!
//! Device buffers are reduced in place on the communicator's stream
//! ([`NcclCommunicator::all_reduce_device`]); the [`Communicator`] methods take host
//! buffers and stage them through a reusable device buffer, which keeps the trait usable
//! (tests, small tensors) but costs two PCIe copies.
//!
//! Every collective is watched (`nccl_watchdog`): one that fails or overruns the timeout
//! (`RINGMASTER_TIMEOUT_S`) aborts the communicator and returns an error naming it.

use std::ffi::{c_char, c_void};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use cudarc::nccl::{Id, NcclType, result as nccl_call, sys};
use half::bf16;

use crate::bench::{BenchArgs, BenchRow, max_over_ranks};
use crate::communicator::{Communicator, ReduceOp};
use crate::error::{Error, Result};
use crate::nccl_watchdog::{RawComm, Watchdog, describe};
use crate::rendezvous::{RendezvousConfig, connect_store, wait_key};
use crate::store::StoreServer;

const ID_LEN: usize = 128;

fn cuda(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

fn nccl(what: &str, e: nccl_call::NcclError) -> Error {
    // NcclError's own Debug prints only "NcclError"; the code inside says what happened.
    Error::Cuda(format!("NCCL {what} failed: {}", describe(e.0)))
}

fn op(o: ReduceOp) -> sys::ncclRedOp_t {
    match o {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Avg => sys::ncclRedOp_t::ncclAvg,
    }
}

pub struct NcclCommunicator {
    rank: usize,
    world: usize,
    stream: Arc<CudaStream>,
    staging: Staging,
    timeout: Duration,
    /// Numbers collectives in errors ("all_reduce #12 of 1048576 f32").
    seq: u64,
    // Dropped before the communicator it watches (fields drop in order).
    watchdog: Watchdog,
    _store: Option<StoreServer>,
}

/// Joins the job described by `cfg` on GPU `device_ordinal` (usually LOCAL_RANK), using
/// that device's default stream.
pub fn connect_nccl(cfg: &RendezvousConfig, device_ordinal: usize) -> Result<NcclCommunicator> {
    let ctx = CudaContext::new(device_ordinal)
        .map_err(|e| cuda(&format!("opening GPU {device_ordinal}"), e))?;
    connect_nccl_on_stream(cfg, ctx.default_stream())
}

/// Like [`connect_nccl`], on a given stream: pass candle's stream so collectives order
/// correctly with the kernels that produce the gradients.
pub fn connect_nccl_on_stream(
    cfg: &RendezvousConfig,
    stream: Arc<CudaStream>,
) -> Result<NcclCommunicator> {
    cfg.validate()?;
    let deadline = Instant::now() + cfg.rendezvous_timeout;
    let (id, store) = if cfg.world_size == 1 {
        (Id::new().map_err(|e| nccl("ncclGetUniqueId", e))?, None)
    } else {
        let (mut client, server) = connect_store(cfg)?;
        client.set(
            &format!("nccl/world/{}", cfg.rank),
            cfg.world_size.to_string().as_bytes(),
        )?;
        if cfg.rank == 0 {
            let id = Id::new().map_err(|e| nccl("ncclGetUniqueId", e))?;
            let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
            client.set("nccl/id", &bytes)?;
        }
        for r in 0..cfg.world_size {
            let w = wait_key(
                &mut client,
                &format!("nccl/world/{r}"),
                deadline,
                cfg.rendezvous_timeout,
            )?;
            if w != cfg.world_size.to_string().as_bytes() {
                return Err(Error::Mismatch {
                    rank: cfg.rank,
                    peer: format!("rank {r}"),
                    detail: format!(
                        "WORLD_SIZE: rank {} has {}, rank {r} has {}",
                        cfg.rank,
                        cfg.world_size,
                        String::from_utf8_lossy(&w)
                    ),
                });
            }
        }
        let raw = wait_key(&mut client, "nccl/id", deadline, cfg.rendezvous_timeout)?;
        let internal: [c_char; ID_LEN] =
            std::array::from_fn(|i| raw.get(i).copied().unwrap_or(0) as c_char);
        if raw.len() != ID_LEN {
            return Err(Error::Protocol {
                peer: "rank 0".into(),
                reason: format!("NCCL id of {} bytes, expected {ID_LEN}", raw.len()),
            });
        }
        (Id::uninit(internal), server)
    };
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| cuda("binding the CUDA context", e))?;
    // NCCL's own rendezvous over the id, bounded by the rendezvous deadline.
    let comm = RawComm::init(
        cfg.rank,
        cfg.world_size,
        sys::ncclUniqueId {
            internal: *id.internal(),
        },
        deadline,
        cfg.rendezvous_timeout,
    )?;
    let watchdog = Watchdog::start(Arc::new(comm), stream.context().clone(), cfg.ring.timeout);
    Ok(NcclCommunicator {
        rank: cfg.rank,
        world: cfg.world_size,
        stream,
        staging: Staging::default(),
        timeout: cfg.ring.timeout,
        seq: 0,
        watchdog,
        _store: store,
    })
}

/// A device buffer of at least `len` elements, reused across calls: taken out of its slot
/// for the duration of a call, put back afterwards.
fn take_staging<T: DeviceRepr + ValidAsZeroBits>(
    slot: &mut Option<CudaSlice<T>>,
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<CudaSlice<T>> {
    match slot.take() {
        Some(s) if s.len() >= len => Ok(s),
        _ => stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(|e| cuda("allocating a staging buffer", e)),
    }
}

impl NcclCommunicator {
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    fn bind(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| cuda("binding the CUDA context", e))
    }

    /// Starts collective number `seq`: refuses after an earlier failure, binds the context,
    /// and returns the name errors will use.
    fn begin(&mut self, what: &str, count: usize, dtype: sys::ncclDataType_t) -> Result<String> {
        self.watchdog.check()?;
        self.bind()?;
        self.seq += 1;
        Ok(format!(
            "{what} #{} of {count} {dtype:?} elements",
            self.seq
        ))
    }

    /// Issues one NCCL call (which may complete asynchronously on a non-blocking
    /// communicator) and puts the work it enqueued under the watchdog.
    fn issue(
        &self,
        name: String,
        call: impl FnOnce(
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> Result<nccl_call::NcclStatus, nccl_call::NcclError>,
    ) -> Result<()> {
        let comm = self.watchdog.comm();
        let r = call(comm.ptr(), self.stream.cu_stream() as sys::cudaStream_t);
        comm.issued(&name, r, Instant::now() + self.timeout)?;
        self.watchdog.watch(name, &self.stream)
    }

    /// All-reduce of a device buffer in place, enqueued on [`Self::stream`]; synchronise
    /// the stream (or order later work on it) before reading the result. A failure or
    /// timeout of this collective is returned by the next call.
    pub fn all_reduce_device<T: NcclType, B: DevicePtrMut<T>>(
        &mut self,
        buf: &mut B,
        o: ReduceOp,
    ) -> Result<()> {
        let count = buf.len();
        let name = self.begin("all_reduce", count, T::as_nccl_type())?;
        let stream = self.stream.clone();
        let (ptr, _written) = buf.device_ptr_mut(&stream);
        self.issue(name, |comm, s| unsafe {
            // SAFETY: a live device buffer of `count` elements, in place.
            nccl_call::all_reduce(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                T::as_nccl_type(),
                op(o),
                comm,
                s,
            )
        })
    }

    /// Broadcast of a device buffer in place from `root`, enqueued on [`Self::stream`].
    pub fn broadcast_device<T: NcclType, B: DevicePtrMut<T>>(
        &mut self,
        buf: &mut B,
        root: usize,
    ) -> Result<()> {
        if root >= self.world {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} is not a rank (world size {})",
                self.world
            )));
        }
        let count = buf.len();
        let name = self.begin(&format!("broadcast from {root}"), count, T::as_nccl_type())?;
        let stream = self.stream.clone();
        let (ptr, _written) = buf.device_ptr_mut(&stream);
        self.issue(name, |comm, s| unsafe {
            // SAFETY: a live device buffer of `count` elements, in place.
            nccl_call::broadcast(
                ptr as *const c_void,
                ptr as *mut c_void,
                count,
                T::as_nccl_type(),
                root as i32,
                comm,
                s,
            )
        })
    }

    /// Waits on the host for everything enqueued so far, under the watchdog.
    fn sync(&self) -> Result<()> {
        let done = self
            .stream
            .record_event(None)
            .map_err(|e| cuda("recording an event", e))?;
        self.watchdog.wait(&done)
    }

    fn host_all_reduce<T: Staged>(&mut self, buf: &mut [T], o: ReduceOp) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let stream = self.stream.clone();
        let mut dev = take_staging(T::slot(&mut self.staging), &stream, buf.len())?;
        let mut view = dev.slice_mut(0..buf.len());
        stream
            .memcpy_htod(buf, &mut view)
            .map_err(|e| cuda("copying to the GPU", e))?;
        self.all_reduce_device(&mut view, o)?;
        stream
            .memcpy_dtoh(&view, buf)
            .map_err(|e| cuda("copying from the GPU", e))?;
        *T::slot(&mut self.staging) = Some(dev);
        self.sync()
    }

    /// Times device-buffer all-reduce (f32 sum) with the definitions of [`crate::bench`];
    /// every rank returns the same rows.
    pub fn bench_device(&mut self, args: &BenchArgs) -> Result<Vec<BenchRow>> {
        let n = self.world_size();
        let expected = (n * (n + 1) / 2) as f32;
        let mut rows = Vec::new();
        for bytes in args.sizes() {
            let len = bytes / 4;
            let fill = vec![(self.rank() + 1) as f32; len];
            self.bind()?;
            let stream = self.stream.clone();
            let mut dev = stream
                .clone_htod(&fill)
                .map_err(|e| cuda("copying to the GPU", e))?;
            let one_iter = |me: &mut Self, dev: &mut CudaSlice<f32>| -> Result<f64> {
                stream
                    .memcpy_htod(&fill, dev)
                    .map_err(|e| cuda("refilling", e))?;
                me.sync()?;
                me.barrier()?;
                let t0 = Instant::now();
                me.all_reduce_device(dev, ReduceOp::Sum)?;
                me.sync()?;
                Ok(t0.elapsed().as_secs_f64())
            };
            let mut warm: f64 = 0.0;
            for _ in 0..args.warmup {
                warm = warm.max(one_iter(self, &mut dev)?);
            }
            let est = max_over_ranks(self, &[warm as f32])?[0] as f64;
            let k = ((args.target_s / est.max(1e-9)) as usize)
                .clamp(args.min_iters, args.max_iters.max(args.min_iters));
            let mut times = Vec::with_capacity(k);
            for _ in 0..k {
                times.push(one_iter(self, &mut dev)? as f32);
            }
            let out = stream
                .clone_dtoh(&dev)
                .map_err(|e| cuda("copying from the GPU", e))?;
            let ok = out.iter().all(|&x| x == expected);
            let times = max_over_ranks(self, &times)?;
            let all_ok = max_over_ranks(self, &[if ok { 0.0 } else { 1.0 }])?[0] == 0.0;
            rows.push(BenchRow::new(
                n,
                bytes,
                times.iter().map(|&t| t as f64).collect(),
                all_ok,
                "nccl",
            ));
        }
        Ok(rows)
    }
}

/// Element types the host-buffer path stages through a per-type reusable device buffer.
#[derive(Default)]
struct Staging {
    f32: Option<CudaSlice<f32>>,
    bf16: Option<CudaSlice<bf16>>,
}

trait Staged: NcclType + DeviceRepr + ValidAsZeroBits + Copy {
    fn slot(s: &mut Staging) -> &mut Option<CudaSlice<Self>>;
}

impl Staged for f32 {
    fn slot(s: &mut Staging) -> &mut Option<CudaSlice<f32>> {
        &mut s.f32
    }
}

impl Staged for bf16 {
    fn slot(s: &mut Staging) -> &mut Option<CudaSlice<bf16>> {
        &mut s.bf16
    }
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_f32(&mut self, buf: &mut [f32], o: ReduceOp) -> Result<()> {
        self.host_all_reduce(buf, o)
    }

    fn all_reduce_bf16(&mut self, buf: &mut [bf16], o: ReduceOp) -> Result<()> {
        self.host_all_reduce(buf, o)
    }

    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if buf.is_empty() {
            return if root < self.world {
                Ok(())
            } else {
                Err(Error::InvalidArgument(format!(
                    "broadcast root {root} is not a rank"
                )))
            };
        }
        self.bind()?;
        let stream = self.stream.clone();
        let mut dev = take_staging(&mut self.staging.f32, &stream, buf.len())?;
        let mut view = dev.slice_mut(0..buf.len());
        stream
            .memcpy_htod(buf, &mut view)
            .map_err(|e| cuda("copying to the GPU", e))?;
        self.broadcast_device(&mut view, root)?;
        stream
            .memcpy_dtoh(&view, buf)
            .map_err(|e| cuda("copying from the GPU", e))?;
        self.staging.f32 = Some(dev);
        self.sync()
    }

    fn all_gather_f32(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let n = self.world;
        if output.len() != input.len() * n {
            return Err(Error::InvalidArgument(format!(
                "all_gather output has {} elements; it must be world_size ({n}) x input ({})",
                output.len(),
                input.len()
            )));
        }
        if input.is_empty() {
            return Ok(());
        }
        let count = input.len();
        let name = self.begin("all_gather", count, sys::ncclDataType_t::ncclFloat32)?;
        let stream = self.stream.clone();
        let send = stream
            .clone_htod(input)
            .map_err(|e| cuda("copying to the GPU", e))?;
        let mut recv = stream
            .alloc_zeros::<f32>(output.len())
            .map_err(|e| cuda("allocating the gather buffer", e))?;
        {
            let (src, _read) = send.device_ptr(&stream);
            let (dst, _written) = recv.device_ptr_mut(&stream);
            self.issue(name, |comm, s| unsafe {
                // SAFETY: live device buffers of `count` and `n * count` elements.
                nccl_call::all_gather(
                    src as *const c_void,
                    dst as *mut c_void,
                    count,
                    sys::ncclDataType_t::ncclFloat32,
                    comm,
                    s,
                )
            })?;
        }
        stream
            .memcpy_dtoh(&recv, output)
            .map_err(|e| cuda("copying from the GPU", e))?;
        self.sync()
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = [0.0f32];
        self.all_reduce_f32(&mut one, ReduceOp::Sum)
    }
}
