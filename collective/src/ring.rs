//! TCP ring collectives.
//!
//! All-reduce is reduce-scatter followed by all-gather around the ring: each rank sends
//! and receives 2(n-1)/n of the buffer, the bandwidth lower bound. Segments are cut into
//! chunks and pipelined over K connections per neighbour (see `pipeline`).
//!
//! Small buffers take another path: one connection, n-1 hops in which every rank forwards
//! whole buffers, then each rank sums all n buffers in rank order. That halves the number
//! of hops (latency), and every rank gets bit-identical results.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::ops::Range;
use std::time::Duration;

use half::bf16;

use crate::communicator::{Communicator, ReduceOp};
use crate::error::{Error, Peer, Result};
use crate::failure::FailureLog;
use crate::net::peer_error;
use crate::pipeline::{self, Plan};
use crate::shm::{self, ShmLinks};
use crate::store::StoreServer;

/// Tuning knobs; every rank of a job must use the same values (checked at connection time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingConfig {
    /// How long a peer may stay silent before the collective fails naming it.
    pub timeout: Duration,
    /// TCP connections per neighbour; each has a sender and a receiver thread.
    pub streams: usize,
    /// Largest pipeline chunk (with shared memory: the slot size, at most 512 KiB).
    pub chunk_bytes: usize,
    /// Buffers whose size times (world size - 1) is at most this take the low-latency
    /// path (also capped by what every rank's socket send buffer holds).
    pub small_max_bytes: usize,
    /// How bulk data moves between ring neighbours.
    pub transport: Transport,
}

/// The bulk-data transport of a ring. Headers, small messages and failure detection
/// always use the TCP connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Shared memory when every rank runs on this host (same boot, network and mount
    /// namespaces, as each rank reports at rendezvous), TCP otherwise. A ring moves at the
    /// pace of its slowest link, so a ring that spans hosts uses TCP on every link.
    #[default]
    Auto,
    /// TCP on every link, even between ranks on one host.
    Tcp,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Auto => "auto",
            Transport::Tcp => "tcp",
        }
    }

    pub fn parse(s: &str) -> Option<Transport> {
        match s.trim() {
            "auto" => Some(Transport::Auto),
            "tcp" => Some(Transport::Tcp),
            _ => None,
        }
    }
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            timeout: Duration::from_secs(60),
            streams: 2,
            chunk_bytes: 1 << 20,
            small_max_bytes: 1 << 20,
            transport: Transport::Auto,
        }
    }
}

/// Plain-old-data element types the ring can move and sum.
///
/// # Safety
/// Implementors must have no padding and accept every bit pattern, because buffers are
/// sent and received as raw bytes.
pub(crate) unsafe trait Elem: Copy + Send + Sync + 'static {
    const DTYPE: u8;
    fn add_assign(dst: &mut [Self], src: &[Self]);
    /// dst = a + b (summing while forwarding, without a separate copy).
    fn sum_into(dst: &mut [Self], a: &[Self], b: &[Self]);
    fn div_assign(buf: &mut [Self], n: usize);
}

unsafe impl Elem for f32 {
    const DTYPE: u8 = 1;
    fn add_assign(dst: &mut [f32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += *s;
        }
    }
    fn sum_into(dst: &mut [f32], a: &[f32], b: &[f32]) {
        for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
            *d = *x + *y;
        }
    }
    fn div_assign(buf: &mut [f32], n: usize) {
        // Division, not multiplication by 1/n, keeps exact results exact (6/3 == 2).
        let n = n as f32;
        for x in buf {
            *x /= n;
        }
    }
}

unsafe impl Elem for bf16 {
    const DTYPE: u8 = 2;
    fn add_assign(dst: &mut [bf16], src: &[bf16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = bf16::from_f32(d.to_f32() + s.to_f32());
        }
    }
    fn sum_into(dst: &mut [bf16], a: &[bf16], b: &[bf16]) {
        for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
            *d = bf16::from_f32(x.to_f32() + y.to_f32());
        }
    }
    fn div_assign(buf: &mut [bf16], n: usize) {
        let n = n as f32;
        for x in buf {
            *x = bf16::from_f32(x.to_f32() / n);
        }
    }
}

pub(crate) fn bytes<T: Elem>(s: &[T]) -> &[u8] {
    // SAFETY: Elem guarantees plain-old-data without padding.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast(), std::mem::size_of_val(s)) }
}

