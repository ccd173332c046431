//! Same-host transport: the ring's bulk data through shared memory instead of loopback TCP.
//!
//! Loopback TCP copies every byte twice in the kernel (sender into a socket buffer,
//! socket buffer out to the receiver), and on a small machine those copies are most of
//! the cost of an all-reduce. Here each directed ring edge is a file in /dev/shm, mapped
//! by both ranks, holding a ring of fixed-size slots: the sender writes a chunk into a
//! slot once, and the receiver sums (or copies) straight out of it. Summing and
//! forwarding are fused: a partial sum is written directly into the next rank's slot.
//!
//! The TCP connections stay: collective headers, the small-message path and barriers use
//! them, and they are how a dead neighbour is noticed (its sockets close; shared memory
//! says nothing when a process dies).

use std::io::{self, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

use crate::auth::{hex, random_bytes};
use crate::error::{Error, Peer, Result};
use crate::net::peer_error;
use crate::ring::{Elem, Links, Step};

/// Slots per edge: the sender can be this many chunks ahead of its receiver.
const SLOTS: usize = 4;
/// Control words live in their own cache lines, so the two ranks do not false-share.
const LINE: usize = 128;
const HEADER_BYTES: usize = 4 * LINE;
/// How long a waiting rank sleeps before it checks that the neighbour is still alive.
const LIVENESS_PERIOD: Duration = Duration::from_millis(50);
/// Busy polls before sleeping: a neighbour on another core usually answers within this.
const SPINS: usize = 2000;
const NAME_LEN: usize = 64;

/// A stable description of "same machine, same /dev/shm, same network namespace": two
/// ranks with equal identities can share memory. Unknown parts make the identity unique,
/// so such ranks fall back to TCP.
pub(crate) fn host_identity() -> String {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let link = |p: &str| std::fs::read_link(p).map(|l| l.to_string_lossy().into_owned());
    match (
        read("/proc/sys/kernel/random/boot_id"),
        link("/proc/self/ns/net"),
        link("/proc/self/ns/mnt"),
    ) {
        (Ok(boot), Ok(net), Ok(mnt)) => format!("{boot}/{net}/{mnt}"),
        _ => format!(
            "unknown-{}",
            random_bytes::<8>().map(|b| hex(&b)).unwrap_or_default()
        ),
    }
}

/// One directed edge's mapping: control words, then SLOTS slots of `slot_bytes`.
struct Edge {
    base: *mut u8,
    len: usize,
    slot_bytes: usize,
}

// SAFETY: the mapping is plain shared memory; all cross-rank access goes through the
// atomics in the header, and each slot is owned by one side at a time.
unsafe impl Send for Edge {}
unsafe impl Sync for Edge {}

impl Edge {
    fn map_len(slot_bytes: usize) -> usize {
        HEADER_BYTES + SLOTS * slot_bytes
    }

    fn map(file: &std::fs::File, slot_bytes: usize) -> io::Result<Edge> {
        use std::os::fd::AsRawFd;
        let len = Self::map_len(slot_bytes);
        // SAFETY: mapping a file we hold open, with its full length, shared.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Edge {
            base: base.cast(),
            len,
            slot_bytes,
        })
    }

    fn word(&self, i: usize) -> &AtomicU32 {
        // SAFETY: the header is inside the mapping, line-aligned, and only used atomically.
        unsafe { &*self.base.add(i * LINE).cast::<AtomicU32>() }
    }

    /// Messages published by the sender.
    fn head(&self) -> &AtomicU32 {
        self.word(0)
    }

    /// Messages released by the receiver.
    fn tail(&self) -> &AtomicU32 {
        self.word(1)
    }

    /// Set while the receiver sleeps on `head`.
    fn head_sleeping(&self) -> &AtomicU32 {
        self.word(2)
    }

    /// Set while the sender sleeps on `tail`.
    fn tail_sleeping(&self) -> &AtomicU32 {
        self.word(3)
    }

    fn slot<T: Elem>(&self, msg: u32, len: usize) -> *mut T {
        debug_assert!(len * std::mem::size_of::<T>() <= self.slot_bytes);
        let i = msg as usize % SLOTS;
        // SAFETY: inside the mapping; slots start page-aligned plus multiples of
        // slot_bytes (a multiple of 64), which suits every Elem.
        unsafe { self.base.add(HEADER_BYTES + i * self.slot_bytes).cast() }
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

/// This rank's two shared-memory edges (to the next rank, from the previous one).
pub(crate) struct ShmLinks {
    to_next: Edge,
    from_prev: Edge,
}

/// Largest slot. Measured on a 2-core machine: 512 KiB slots beat 1 MiB ones for 2 and 4
/// ranks (a slot is written by one rank and read by the next while still in cache), and
/// 64 KiB ones lose to the per-message hand-off.
const SLOT_MAX_BYTES: usize = 512 << 10;

/// Slot size for a given chunk setting: a multiple of 64 bytes.
fn slot_bytes(chunk_bytes: usize) -> usize {
    chunk_bytes.min(SLOT_MAX_BYTES).div_ceil(64) * 64
}

/// Sets up both edges over the already authenticated TCP connections: each rank creates
/// the file for the edge it receives on, tells the previous rank its name, maps the file
/// the next rank names, and removes its own file once the previous rank has it mapped
/// (so nothing is left in /dev/shm however the job ends).
pub(crate) fn connect(
    to_next: &TcpStream,
    from_prev: &TcpStream,
    next: Peer,
    prev: Peer,
    chunk_bytes: usize,
    timeout: Duration,
) -> Result<ShmLinks> {
    let slot = slot_bytes(chunk_bytes);
    let name = format!("/dev/shm/ringmaster-{}", hex(&random_bytes::<16>()?));
    let setup = "shared-memory set-up";
    let created = create(&name, Edge::map_len(slot)).map_err(|e| {
        Error::io(
            format!("creating {name} (or set RINGMASTER_TRANSPORT=tcp)"),
            e,
        )
    })?;
    let result = (|| {
        let from_prev_edge =
            Edge::map(&created, slot).map_err(|e| Error::io(format!("mapping {name}"), e))?;
        let mut msg = [0u8; NAME_LEN];
        msg[..name.len()].copy_from_slice(name.as_bytes());
        (&*from_prev)
            .write_all(&msg)
            .map_err(|e| peer_error(prev, setup, timeout, e))?;
        let mut theirs = [0u8; NAME_LEN];
        (&*to_next)
            .read_exact(&mut theirs)
            .map_err(|e| peer_error(next, setup, timeout, e))?;
        let their_name = String::from_utf8_lossy(&theirs)
            .trim_end_matches('\0')
            .to_string();
        if !their_name.starts_with("/dev/shm/ringmaster-") || their_name.contains("..") {
            return Err(Error::Protocol {
                peer: next.to_string(),
                reason: format!("unexpected shared-memory name {their_name:?}"),
            });
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&their_name)
            .map_err(|e| {
                Error::io(
                    format!("opening {their_name} from {next}: it should share this host's /dev/shm (set RINGMASTER_TRANSPORT=tcp if it does not)"),
                    e,
                )
            })?;
        let to_next_edge =
            Edge::map(&file, slot).map_err(|e| Error::io(format!("mapping {their_name}"), e))?;
        (&*to_next)
            .write_all(&[1])
            .map_err(|e| peer_error(next, setup, timeout, e))?;
        let mut ack = [0u8; 1];
        (&*from_prev)
            .read_exact(&mut ack)
            .map_err(|e| peer_error(prev, setup, timeout, e))?;
        Ok(ShmLinks {
            to_next: to_next_edge,
            from_prev: from_prev_edge,
        })
    })();
    let _ = std::fs::remove_file(&name);
    result
}

fn create(path: &str, len: usize) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.set_len(len as u64)?;
    Ok(f)
}

