//! Data-parallel training over a [`Communicator`]: ranks check at start that they built
//! the same model, take rank 0's parameters and buffers, and average gradients every step
//! in fixed buckets (about 25 MB) so large models need few, large all-reduces.

use std::ops::Range;
use std::sync::mpsc;

use candle_core::Tensor;
use ringmaster_collective::{Communicator, ReduceOp};

use crate::error::{Error, Result};
use crate::grads::Grads;
use crate::host;
use crate::params::{ModelVars, NamedVar, Role};

#[derive(Debug, Clone)]
pub struct DdpConfig {
    /// Gradient bytes (as f32) per all-reduce; PyTorch DDP's default is 25 MiB.
    pub bucket_bytes: usize,
}

impl Default for DdpConfig {
    fn default() -> Self {
        DdpConfig {
            bucket_bytes: 25 << 20,
        }
    }
}

/// A run of consecutive trainable variables reduced with one all-reduce.
#[derive(Debug)]
struct Bucket {
    params: Range<usize>,
    /// Offset of each variable of `params` in `buf`.
    offsets: Vec<usize>,
    /// Flattened gradients; kept between steps so a step allocates nothing here.
    buf: Vec<f32>,
    len: usize,
}

pub struct Ddp {
    comm: Box<dyn Communicator>,
    params: Vec<NamedVar>,
    buckets: Vec<Bucket>,
    cfg: DdpConfig,
    /// Gradient bytes all-reduced and the seconds the all-reduces took, since last taken.
    traffic: Traffic,
}

#[derive(Debug, Default, Clone, Copy)]
struct Traffic {
    bytes: u64,
    seconds: f64,
}

impl Ddp {
    /// Checks that every rank has the same variables (names, shapes, dtypes, roles) and
    /// bucket layout, then overwrites every variable with rank 0's values.
    pub fn new(comm: Box<dyn Communicator>, vars: &ModelVars, cfg: DdpConfig) -> Result<Self> {
        let all = vars.all();
        let params: Vec<NamedVar> = all
            .iter()
            .filter(|v| v.role == Role::Trainable)
            .cloned()
            .collect();
        let buckets = plan_buckets(&params, cfg.bucket_bytes);
        let mut ddp = Ddp {
            comm,
            params,
            buckets,
            cfg,
            traffic: Traffic::default(),
        };
        let layout = ddp.describe(&all);
        agree(ddp.comm.as_mut(), &layout)?;
        ddp.exchange(&all, Exchange::BroadcastFromRoot)?;
        Ok(ddp)
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }

    /// The communicator, for collectives outside gradient averaging (a barrier before a
    /// checkpoint, metrics).
    pub fn communicator(&mut self) -> &mut dyn Communicator {
        self.comm.as_mut()
    }

    /// Bus bandwidth (nccl-tests definition: algorithm bandwidth x 2(n-1)/n, GB/s) of
    /// the gradient all-reduces since the last call; None before any.
    pub fn take_bus_bandwidth(&mut self) -> Option<f64> {
        let Traffic { bytes, seconds } = std::mem::take(&mut self.traffic);
        let n = self.comm.world_size() as f64;
        (bytes > 0 && seconds > 0.0).then(|| bytes as f64 / seconds * 2.0 * (n - 1.0) / n / 1e9)
    }

    /// Variable names per bucket, in reduction order.
    pub fn bucket_names(&self) -> Vec<Vec<&str>> {
        self.buckets
            .iter()
            .map(|b| {
                self.params[b.params.clone()]
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect()
            })
            .collect()
    }

    /// One line per variable and one for the buckets: what every rank must agree on.
    fn describe(&self, all: &[NamedVar]) -> String {
        let mut s: String = all
            .iter()
            .map(|v| {
                format!(
                    "variable {} {:?} {:?} {}\n",
                    v.name,
                    v.var.dims(),
                    v.var.dtype(),
                    v.role.as_str()
                )
            })
            .collect();
        let sizes: Vec<usize> = self.buckets.iter().map(|b| b.len).collect();
        s.push_str(&format!(
            "buckets of {} bytes: element counts {sizes:?}\n",
            self.cfg.bucket_bytes
        ));
        s
    }