pub(crate) fn bytes_mut<T: Elem>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: Elem guarantees every bit pattern is a valid value.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), std::mem::size_of_val(s)) }
}

/// Reinterprets reusable f32 storage (4-byte aligned) as `len` elements of `T`.
pub(crate) fn scratch_as<T: Elem>(store: &mut Vec<f32>, len: usize) -> &mut [T] {
    let words = (len * std::mem::size_of::<T>()).div_ceil(4);
    if store.len() < words {
        store.resize(words, 0.0);
    }
    debug_assert!(std::mem::align_of::<T>() <= 4);
    // SAFETY: the storage holds at least `len` T's worth of bytes, is 4-byte aligned, and
    // Elem types accept any bit pattern.
    unsafe { std::slice::from_raw_parts_mut(store.as_mut_ptr().cast(), len) }
}

const OP_MAGIC: [u8; 4] = *b"RMOP";
const HEADER_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    AllReduceSum = 1,
    AllReduceAvg = 2,
    Broadcast = 3,
    AllGather = 4,
    Barrier = 5,
}

impl Kind {
    fn name(code: u8) -> &'static str {
        match code {
            1 => "all_reduce(sum)",
            2 => "all_reduce(avg)",
            3 => "broadcast",
            4 => "all_gather",
            5 => "barrier",
            _ => "an unknown operation",
        }
    }
}

/// Sent ahead of every collective (and every small-path hop) so ranks that disagree about
/// what they are doing fail with a clear error instead of exchanging garbage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    kind: u8,
    dtype: u8,
    seq: u64,
    count: u64,
    root: u32,
    step: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..4].copy_from_slice(&OP_MAGIC);
        b[4] = self.kind;
        b[5] = self.dtype;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.count.to_le_bytes());
        b[24..28].copy_from_slice(&self.root.to_le_bytes());
        b[28..32].copy_from_slice(&self.step.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_LEN]) -> Option<Header> {
        (b[..4] == OP_MAGIC).then(|| Header {
            kind: b[4],
            dtype: b[5],
            seq: u64::from_le_bytes(b[8..16].try_into().unwrap()),
            count: u64::from_le_bytes(b[16..24].try_into().unwrap()),
            root: u32::from_le_bytes(b[24..28].try_into().unwrap()),
            step: u32::from_le_bytes(b[28..32].try_into().unwrap()),
        })
    }

    fn describe(&self) -> String {
        let dtype = match self.dtype {
            1 => "f32",
            2 => "bf16",
            _ => "no data",
        };
        let mut s = format!(
            "collective #{} {} of {} {dtype} elements",
            self.seq,
            Kind::name(self.kind),
            self.count
        );
        if self.kind == Kind::Broadcast as u8 {
            s += &format!(" from root {}", self.root);
        }
        s
    }
}

/// The connections of one rank to its ring neighbours, built by `rendezvous`.
pub(crate) struct Links {
    pub next: Peer,
    pub prev: Peer,
    pub to_next: Vec<TcpStream>,
    pub from_prev: Vec<TcpStream>,
    /// The largest message every rank's send buffer takes without blocking: the low-latency
    /// path writes a whole hop before reading, which must not wait on the reader.
    pub max_message: usize,
    /// Shared-memory edges for bulk data, when the whole ring is on this host.
    pub shm: Option<ShmLinks>,
}

/// One rank's end of a TCP ring; obtain it from [`crate::rendezvous::connect_tcp`].
pub struct TcpRing {
    rank: usize,
    world: usize,
    /// Ring positions: `order[p]` is the rank at position p.
    order: Vec<usize>,
    /// The order with the ranks grouped by location, for logs and status.
    description: String,
    pos: usize,
    links: Option<Links>,
    cfg: RingConfig,
    seq: u64,
    scratch: Vec<Vec<f32>>,
    gather: Vec<f32>,
    sendbuf: Vec<u8>,
    poisoned: Option<String>,
    failures: FailureLog,
    /// Rank 0 serves the store for as long as its ring lives.
    store_server: Option<StoreServer>,
}

pub(crate) struct Step {
    pub send: usize,
    pub recv: usize,
    pub reduce: bool,
}

fn shutdown_links(links: &Links) {
    for s in links.to_next.iter().chain(&links.from_prev) {
        let _ = s.shutdown(Shutdown::Both);
    }
}

fn balanced_segments(len: usize, n: usize) -> Vec<Range<usize>> {
    (0..n).map(|i| i * len / n..(i + 1) * len / n).collect()
}