fn futex_wait(word: &AtomicU32, expected: u32, for_at_most: Duration) {
    let ts = libc::timespec {
        tv_sec: for_at_most.as_secs() as libc::time_t,
        tv_nsec: for_at_most.subsec_nanos() as libc::c_long,
    };
    // SAFETY: a valid futex word in shared memory (so not FUTEX_PRIVATE) and timespec.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

fn futex_wake(word: &AtomicU32) {
    // SAFETY: a valid futex word; waking all sleepers (at most one) is always allowed.
    unsafe { libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, i32::MAX) };
}

/// Publishes a counter update and wakes the other side if it sleeps on it.
fn publish(word: &AtomicU32, sleeping: &AtomicU32, value: u32) {
    word.store(value, Ordering::Release);
    // Pairs with the fence in `wait`: either the sleeper sees the new value before it
    // sleeps, or we see its flag and wake it.
    fence(Ordering::SeqCst);
    if sleeping.load(Ordering::Relaxed) != 0 {
        futex_wake(word);
    }
}

/// Who is waited on, through which socket a hang-up shows, and for what.
struct Waiting<'a> {
    peer: Peer,
    socket: &'a TcpStream,
    timeout: Duration,
    op: &'a str,
}

impl Waiting<'_> {
    /// Waits until `ready(word)`; fails naming the peer when it hung up or stayed silent
    /// for the timeout.
    fn until(
        &self,
        word: &AtomicU32,
        sleeping: &AtomicU32,
        ready: impl Fn(u32) -> bool,
    ) -> Result<()> {
        for _ in 0..SPINS {
            if ready(word.load(Ordering::Acquire)) {
                return Ok(());
            }
            std::hint::spin_loop();
        }
        let start = Instant::now();
        loop {
            sleeping.store(1, Ordering::Relaxed);
            fence(Ordering::SeqCst);
            let v = word.load(Ordering::Acquire);
            if ready(v) {
                sleeping.store(0, Ordering::Relaxed);
                return Ok(());
            }
            futex_wait(word, v, LIVENESS_PERIOD);
            sleeping.store(0, Ordering::Relaxed);
            if ready(word.load(Ordering::Acquire)) {
                return Ok(());
            }
            self.check_alive()?;
            if start.elapsed() >= self.timeout {
                return Err(peer_error(
                    self.peer,
                    self.op,
                    self.timeout,
                    io::Error::from(ErrorKind::TimedOut),
                ));
            }
        }
    }

    /// During the data phase nothing but the next collective's header may arrive on the
    /// TCP connection, so end-of-stream or an error there means the peer is gone.
    fn check_alive(&self) -> Result<()> {
        let mut b = [0u8; 1];
        match self.socket.peek(&mut b) {
            Ok(0) => Err(peer_error(
                self.peer,
                self.op,
                self.timeout,
                io::Error::new(ErrorKind::UnexpectedEof, "connection closed by the peer"),
            )),
            Ok(_) => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => Ok(()),
            Err(e) => Err(peer_error(self.peer, self.op, self.timeout, e)),
        }
    }
}

