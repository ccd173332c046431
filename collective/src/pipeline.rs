//! The pipelined ring engine: one thread per rank drives all of its connections with
//! non-blocking sockets and poll(2).
//!
//! Chunk j of every segment travels on connection j mod K. The segment a rank receives in
//! step t is the one it sends in step t+1, so on each connection the sender may forward
//! chunk j of step t+1 as soon as the receiver has finished (summed) chunk j of step t,
//! and the receiver may overwrite chunk j in step t+1 once the sender has sent it in step
//! t. Everything else overlaps: the kernel moves data on both sockets while this thread
//! sums, and the peers work on the other cores. A single thread avoids the wake-up
//! latency of handing chunks between threads, which dominates on busy, small machines.

use std::io::{self, ErrorKind, Read, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use crate::error::Error;
use crate::net::peer_error;
use crate::ring::{Elem, Links, Step, bytes, bytes_mut, scratch_as};

/// Received data is summed in pieces of this size, small enough to stay in L2 between
/// the kernel's copy and the sum.
const REDUCE_PIECE_BYTES: usize = 64 << 10;

/// Where one direction of one connection stands: step, its local chunk index in that step
/// (chunk j = k + jj*K), bytes of that chunk done, and chunks completed overall.
#[derive(Default, Clone, Copy)]
struct Cursor {
    step: usize,
    jj: usize,
    off: usize,
    done: usize,
}

pub(crate) struct Plan<'a> {
    pub segs: &'a [Range<usize>],
    pub steps: &'a [Step],
    pub streams: usize,
    pub chunk_bytes: usize,
}

impl Plan<'_> {
    fn chunk_elems<T>(&self) -> usize {
        let elem = std::mem::size_of::<T>();
        let max_seg = self.segs.iter().map(|r| r.len()).max().unwrap_or(0);
        let max_chunk = (self.chunk_bytes / elem).max(1);
        // At least ~4 chunks per connection and segment keep mid-sized buffers pipelined;
        // every rank derives the same chunking from the same inputs.
        max_seg
            .div_ceil(4 * self.streams)
            .clamp(((16 << 10) / elem).min(max_chunk), max_chunk)
    }
}

