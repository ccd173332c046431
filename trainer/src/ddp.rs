//! Data-parallel training over a [`Communicator`]: ranks check at start that they built
//! the same model, take rank 0's parameters and buffers, and average gradients every step
//! in fixed buckets (about 25 MB) so large models need few, large all-reduces.
//!
//! As in PyTorch's reducer, buckets are all-reduced while backward still runs: each
//! bucket goes to the communication thread as soon as the last of its gradients is
//! complete. Buckets cover the variables in reverse name order, which is close to the
//! order backward completes them (the classifier first, the embeddings last), and are
//! reduced in bucket order on every rank.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::mpsc;

use candle_core::{Tensor, TensorId};
use ringmaster_collective::{Communicator, ReduceOp};

use crate::error::{Error, Result};
use crate::grads::Grads;
use crate::host;
use crate::params::{ModelVars, NamedVar, Role};

#[derive(Debug, Clone)]
pub struct DdpConfig {
    /// Gradient bytes (as f32) per all-reduce; PyTorch DDP's default is 25 MiB.
    pub bucket_bytes: usize,
    /// All-reduce buckets while backward runs (false: after it, for comparison).
    pub overlap: bool,
}

impl Default for DdpConfig {
    fn default() -> Self {
        DdpConfig {
            bucket_bytes: 25 << 20,
            overlap: true,
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
    /// Index in `params` of each trainable variable, for backward's readiness hook.
    index: HashMap<TensorId, usize>,
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
        let index = params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.var.as_tensor().id(), i))
            .collect();
        let mut ddp = Ddp {
            comm,
            params,
            index,
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

    /// Whether [`Self::backward_and_reduce`] all-reduces while backward runs (the same on
    /// every rank).
    pub fn set_overlap(&mut self, overlap: bool) {
        self.cfg.overlap = overlap;
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
    pub fn reduce_grads(&mut self, grads: &mut Grads, loss_non_finite: bool) -> Result<bool> {
        let buckets = self.buckets.len();
        let (reduced, any_non_finite) = self.pipelined(loss_non_finite, |send| {
            for k in 0..buckets {
                send.bucket(k, grads)?;
            }
            Ok(grads.clone())
        })?;
        *grads = reduced;
        Ok(any_non_finite)
    }

    /// Back-propagates `loss` and averages the gradients across ranks, all-reducing each
    /// bucket while backward computes the rest. `earlier` holds gradients of earlier
    /// micro-batches of the step (already scaled), added before reducing; `scale`
    /// multiplies this micro-batch's gradients (1 / micro-batches). Otherwise as
    /// [`Self::reduce_grads`].
    pub fn backward_and_reduce(
        &mut self,
        loss: &Tensor,
        earlier: Option<Grads>,
        scale: f64,
        loss_non_finite: bool,
    ) -> Result<(Grads, bool)> {
        if !self.cfg.overlap {
            let mut grads = Grads::backward(&self.params, loss, scale, earlier)?;
            let any_non_finite = self.reduce_grads(&mut grads, loss_non_finite)?;
            return Ok((grads, any_non_finite));
        }
        let count = self.params.len();
        let ranges: Vec<Range<usize>> = self.buckets.iter().map(|b| b.params.clone()).collect();
        let index = std::mem::take(&mut self.index);
        let result = self.pipelined(loss_non_finite, |send| {
            let mut grads = earlier.unwrap_or_else(|| Grads::empty(count));
            let mut ready = vec![false; count];
            let mut next = 0;
            loss.backward_with_hook(&mut |var, grad| {
                let Some(&i) = index.get(&var.id()) else {
                    return Ok(());
                };
                let grad = if scale == 1.0 {
                    grad.clone()
                } else {
                    (grad * scale)?
                };
                let sum = match grads.get(i) {
                    Some(before) => (before + grad)?,
                    None => grad,
                };
                grads.set(i, sum);
                ready[i] = true;
                while next < ranges.len() && ranges[next].clone().all(|j| ready[j]) {
                    send.bucket(next, &grads)
                        .map_err(candle_core::Error::wrap)?;
                    next += 1;
                }
                Ok(())
            })?;
            // Variables the loss did not reach count as zero: send what is left.
            for k in next..ranges.len() {
                send.bucket(k, &grads)?;
            }
            // Before the averages are written back in place.
            grads.unshare()?;
            Ok(grads)
        });
        self.index = index;
        result
    }

    /// Runs `produce` on this thread while a communication thread all-reduces the
    /// buckets it hands over (in bucket order, each flattened from the gradients as they
    /// are then), and writes the averages back into the gradients `produce` returns as
    /// each reduction returns.
    fn pipelined(
        &mut self,
        loss_non_finite: bool,
        produce: impl FnOnce(&mut Sender) -> Result<Grads>,
    ) -> Result<(Grads, bool)> {
        let Ddp {
            comm,
            params,
            buckets,
            traffic,
            ..
        } = self;
        if comm.world_size() == 1 {
            // Nothing to average: only give absent gradients their zeros, as n ranks would.
            let mut grads = produce(&mut Sender::local())?;
            for (i, p) in params.iter().enumerate() {
                if grads.get(i).is_none() {
                    grads.set(i, p.var.zeros_like()?);
                }
            }
            return Ok((grads, loss_non_finite));
        }
        let last = buckets.len() - 1;
        let flag = if loss_non_finite { 1.0 } else { 0.0 };
        let comm = comm.as_mut();
        std::thread::scope(|s| -> Result<(Grads, bool)> {
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
            let mut sender = Sender {
                buckets: &mut buckets[..],
                params,
                to_comm: Some(to_comm),
                sent: 0,
                flag,
            };
            let produced = produce(&mut sender);
            let sent = sender.sent;
            drop(sender); // closes the channel: the thread ends after the last bucket
            let mut grads = produced?;
            let mut any_non_finite = false;
            for _ in 0..sent {
                let (k, buf, result, seconds) = from_comm
                    .recv()
                    .map_err(|_| Error::Config("DDP communication thread stopped".into()))?;
                result?;
                traffic.bytes += buf.len() as u64 * 4;
                traffic.seconds += seconds;
                unflatten(&buckets[k], params, &mut grads, &buf)?;
                if k == last {
                    any_non_finite = buf[buckets[k].len - 1] != 0.0;
                }
                buckets[k].buf = buf;
            }
            if sent < buckets.len() {
                return Err(Error::Config(format!(
                    "DDP: only {sent} of {} gradient buckets were reduced",
                    buckets.len()
                )));
            }
            Ok((grads, any_non_finite))
        })
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

/// Hands buckets to the communication thread of [`Ddp::pipelined`], in bucket order.
struct Sender<'a> {
    buckets: &'a mut [Bucket],
    params: &'a [NamedVar],
    /// None on a single rank, where nothing is sent.
    to_comm: Option<mpsc::Sender<(usize, Vec<f32>)>>,
    sent: usize,
    /// The non-finite-loss flag, the last element of the last bucket.
    flag: f32,
}

impl<'a> Sender<'a> {
    fn local() -> Sender<'a> {
        Sender {
            buckets: &mut [],
            params: &[],
            to_comm: None,
            sent: 0,
            flag: 0.0,
        }
    }

    /// Flattens bucket `k` from `grads` and queues its all-reduce; `k` must be the next
    /// bucket. A closed channel means the thread stopped on a failed all-reduce, which
    /// the caller receives.
    fn bucket(&mut self, k: usize, grads: &Grads) -> Result<()> {
        let Some(to_comm) = &self.to_comm else {
            return Ok(());
        };
        if k != self.sent {
            return Err(Error::Config(format!(
                "DDP: bucket {k} queued after {} of them",
                self.sent
            )));
        }
        let last = k + 1 == self.buckets.len();
        let bucket = &mut self.buckets[k];
        let mut buf = std::mem::take(&mut bucket.buf);
        buf.resize(bucket.len, 0.0);
        flatten(bucket, self.params, grads, &mut buf)?;
        if last {
            buf[bucket.len - 1] = self.flag;
        }
        if to_comm.send((k, buf)).is_ok() {
            self.sent += 1;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Exchange {
    BroadcastFromRoot,
    Average,
}

/// Greedy buckets over the variables in reverse name order (about the order backward
/// completes them); a variable larger than a bucket gets one of its own. The last bucket
/// has one extra element for the non-finite-loss flag.
fn plan_buckets(params: &[NamedVar], bucket_bytes: usize) -> Vec<Bucket> {
    let cap = (bucket_bytes / 4).max(1);
    let mut buckets = Vec::new();
    let mut end = params.len();
    while end > 0 {
        let mut start = end - 1;
        let mut len = params[start].var.elem_count();
        while start > 0 && len + params[start - 1].var.elem_count() <= cap {
            start -= 1;
            len += params[start].var.elem_count();
        }
        let offsets = params[start..end]
            .iter()
            .scan(0, |off, p| {
                let at = *off;
                *off += p.var.elem_count();
                Some(at)
            })
            .collect();
        buckets.push(Bucket {
            params: start..end,
            offsets,
            buf: Vec::new(),
            len,
        });
        end = start;
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