/// The ring schedule of `pipeline::run` over shared memory. Chunk j of every step is one
/// message; chunk j goes through all steps before chunk j+1 starts, so every rank works
/// at most a few messages ahead of its neighbours and each edge needs only SLOTS slots.
pub(crate) fn run<T: Elem>(
    links: &Links,
    shm: &ShmLinks,
    timeout: Duration,
    data: &mut [T],
    segs: &[Range<usize>],
    steps: &[Step],
    op: &str,
) -> Result<()> {
    let tcp_next = (links.next, &links.to_next[0]);
    let tcp_prev = (links.prev, &links.from_prev[0]);
    let chunk = (shm.to_next.slot_bytes / std::mem::size_of::<T>()).max(1);
    let nchunks = segs
        .iter()
        .map(|r| r.len().div_ceil(chunk))
        .max()
        .unwrap_or(0);
    let chunk_range = |seg: usize, j: usize| {
        let r = &segs[seg];
        (r.start + j * chunk).min(r.end)..(r.start + (j + 1) * chunk).min(r.end)
    };
    let (out, inn) = (&shm.to_next, &shm.from_prev);
    let next = Waiting {
        peer: tcp_next.0,
        socket: tcp_next.1,
        timeout,
        op,
    };
    let prev = Waiting {
        peer: tcp_prev.0,
        socket: tcp_prev.1,
        timeout,
        op,
    };
    tcp_next
        .1
        .set_nonblocking(true)
        .and_then(|_| tcp_prev.1.set_nonblocking(true))
        .map_err(|e| Error::io("switching ring sockets to non-blocking", e))?;
    let result = (|| {
        // Counters continue across collectives; both sides of an edge agree on them.
        let mut sent = out.head().load(Ordering::Relaxed);
        let mut received = inn.tail().load(Ordering::Relaxed);
        // Waits for a free slot in the next rank's ring and returns it.
        let claim = |sent: u32, len: usize| -> Result<*mut T> {
            next.until(out.tail(), out.tail_sleeping(), |tail| {
                sent.wrapping_sub(tail) < SLOTS as u32
            })?;
            Ok(out.slot::<T>(sent, len))
        };
        for j in 0..nchunks {
            let first = chunk_range(steps[0].send, j);
            let dst = claim(sent, first.len())?;
            // SAFETY: the slot is ours until published and holds `len` elements.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst, first.len()) };
            dst.copy_from_slice(&data[first]);
            sent = sent.wrapping_add(1);
            publish(out.head(), out.head_sleeping(), sent);
            for (t, step) in steps.iter().enumerate() {
                let r = chunk_range(step.recv, j);
                prev.until(inn.head(), inn.head_sleeping(), |head| head != received)?;
                // SAFETY: published by the previous rank and ours until released.
                let src = unsafe {
                    std::slice::from_raw_parts(inn.slot::<T>(received, r.len()), r.len())
                };
                let forward = steps.get(t + 1);
                if let Some(f) = forward {
                    debug_assert_eq!(f.send, step.recv, "a step forwards what it received");
                    let dst = claim(sent, r.len())?;
                    // SAFETY: as above.
                    let dst = unsafe { std::slice::from_raw_parts_mut(dst, r.len()) };
                    match (step.reduce, f.reduce) {
                        // A partial sum only passes through this rank.
                        (true, true) => T::sum_into(dst, &data[r], src),
                        // The finished sum: keep it and pass it on.
                        (true, false) => {
                            T::add_assign(&mut data[r.clone()], src);
                            dst.copy_from_slice(&data[r]);
                        }
                        (false, _) => {
                            data[r].copy_from_slice(src);
                            dst.copy_from_slice(src);
                        }
                    }
                    sent = sent.wrapping_add(1);
                    publish(out.head(), out.head_sleeping(), sent);
                } else if step.reduce {
                    T::add_assign(&mut data[r], src);
                } else {
                    data[r].copy_from_slice(src);
                }
                received = received.wrapping_add(1);
                publish(inn.tail(), inn.tail_sleeping(), received);
            }
        }
        Ok(())
    })();
    let _ = tcp_next.1.set_nonblocking(false);
    let _ = tcp_prev.1.set_nonblocking(false);
    result
}