pub(crate) fn run<T: Elem>(
    links: &Links,
    timeout: Duration,
    scratch: &mut [Vec<f32>],
    data: &mut [T],
    plan: &Plan,
    op: &str,
) -> Result<(), Error> {
    let k_streams = plan.streams;
    let chunk = plan.chunk_elems::<T>();
    let elem = std::mem::size_of::<T>();
    let piece = (REDUCE_PIECE_BYTES / elem).max(1);
    let segs = plan.segs;
    let steps = plan.steps;
    let nchunks = |seg: usize| segs[seg].len().div_ceil(chunk);
    let chunk_range = |seg: usize, j: usize| {
        let r = &segs[seg];
        r.start + j * chunk..(r.start + (j + 1) * chunk).min(r.end)
    };
    let count_k = |k: usize, n: usize| {
        if n > k {
            (n - k).div_ceil(k_streams)
        } else {
            0
        }
    };
    // bases[k][t]: chunks connection k moves before step t (send side, receive side).
    let bases = |k: usize, pick: fn(&Step) -> usize| {
        let mut acc = 0;
        steps
            .iter()
            .map(|s| {
                let b = acc;
                acc += count_k(k, nchunks(pick(s)));
                b
            })
            .collect::<Vec<usize>>()
    };
    let send_base: Vec<Vec<usize>> = (0..k_streams).map(|k| bases(k, |s| s.send)).collect();
    let recv_base: Vec<Vec<usize>> = (0..k_streams).map(|k| bases(k, |s| s.recv)).collect();
    // Skips steps in which connection k has no chunk (short segments).
    let settle = |c: &mut Cursor, k: usize, pick: fn(&Step) -> usize| {
        while c.step < steps.len() && k + c.jj * k_streams >= nchunks(pick(&steps[c.step])) {
            c.step += 1;
            c.jj = 0;
        }
    };
    let mut snd = vec![Cursor::default(); k_streams];
    let mut rcv = vec![Cursor::default(); k_streams];
    for k in 0..k_streams {
        settle(&mut snd[k], k, |s| s.send);
        settle(&mut rcv[k], k, |s| s.recv);
    }

    let _nonblocking = NonBlocking::set(links)
        .map_err(|e| Error::io("switching ring sockets to non-blocking", e))?;
    let mut fds: Vec<libc::pollfd> = Vec::with_capacity(2 * k_streams);
    let mut last_progress = Instant::now();
    loop {
        let mut progress = false;
        let mut finished = true;
        fds.clear();
        for k in 0..k_streams {
            // Send side.
            let c = &mut snd[k];
            while c.step < steps.len() {
                let t = c.step;
                if t > 0 && rcv[k].done < recv_base[k][t - 1] + c.jj + 1 {
                    break; // waits for our own receiver: no socket event to poll for
                }
                let range = chunk_range(steps[t].send, k + c.jj * k_streams);
                let total = range.len() * elem;
                match (&links.to_next[k]).write(&bytes(&data[range])[c.off..]) {
                    Ok(n) => {
                        progress = true;
                        c.off += n;
                        if c.off == total {
                            c.jj += 1;
                            c.off = 0;
                            c.done += 1;
                            settle(c, k, |s| s.send);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        fds.push(pollfd(&links.to_next[k], libc::POLLOUT));
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(peer_error(links.next, op, timeout, e)),
                }
            }
            finished &= c.step == steps.len();

            // Receive side.
            let c = &mut rcv[k];
            while c.step < steps.len() {
                let t = c.step;
                if t > 0 && snd[k].done < send_base[k][t - 1] + c.jj + 1 {
                    break; // our sender still needs this region from the previous step
                }
                let range = chunk_range(steps[t].recv, k + c.jj * k_streams);
                let len = range.len();
                let got = if steps[t].reduce {
                    let p0 = c.off / elem / piece * piece;
                    let p1 = (p0 + piece).min(len);
                    let tmp = scratch_as::<T>(&mut scratch[k], piece.min(len));
                    let window = &mut bytes_mut(&mut tmp[..p1 - p0])[c.off - p0 * elem..];
                    read(&links.from_prev[k], window).inspect(|&n| {
                        if c.off + n == p1 * elem {
                            T::add_assign(
                                &mut data[range.start + p0..range.start + p1],
                                &tmp[..p1 - p0],
                            );
                        }
                    })
                } else {
                    read(
                        &links.from_prev[k],
                        &mut bytes_mut(&mut data[range])[c.off..],
                    )
                };
                match got {
                    Ok(n) => {
                        progress = true;
                        c.off += n;
                        if c.off == len * elem {
                            c.jj += 1;
                            c.off = 0;
                            c.done += 1;
                            settle(c, k, |s| s.recv);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        fds.push(pollfd(&links.from_prev[k], libc::POLLIN));
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(peer_error(links.prev, op, timeout, e)),
                }
            }
            finished &= c.step == steps.len();
        }
        if finished {
            return Ok(());
        }
        let now = Instant::now();
        if progress {
            last_progress = now;
            continue;
        }
        let left = (last_progress + timeout).saturating_duration_since(now);
        let waiting_to_receive = fds.iter().any(|f| f.events == libc::POLLIN);
        if left.is_zero() {
            let peer = if waiting_to_receive {
                links.prev
            } else {
                links.next
            };
            return Err(peer_error(
                peer,
                op,
                timeout,
                io::Error::from(ErrorKind::TimedOut),
            ));
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: fds is a valid, initialised array of pollfd of the given length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(Error::io("waiting for ring sockets (poll)", e));
            }
        }
    }
}

/// A read where end-of-stream is an error: the peer must never close mid-collective.
fn read(mut s: &std::net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    match s.read(buf)? {
        0 if !buf.is_empty() => Err(io::Error::new(
            ErrorKind::UnexpectedEof,
            "connection closed by the peer",
        )),
        n => Ok(n),
    }
}

fn pollfd(s: &std::net::TcpStream, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: s.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// Non-blocking mode for the engine; blocking (with timeouts) again afterwards for the
/// simple paths, whatever way the engine returns.
struct NonBlocking<'a>(&'a Links);

impl<'a> NonBlocking<'a> {
    fn set(links: &'a Links) -> io::Result<Self> {
        for s in links.to_next.iter().chain(&links.from_prev) {
            s.set_nonblocking(true)?;
        }
        Ok(NonBlocking(links))
    }
}

impl Drop for NonBlocking<'_> {
    fn drop(&mut self) {
        for s in self.0.to_next.iter().chain(&self.0.from_prev) {
            let _ = s.set_nonblocking(false);
        }
    }
}