    /// Averages the gradients across ranks in place. A variable without a gradient on
    /// this rank counts as zero. `loss_non_finite` rides along with the last bucket, so
    /// every rank learns whether any rank's loss was NaN/Inf and all of them skip or stop
    /// together (returned).
    ///
    /// Bucket k is reduced on a communication thread while this thread flattens the
    /// buckets after it; each bucket is written back as soon as its reduction returns,
    /// while later ones are still on the wire.
    pub fn reduce_grads(&mut self, grads: &mut Grads, loss_non_finite: bool) -> Result<bool> {
        let Ddp {
            comm,
            params,
            buckets,
            traffic,
            ..
        } = self;
        if comm.world_size() == 1 {
            // Nothing to average: only give absent gradients their zeros, as n ranks would.
            for (i, p) in params.iter().enumerate() {
                if grads.get(i).is_none() {
                    grads.set(i, p.var.zeros_like()?);
                }
            }
            return Ok(loss_non_finite);
        }
        let last = buckets.len() - 1;
        let flag = if loss_non_finite { 1.0 } else { 0.0 };
        let comm = comm.as_mut();
        let mut any_non_finite = false;
        std::thread::scope(|s| -> Result<()> {
            let (to_comm, inbox) = mpsc::channel::<(usize, Vec<f32>)>();
            let (outbox, from_comm) = mpsc::channel();
            s.spawn(move || {
                for (k, mut buf) in inbox {
                    let started = std::time::Instant::now();
                    let result = comm.all_reduce_f32(&mut buf, ReduceOp::Avg);
                    let seconds = started.elapsed().as_secs_f64();
                    let failed = result.is_err();
                    if outbox.send((k, buf, result, seconds)).is_err() || failed {
                        break;
                    }
                }
            });
            let mut sent = 0;
            let mut failure = None;
            for (k, bucket) in buckets.iter_mut().enumerate() {
                let mut buf = std::mem::take(&mut bucket.buf);
                buf.resize(bucket.len, 0.0);
                if let Err(e) = flatten(bucket, params, grads, &mut buf) {
                    failure = Some(e);
                    break;
                }
                if k == last {
                    buf[bucket.len - 1] = flag;
                }
                if to_comm.send((k, buf)).is_err() {
                    break; // the thread stopped on a failed all-reduce, received below
                }
                sent += 1;
            }
            drop(to_comm);
            for _ in 0..sent {
                let (k, buf, result, seconds) = from_comm
                    .recv()
                    .map_err(|_| Error::Config("DDP communication thread stopped".into()))?;
                result?;
                traffic.bytes += buf.len() as u64 * 4;
                traffic.seconds += seconds;
                unflatten(&buckets[k], params, grads, &buf)?;
                if k == last {
                    any_non_finite = buf[buckets[k].len - 1] != 0.0;
                }
                buckets[k].buf = buf;
            }
            failure.map_or(Ok(()), Err)
        })?;
        Ok(any_non_finite)
    }

    /// Averages buffers (BatchNorm running statistics) across ranks, before evaluation
    /// or a checkpoint.
    pub fn average_buffers(&mut self, vars: &ModelVars) -> Result<()> {
        self.exchange(&vars.with_role(Role::Buffer), Exchange::Average)
    }