impl TcpRing {
    pub(crate) fn new(
        rank: usize,
        order: Vec<usize>,
        links: Option<Links>,
        cfg: RingConfig,
        failures: FailureLog,
        store: Option<StoreServer>,
    ) -> TcpRing {
        let pos = order
            .iter()
            .position(|&r| r == rank)
            .expect("rank is in the ring order");
        TcpRing {
            rank,
            world: order.len(),
            description: order
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(","),
            order,
            pos,
            links,
            scratch: (0..cfg.streams).map(|_| Vec::new()).collect(),
            cfg,
            seq: 0,
            gather: Vec::new(),
            sendbuf: Vec::new(),
            poisoned: None,
            failures,
            store_server: store,
        }
    }

    /// Replaces the plain order in logs and status with one grouped by location.
    pub(crate) fn with_description(mut self, description: String) -> Self {
        self.description = description;
        self
    }

    pub fn config(&self) -> &RingConfig {
        &self.cfg
    }

    /// The transport bulk data actually takes: "shm" (same host), "tcp", or "none" for a
    /// world of one.
    pub fn transport(&self) -> &'static str {
        match &self.links {
            None => "none",
            Some(l) if l.shm.is_some() => "shm",
            Some(_) => "tcp",
        }
    }

    fn rank_at(&self, pos: usize) -> usize {
        self.order[pos % self.world]
    }

    /// Runs one collective: refuses after an earlier failure, and turns a new failure into
    /// a recorded error and a disconnected communicator, so neighbours fail fast too.
    fn guarded<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R>) -> Result<R> {
        if let Some(first) = &self.poisoned {
            return Err(Error::Poisoned(first.clone()));
        }
        self.seq += 1;
        let err = match f(self) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        // Publish before shutting the links: neighbours see the shutdown as a cascade and
        // then find this report as the root cause.
        let err = self.failures.record(err);
        if let Some(links) = &self.links {
            shutdown_links(links);
        }
        self.failures.linger_if_hosting(self.store_server.is_some());
        self.poisoned = Some(err.to_string());
        Err(err)
    }

    /// Every rank decides the same way: the inputs are the same on all ranks.
    fn use_small_path(&self, bytes: usize) -> bool {
        bytes.saturating_mul(self.world - 1) <= self.cfg.small_max_bytes
            && bytes + HEADER_LEN <= self.links().max_message
    }

    fn links(&self) -> &Links {
        self.links.as_ref().expect("world size > 1 has links")
    }

    fn send(&self, what: &[u8], op: &str) -> Result<()> {
        let l = self.links();
        (&l.to_next[0])
            .write_all(what)
            .map_err(|e| peer_error(l.next, op, self.cfg.timeout, e))
    }

    fn recv(&self, into: &mut [u8], op: &str) -> Result<()> {
        let l = self.links();
        (&l.from_prev[0])
            .read_exact(into)
            .map_err(|e| peer_error(l.prev, op, self.cfg.timeout, e))
    }

    fn check_header(&self, mine: &Header, theirs: &[u8; HEADER_LEN], op: &str) -> Result<()> {
        let prev = self.links().prev;
        match Header::decode(theirs) {
            None => Err(Error::Protocol {
                peer: prev.to_string(),
                reason: format!(
                    "expected a collective header during {op}, got other bytes; the ranks are out of step"
                ),
            }),
            Some(h) if h != *mine => Err(Error::Mismatch {
                rank: self.rank,
                peer: prev.to_string(),
                detail: format!(
                    "{prev} is at {} (hop {}), rank {} is at {} (hop {})",
                    h.describe(),
                    h.step,
                    self.rank,
                    mine.describe(),
                    mine.step
                ),
            }),
            Some(_) => Ok(()),
        }
    }

    /// Sends our header to the next rank and checks the previous rank's against it.
    fn exchange_header(&self, h: &Header, op: &str) -> Result<()> {
        self.send(&h.encode(), op)?;
        let mut theirs = [0u8; HEADER_LEN];
        self.recv(&mut theirs, op)?;
        self.check_header(h, &theirs, op)
    }

    fn header<T: Elem>(&self, kind: Kind, count: usize, root: usize) -> Header {
        Header {
            kind: kind as u8,
            dtype: T::DTYPE,
            seq: self.seq,
            count: count as u64,
            root: root as u32,
            step: 0,
        }
    }

    fn all_reduce<T: Elem>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let kind = match op {
            ReduceOp::Sum => Kind::AllReduceSum,
            ReduceOp::Avg => Kind::AllReduceAvg,
        };
        if self.world == 1 {
            self.seq += 1;
            return Ok(());
        }
        self.guarded(|me| {
            let h = me.header::<T>(kind, buf.len(), 0);
            if me.use_small_path(std::mem::size_of_val(buf)) {
                me.small_all_reduce(buf, h)?;
            } else {
                me.exchange_header(&h, "all_reduce")?;
                let n = me.world;
                let p = me.pos;
                let segs = balanced_segments(buf.len(), n);
                // Reduce-scatter: after step t, position p holds the sum over t+2 ranks of
                // segment p-t-1; after n-1 steps it owns segment p+1 fully reduced. The
                // all-gather then passes finished segments on.
                let steps: Vec<Step> = (0..n - 1)
                    .map(|t| Step {
                        send: (p + n - t) % n,
                        recv: (p + 2 * n - t - 1) % n,
                        reduce: true,
                    })
                    .chain((0..n - 1).map(|s| Step {
                        send: (p + 1 + n - s) % n,
                        recv: (p + n - s) % n,
                        reduce: false,
                    }))
                    .collect();
                me.pipeline(buf, &segs, &steps, "all_reduce")?;
            }
            if op == ReduceOp::Avg {
                T::div_assign(buf, me.world);
            }
            Ok(())
        })
    }

    /// The low-latency path: n-1 hops forwarding whole buffers, then a sum in rank order.
    fn small_all_reduce<T: Elem>(&mut self, buf: &mut [T], h: Header) -> Result<()> {
        let n = self.world;
        let len = buf.len();
        let mut gather = std::mem::take(&mut self.gather);
        let mut sendbuf = std::mem::take(&mut self.sendbuf);
        let result = (|| {
            let blocks = scratch_as::<T>(&mut gather, n * len);
            blocks[self.rank * len..][..len].copy_from_slice(buf);
            self.ring_all_gather_small(blocks, len, h, &mut sendbuf, "all_reduce")?;
            buf.copy_from_slice(&blocks[..len]);
            for r in 1..n {
                T::add_assign(buf, &blocks[r * len..][..len]);
            }
            Ok(())
        })();
        self.gather = gather;
        self.sendbuf = sendbuf;
        result
    }

    /// All-gather in `blocks` (block r belongs to rank r) over one connection, one message
    /// per hop. Only for buffers that fit the socket buffers: every rank writes before it reads.
    fn ring_all_gather_small<T: Elem>(
        &self,
        blocks: &mut [T],
        len: usize,
        h: Header,
        sendbuf: &mut Vec<u8>,
        op: &str,
    ) -> Result<()> {
        let n = self.world;
        let mut theirs = [0u8; HEADER_LEN];
        for s in 0..n - 1 {
            let hop = Header {
                step: s as u32,
                ..h
            };
            let send_rank = self.rank_at(self.pos + n - s);
            let recv_rank = self.rank_at(self.pos + 2 * n - s - 1);
            sendbuf.clear();
            sendbuf.extend_from_slice(&hop.encode());
            sendbuf.extend_from_slice(bytes(&blocks[send_rank * len..][..len]));
            self.send(sendbuf, op)?;
            self.recv(&mut theirs, op)?;
            self.check_header(&hop, &theirs, op)?;
            self.recv(bytes_mut(&mut blocks[recv_rank * len..][..len]), op)?;
        }
        Ok(())
    }

    fn broadcast<T: Elem>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} is not a rank (world size {})",
                self.world
            )));
        }
        if self.world == 1 {
            self.seq += 1;
            return Ok(());
        }
        self.guarded(|me| {
            let h = me.header::<T>(Kind::Broadcast, buf.len(), root);
            me.exchange_header(&h, "broadcast")?;
            let chunk = (me.cfg.chunk_bytes / std::mem::size_of::<T>()).max(1);
            let forward = me.links().next.rank != root;
            for c in buf.chunks_mut(chunk) {
                if me.rank != root {
                    me.recv(bytes_mut(c), "broadcast")?;
                }
                if forward {
                    me.send(bytes(c), "broadcast")?;
                }
            }
            Ok(())
        })
    }

    fn all_gather<T: Elem>(&mut self, input: &[T], output: &mut [T]) -> Result<()> {
        let len = input.len();
        if output.len() != len * self.world {
            return Err(Error::InvalidArgument(format!(
                "all_gather output has {} elements; it must be world_size ({}) x input ({len})",
                output.len(),
                self.world
            )));
        }
        output[self.rank * len..][..len].copy_from_slice(input);
        if self.world == 1 {
            self.seq += 1;
            return Ok(());
        }
        self.guarded(|me| {
            let h = me.header::<T>(Kind::AllGather, len, 0);
            if me.use_small_path(std::mem::size_of_val(input)) {
                let mut sendbuf = std::mem::take(&mut me.sendbuf);
                let r = me.ring_all_gather_small(output, len, h, &mut sendbuf, "all_gather");
                me.sendbuf = sendbuf;
                return r;
            }
            me.exchange_header(&h, "all_gather")?;
            let n = me.world;
            let segs: Vec<Range<usize>> = (0..n).map(|r| r * len..(r + 1) * len).collect();
            let steps: Vec<Step> = (0..n - 1)
                .map(|s| Step {
                    send: me.rank_at(me.pos + n - s),
                    recv: me.rank_at(me.pos + 2 * n - s - 1),
                    reduce: false,
                })
                .collect();
            me.pipeline(output, &segs, &steps, "all_gather")
        })
    }

    fn barrier_impl(&mut self) -> Result<()> {
        if self.world == 1 {
            self.seq += 1;
            return Ok(());
        }
        self.guarded(|me| {
            // n-1 hops of headers: a rank leaves only after news from every other rank arrived.
            let h = me.header::<f32>(Kind::Barrier, 0, 0);
            let mut sendbuf = std::mem::take(&mut me.sendbuf);
            let r = me.ring_all_gather_small::<f32>(
                &mut [],
                0,
                Header { dtype: 0, ..h },
                &mut sendbuf,
                "barrier",
            );
            me.sendbuf = sendbuf;
            r
        })
    }

    fn pipeline<T: Elem>(
        &mut self,
        data: &mut [T],
        segs: &[Range<usize>],
        steps: &[Step],
        op: &str,
    ) -> Result<()> {
        let links = self.links.as_ref().expect("world size > 1 has links");
        let op = format!("{op} #{}", self.seq);
        if let Some(shm) = &links.shm {
            return shm::run(links, shm, self.cfg.timeout, data, segs, steps, &op);
        }
        let plan = Plan {
            segs,
            steps,
            streams: self.cfg.streams,
            chunk_bytes: self.cfg.chunk_bytes,
        };
        pipeline::run(links, self.cfg.timeout, &mut self.scratch, data, &plan, &op)
    }
}

