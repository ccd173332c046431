//! NCCL backend (feature `nccl`): one process per GPU; rank 0 creates the NCCL unique id
//! and ships it to the others through the rendezvous store.
//!
//! Device buffers are reduced in place on the communicator's stream
//! ([`NcclCommunicator::all_reduce_device`]); the [`Communicator`] methods take host
//! buffers and stage them through a reusable device buffer, which keeps the trait usable
//! (tests, small tensors) but costs two PCIe copies.

use std::ffi::c_char;
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{
    CudaContext, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp as NcclOp};
use half::bf16;

use crate::bench::{BenchArgs, BenchRow, max_over_ranks};
use crate::communicator::{Communicator, ReduceOp};
use crate::error::{Error, Result};
use crate::rendezvous::{RendezvousConfig, connect_store, wait_key};
use crate::store::StoreServer;

const ID_LEN: usize = 128;

fn cuda(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{what}: {e:?}"))
}

fn nccl(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
    // NcclError's own Debug prints only "NcclError"; the code inside says what happened.
    Error::Cuda(format!("NCCL {what} failed: {:?}", e.0))
}

fn op(o: ReduceOp) -> NcclOp {
    match o {
        ReduceOp::Sum => NcclOp::Sum,
        ReduceOp::Avg => NcclOp::Avg,
    }
}

pub struct NcclCommunicator {
    comm: Comm,
    stream: Arc<CudaStream>,
    staging: Staging,
    _store: Option<StoreServer>,
}

// SAFETY: `Comm` holds a raw ncclComm_t and so is not Send. NCCL allows a communicator to
// be used from any thread as long as calls are not concurrent; `&mut self` on every
// collective serialises them, and each call binds the CUDA context to the calling thread.
unsafe impl Send for NcclCommunicator {}

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
    let (id, store) = if cfg.world_size == 1 {
        (Id::new().map_err(|e| nccl("ncclGetUniqueId", e))?, None)
    } else {
        let (mut client, server) = connect_store(cfg)?;
        let deadline = Instant::now() + cfg.rendezvous_timeout;
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
    // Blocks until every rank has joined (NCCL's own rendezvous over the id).
    let comm = Comm::from_rank(stream.clone(), cfg.rank, cfg.world_size, id)
        .map_err(|e| nccl("ncclCommInitRank", e))?;
    Ok(NcclCommunicator {
        comm,
        stream,
        staging: Staging::default(),
        _store: store,
    })
}

/// A device buffer of at least `len` elements, reused across calls.
fn staging<'a, T: DeviceRepr + ValidAsZeroBits>(
    slot: &'a mut Option<CudaSlice<T>>,
    stream: &Arc<CudaStream>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(
            stream
                .alloc_zeros::<T>(len.max(1))
                .map_err(|e| cuda("allocating a staging buffer", e))?,
        );
    }
    Ok(slot.as_mut().expect("just allocated"))
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

    /// All-reduce of a device buffer in place, enqueued on [`Self::stream`]; synchronise
    /// the stream (or order later work on it) before reading the result.
    pub fn all_reduce_device<T: NcclType, B: DevicePtrMut<T>>(
        &mut self,
        buf: &mut B,
        o: ReduceOp,
    ) -> Result<()> {
        self.bind()?;
        self.comm
            .all_reduce_in_place(buf, &op(o))
            .map_err(|e| nccl("all_reduce", e))?;
        Ok(())
    }

    /// Broadcast of a device buffer in place from `root`, enqueued on [`Self::stream`].
    pub fn broadcast_device<T: NcclType, B: DevicePtrMut<T>>(
        &mut self,
        buf: &mut B,
        root: usize,
    ) -> Result<()> {
        self.bind()?;
        self.comm
            .broadcast_in_place(buf, root as i32)
            .map_err(|e| nccl("broadcast", e))?;
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| cuda("synchronising the stream", e))
    }

    fn host_all_reduce<T: Staged>(&mut self, buf: &mut [T], o: ReduceOp) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let stream = self.stream.clone();
        let dev = staging(T::slot(&mut self.staging), &stream, buf.len())?;
        let mut view = dev.slice_mut(0..buf.len());
        stream
            .memcpy_htod(buf, &mut view)
            .map_err(|e| cuda("copying to the GPU", e))?;
        self.comm
            .all_reduce_in_place(&mut view, &op(o))
            .map_err(|e| nccl("all_reduce", e))?;
        stream
            .memcpy_dtoh(&view, buf)
            .map_err(|e| cuda("copying from the GPU", e))?;
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
        self.comm.rank()
    }

    fn world_size(&self) -> usize {
        self.comm.world_size()
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
        if root >= self.world_size() {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} is not a rank"
            )));
        }
        if buf.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let stream = self.stream.clone();
        let dev = staging(&mut self.staging.f32, &stream, buf.len())?;
        let mut view = dev.slice_mut(0..buf.len());
        stream
            .memcpy_htod(buf, &mut view)
            .map_err(|e| cuda("copying to the GPU", e))?;
        self.comm
            .broadcast_in_place(&mut view, root as i32)
            .map_err(|e| nccl("broadcast", e))?;
        stream
            .memcpy_dtoh(&view, buf)
            .map_err(|e| cuda("copying from the GPU", e))?;
        self.sync()
    }

    fn all_gather_f32(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        let n = self.world_size();
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
        self.bind()?;
        let stream = self.stream.clone();
        let send = stream
            .clone_htod(input)
            .map_err(|e| cuda("copying to the GPU", e))?;
        let mut recv = stream
            .alloc_zeros::<f32>(output.len())
            .map_err(|e| cuda("allocating the gather buffer", e))?;
        self.comm
            .all_gather(&send, &mut recv)
            .map_err(|e| nccl("all_gather", e))?;
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