    /// Copies rank 0's values of `vars` to every rank, or averages them, bucket by bucket.
    fn exchange(&mut self, vars: &[NamedVar], how: Exchange) -> Result<()> {
        let mut buf = Vec::new();
        let mut start = 0;
        while start < vars.len() {
            let mut end = start;
            let mut len = 0;
            while end < vars.len()
                && (end == start || (len + vars[end].var.elem_count()) * 4 <= self.cfg.bucket_bytes)
            {
                len += vars[end].var.elem_count();
                end += 1;
            }
            buf.resize(len, 0.0);
            let mut off = 0;
            for v in &vars[start..end] {
                let n = v.var.elem_count();
                host::copy_to(v.var.as_tensor(), &mut buf[off..off + n])?;
                off += n;
            }
            match how {
                Exchange::BroadcastFromRoot => self.comm.broadcast_f32(&mut buf, 0)?,
                Exchange::Average => self.comm.all_reduce_f32(&mut buf, ReduceOp::Avg)?,
            }
            let mut off = 0;
            for v in &vars[start..end] {
                let n = v.var.elem_count();
                if let Some(fresh) = host::overwrite(v.var.as_tensor(), &buf[off..off + n])? {
                    v.var.set(&fresh)?;
                }
                off += n;
            }
            start = end;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Exchange {
    BroadcastFromRoot,
    Average,
}

/// Greedy buckets over the variables in name order; a variable larger than a bucket gets
/// one of its own. The last bucket has one extra element for the non-finite-loss flag.
fn plan_buckets(params: &[NamedVar], bucket_bytes: usize) -> Vec<Bucket> {
    let cap = (bucket_bytes / 4).max(1);
    let mut buckets = Vec::new();
    let mut start = 0;
    while start < params.len() {
        let mut offsets = Vec::new();
        let mut len = 0;
        let mut end = start;
        while end < params.len() && (end == start || len + params[end].var.elem_count() <= cap) {
            offsets.push(len);
            len += params[end].var.elem_count();
            end += 1;
        }
        buckets.push(Bucket {
            params: start..end,
            offsets,
            buf: Vec::new(),
            len,
        });
        start = end;
    }
    match buckets.last_mut() {
        Some(b) => b.len += 1,
        None => buckets.push(Bucket {
            params: 0..0,
            offsets: Vec::new(),
            buf: Vec::new(),
            len: 1,
        }),
    }
    buckets
}

fn flatten(bucket: &Bucket, params: &[NamedVar], grads: &Grads, buf: &mut [f32]) -> Result<()> {
    for (i, &off) in bucket.params.clone().zip(&bucket.offsets) {
        let n = params[i].var.elem_count();
        let dst = &mut buf[off..off + n];
        match grads.get(i) {
            Some(g) => host::copy_to(g, dst)?,
            None => dst.fill(0.0),
        }
    }
    Ok(())
}

fn unflatten(bucket: &Bucket, params: &[NamedVar], grads: &mut Grads, buf: &[f32]) -> Result<()> {
    for (i, &off) in bucket.params.clone().zip(&bucket.offsets) {
        let var = &params[i].var;
        let src = &buf[off..off + var.elem_count()];
        let fresh = match grads.get(i) {
            Some(g) => host::overwrite(g, src)?,
            None => {
                Some(Tensor::from_slice(src, var.shape(), var.device())?.to_dtype(var.dtype())?)
            }
        };
        if let Some(fresh) = fresh {
            grads.set(i, fresh);
        }
    }
    Ok(())
}

/// Fails on every rank, naming the first rank whose `layout` differs from rank 0's and
/// the first line (variable) where it differs. Cheap when all agree: one all-gather of
/// a length and a hash; the full texts travel only to explain a mismatch.
fn agree(comm: &mut dyn Communicator, layout: &str) -> Result<()> {
    let n = comm.world_size();
    let summary = {
        let (len, hash) = (layout.len() as u64, fnv1a(layout.as_bytes()));
        let words = [len, len >> 16, hash, hash >> 16, hash >> 32, hash >> 48];
        words.map(|w| (w & 0xffff) as f32)
    };
    let mut all = vec![0.0; n * summary.len()];
    comm.all_gather_f32(&summary, &mut all)?;
    if all
        .chunks(summary.len())
        .all(|c| c == &all[..summary.len()])
    {
        return Ok(());
    }
    let lens: Vec<usize> = all
        .chunks(summary.len())
        .map(|c| c[0] as usize | (c[1] as usize) << 16)
        .collect();
    let width = lens.iter().copied().max().unwrap_or(0);
    let mut mine: Vec<f32> = layout.bytes().map(f32::from).collect();
    mine.resize(width, 0.0);
    let mut texts = vec![0.0; n * width];
    comm.all_gather_f32(&mine, &mut texts)?;
    let texts: Vec<String> = texts
        .chunks(width.max(1))
        .zip(&lens)
        .map(|(c, &len)| c[..len].iter().map(|&b| b as u8 as char).collect())
        .collect();
    let (rank, text) = texts
        .iter()
        .enumerate()
        .skip(1)
        .find(|(_, t)| *t != &texts[0])
        .ok_or_else(|| Error::Config("layout hashes differ but texts agree".into()))?;
    let mut theirs = text.lines();
    for ours in texts[0].lines() {
        match theirs.next() {
            Some(t) if t == ours => continue,
            t => {
                return Err(Error::RankMismatch {
                    rank,
                    detail: format!(
                        "rank 0 has `{ours}`, rank {rank} has `{}`; every rank must build the same model with the same frozen patterns and bucket size",
                        t.unwrap_or("nothing more")
                    ),
                });
            }
        }
    }
    Err(Error::RankMismatch {
        rank,
        detail: format!(
            "rank {rank} has `{}` after everything rank 0 has",
            theirs.next().unwrap_or_default()
        ),
    })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}