impl Communicator for TcpRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn backend(&self) -> &'static str {
        "tcp-ring"
    }

    fn transport(&self) -> &'static str {
        TcpRing::transport(self)
    }

    /// The order chosen at rendezvous: `RINGMASTER_RING_ORDER`, else by placement.
    fn ring_order(&self) -> Option<&[usize]> {
        Some(&self.order)
    }

    fn ring_description(&self) -> Option<String> {
        Some(self.description.clone())
    }

    fn all_reduce_f32(&mut self, buf: &mut [f32], op: ReduceOp) -> Result<()> {
        self.all_reduce(buf, op)
    }

    fn all_reduce_bf16(&mut self, buf: &mut [bf16], op: ReduceOp) -> Result<()> {
        self.all_reduce(buf, op)
    }

    fn broadcast_f32(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        self.broadcast(buf, root)
    }

    fn all_gather_f32(&mut self, input: &[f32], output: &mut [f32]) -> Result<()> {
        self.all_gather(input, output)
    }

    fn barrier(&mut self) -> Result<()> {
        self.barrier_impl()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_roundtrip_and_rejects_foreign_bytes() {
        let h = Header {
            kind: 1,
            dtype: 1,
            seq: 7,
            count: 12345,
            root: 2,
            step: 3,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        assert_eq!(Header::decode(&[0u8; HEADER_LEN]), None);
    }

    #[test]
    fn segments_cover_the_buffer() {
        for len in [0, 1, 5, 7, 100] {
            for n in 1..=5 {
                let s = balanced_segments(len, n);
                assert_eq!(s.len(), n);
                assert_eq!(s[0].start, 0);
                assert_eq!(s[n - 1].end, len);
                assert!(s.windows(2).all(|w| w[0].end == w[1].start));
            }
        }
    }
}
