//! Socket set-up and the mapping of I/O failures to errors that name the peer.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use socket2::SockRef;

use crate::error::{Error, Peer, Result};

/// Large buffers keep a ring step's data in flight while the receiver is busy summing;
/// the kernel clamps this to net.core.{r,w}mem_max.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// The send buffer a ring socket gets once `tune` asks for SOCKET_BUFFER_BYTES.
pub fn send_buffer_capacity() -> io::Result<usize> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
    s.send_buffer_size()
}

pub fn tune(stream: &TcpStream, timeout: Duration) -> io::Result<()> {
    // Collective messages are latency-bound when small; Nagle would add up to 40 ms per hop.
    stream.set_nodelay(true)?;
    let sock = SockRef::from(stream);
    sock.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
    sock.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
    // Read/write timeouts are what turn a stalled peer into an error instead of a hang.
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    Ok(())
}

/// Connects to `addr` (host:port, resolved on every try: a Kubernetes headless-service
/// name only resolves once the pod is up), retrying until `deadline` because peers start
/// in any order.
pub fn connect_retry(addr: &str, deadline: Instant, what: &str) -> Result<TcpStream> {
    let mut last_err = String::from("no attempt made");
    let mut pause = Duration::from_millis(10);
    loop {
        match addr.to_socket_addrs() {
            Ok(addrs) => {
                for a in addrs {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match TcpStream::connect_timeout(
                        &a,
                        left.clamp(Duration::from_millis(1), Duration::from_secs(5)),
                    ) {
                        Ok(s) => return Ok(s),
                        Err(e) => last_err = format!("{a}: {e}"),
                    }
                }
            }
            Err(e) => last_err = format!("resolving {addr}: {e}"),
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Error::RendezvousTimeout {
                what: format!("a connection to {what} at {addr} (last error: {last_err})"),
                secs: 0.0,
            });
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Turns an I/O error on a peer connection into an error naming that peer.
pub fn peer_error(peer: Peer, op: &str, timeout: Duration, e: io::Error) -> Error {
    if is_timeout(&e) {
        Error::PeerTimeout {
            peer,
            op: op.to_string(),
            secs: timeout.as_secs_f64(),
            cause: String::new(),
        }
    } else if matches!(
        e.kind(),
        ErrorKind::UnexpectedEof
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::BrokenPipe
            | ErrorKind::NotConnected
    ) {
        Error::PeerClosed {
            peer,
            op: op.to_string(),
            detail: e.to_string(),
            cause: String::new(),
        }
    } else {
        Error::io(format!("talking to {peer} during {op}"), e)
    }
}

pub fn peer_addr_or_unspecified(s: &TcpStream) -> SocketAddr {
    s.peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}
