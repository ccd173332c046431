//! A small authenticated key-value store for rendezvous, in the spirit of PyTorch's TCPStore.
//!
//! Wire format (all integers little-endian):
//! - handshake: client sends `"RMST" u16:version nonce_c[32]`; server answers
//!   `"RMST" u16:version nonce_s[32] hmac("ringmaster-store-server" nonce_c nonce_s)`;
//!   client sends `hmac("ringmaster-store-client" nonce_s nonce_c)`; server answers one
//!   status byte (0 accepted, 1 rejected). Both sides prove they hold the job token.
//! - then frames `u32:len body`: request `u8:op u16:keylen key args`, response
//!   `u8:status payload` with status 0 ok, 1 timed out, 2 error (payload: UTF-8 message).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::auth::{NONCE_LEN, TAG_LEN, Token, random_bytes};
use crate::error::{Error, Result};
use crate::net;

const MAGIC: [u8; 4] = *b"RMST";
const VERSION: u16 = 1;
const SERVER_LABEL: &[u8] = b"ringmaster-store-server";
const CLIENT_LABEL: &[u8] = b"ringmaster-store-client";
/// Rendezvous values are addresses and ids; anything this large is a confused or hostile peer.
const MAX_FRAME: usize = 1 << 20;
/// A connection that does not finish the handshake in this time is dropped, so port
/// scanners and health probes cannot pin server threads.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const OP_SET: u8 = 1;
const OP_GET: u8 = 2;
const OP_ADD: u8 = 3;
const OP_WAIT_GE: u8 = 4;

const ST_OK: u8 = 0;
const ST_TIMEOUT: u8 = 1;
const ST_ERROR: u8 = 2;

#[derive(Default)]
struct State {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

/// The store server; it serves until dropped.
pub struct StoreServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl StoreServer {
    pub fn bind(addr: SocketAddr, token: Token) -> Result<StoreServer> {
        let listener = TcpListener::bind(addr).map_err(|e| {
            Error::io(
                format!("binding the rendezvous store to {addr} (is MASTER_PORT already in use?)"),
                e,
            )
        })?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::io("reading the store's address", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let state = Arc::new(State::default());
        let token = Arc::new(token);
        let stop2 = stop.clone();
        std::thread::Builder::new()
            .name("store-accept".into())
            .spawn(move || accept_loop(listener, state, token, stop2))
            .map_err(|e| Error::io("spawning the store thread", e))?;
        debug!(%addr, "rendezvous store listening");
        Ok(StoreServer { addr, stop })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // accept() has no timeout; a throwaway connection wakes it to see the flag.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
    }
}

fn accept_loop(listener: TcpListener, state: Arc<State>, token: Arc<Token>, stop: Arc<AtomicBool>) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "store: accept failed");
                continue;
            }
        };
        let peer = net::peer_addr_or_unspecified(&stream);
        let state = state.clone();
        let token = token.clone();
        let spawned = std::thread::Builder::new()
            .name("store-conn".into())
            .spawn(move || {
                if let Err(reason) = serve_connection(stream, &state, &token) {
                    warn!(%peer, %reason, "store: dropped connection");
                }
            });
        if let Err(e) = spawned {
            warn!(%peer, error = %e, "store: cannot spawn a connection thread; dropped connection");
        }
    }
}

/// Serves one client; any error ends only this connection. Returns why it was dropped.
fn serve_connection(mut s: TcpStream, state: &State, token: &Token) -> Result<(), String> {
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| e.to_string())?;

    let mut hello = [0u8; 4 + 2 + NONCE_LEN];
    s.read_exact(&mut hello)
        .map_err(|e| format!("no complete handshake: {e}"))?;
    if hello[..4] != MAGIC {
        return Err(format!(
            "not a ringmaster store client (first bytes {:02x?})",
            &hello[..4]
        ));
    }
    let version = u16::from_le_bytes([hello[4], hello[5]]);
    if version != VERSION {
        return Err(format!(
            "client speaks store protocol version {version}, this store speaks {VERSION}; run the same ringmaster version on every rank"
        ));
    }
    let client_nonce = &hello[6..];
    let server_nonce: [u8; NONCE_LEN] = random_bytes().map_err(|e| e.to_string())?;
    let mut reply = Vec::with_capacity(4 + 2 + NONCE_LEN + TAG_LEN);
    reply.extend_from_slice(&MAGIC);
    reply.extend_from_slice(&VERSION.to_le_bytes());
    reply.extend_from_slice(&server_nonce);
    reply.extend_from_slice(&token.tag(&[SERVER_LABEL, client_nonce, &server_nonce]));
    s.write_all(&reply).map_err(|e| e.to_string())?;
    let mut proof = [0u8; TAG_LEN];
    s.read_exact(&mut proof)
        .map_err(|e| format!("no authentication proof: {e}"))?;
    if !token.verify(&[CLIENT_LABEL, &server_nonce, client_nonce], &proof) {
        let _ = s.write_all(&[1]);
        return Err("authentication failed (wrong job token)".into());
    }
    s.write_all(&[0]).map_err(|e| e.to_string())?;
    // Authenticated ranks may legitimately idle between requests for as long as a job runs.
    s.set_read_timeout(None).map_err(|e| e.to_string())?;

    let mut body = Vec::new();
    let mut out = Vec::new();
    loop {
        let mut len = [0u8; 4];
        match s.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(format!("reading a request: {e}")),
        }
        let len = u32::from_le_bytes(len) as usize;
        if len > MAX_FRAME {
            return Err(format!(
                "request of {len} bytes exceeds the {MAX_FRAME}-byte limit"
            ));
        }
        body.resize(len, 0);
        s.read_exact(&mut body)
            .map_err(|e| format!("reading a request body: {e}"))?;
        out.clear();
        out.extend_from_slice(&[0; 4]);
        handle_request(&body, state, &mut out)?;
        let n = (out.len() - 4) as u32;
        out[..4].copy_from_slice(&n.to_le_bytes());
        s.write_all(&out)
            .map_err(|e| format!("writing a response: {e}"))?;
    }
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated request".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}

fn handle_request(body: &[u8], state: &State, out: &mut Vec<u8>) -> Result<(), String> {
    let mut c = Cursor(body);
    let op = c.take(1)?[0];
    let klen = u16::from_le_bytes(c.take(2)?.try_into().unwrap()) as usize;
    let key = std::str::from_utf8(c.take(klen)?)
        .map_err(|_| "key is not UTF-8".to_string())?
        .to_string();
    let mut map = state.map.lock().unwrap_or_else(|p| p.into_inner());
    match op {
        OP_SET => {
            map.insert(key, c.0.to_vec());
            state.changed.notify_all();
            out.push(ST_OK);
        }
        OP_ADD => {
            let delta = c.u64()? as i64;
            let cur = match map.get(&key) {
                None => 0,
                Some(v) if v.len() == 8 => i64::from_le_bytes(v[..].try_into().unwrap()),
                Some(_) => {
                    out.push(ST_ERROR);
                    out.extend_from_slice(
                        format!("key {key} holds a value, not a counter").as_bytes(),
                    );
                    return Ok(());
                }
            };
            let new = cur.wrapping_add(delta);
            map.insert(key, new.to_le_bytes().to_vec());
            state.changed.notify_all();
            out.push(ST_OK);
            out.extend_from_slice(&new.to_le_bytes());
        }
        OP_GET | OP_WAIT_GE => {
            let target = if op == OP_WAIT_GE {
                Some(c.u64()? as i64)
            } else {
                None
            };
            let deadline = Instant::now() + Duration::from_millis(c.u64()?);
            loop {
                let ready = match (map.get(&key), target) {
                    (Some(v), None) => {
                        out.push(ST_OK);
                        out.extend_from_slice(v);
                        true
                    }
                    (Some(v), Some(t)) if v.len() == 8 => {
                        i64::from_le_bytes(v[..].try_into().unwrap()) >= t && {
                            out.push(ST_OK);
                            true
                        }
                    }
                    _ => false,
                };
                if ready {
                    break;
                }
                let now = Instant::now();
                if now >= deadline {
                    out.push(ST_TIMEOUT);
                    break;
                }
                map = state
                    .changed
                    .wait_timeout(map, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        other => return Err(format!("unknown request type {other}")),
    }
    Ok(())
}

/// A connection to the store. Each request blocks the caller; use one client per thread.
pub struct StoreClient {
    stream: TcpStream,
    addr: String,
    buf: Vec<u8>,
}

impl StoreClient {
    /// Connects and authenticates, retrying the connection until `timeout` so ranks may
    /// start before the store.
    pub fn connect(addr: &str, token: &Token, timeout: Duration) -> Result<StoreClient> {
        let deadline = Instant::now() + timeout;
        let mut s = net::connect_retry(addr, deadline, "the rendezvous store (rank 0)").map_err(
            |e| match e {
                Error::RendezvousTimeout { what, .. } => Error::RendezvousTimeout {
                    what,
                    secs: timeout.as_secs_f64(),
                },
                e => e,
            },
        )?;
        let io_err = |e: io::Error| Error::Store {
            addr: addr.to_string(),
            reason: format!(
                "handshake failed ({e}); the server closed the connection: is it a ringmaster store of the same version, and do both sides use the same token?"
            ),
        };
        s.set_nodelay(true).map_err(io_err)?;
        s.set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io_err)?;
        s.set_write_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io_err)?;
        let client_nonce: [u8; NONCE_LEN] = random_bytes()?;
        let mut hello = Vec::with_capacity(4 + 2 + NONCE_LEN);
        hello.extend_from_slice(&MAGIC);
        hello.extend_from_slice(&VERSION.to_le_bytes());
        hello.extend_from_slice(&client_nonce);
        s.write_all(&hello).map_err(io_err)?;
        let mut reply = [0u8; 4 + 2 + NONCE_LEN + TAG_LEN];
        s.read_exact(&mut reply).map_err(io_err)?;
        if reply[..4] != MAGIC {
            return Err(Error::Protocol {
                peer: format!("the store at {addr}"),
                reason: "the server is not a ringmaster store (check MASTER_ADDR/MASTER_PORT)"
                    .into(),
            });
        }
        let version = u16::from_le_bytes([reply[4], reply[5]]);
        if version != VERSION {
            return Err(Error::Protocol {
                peer: format!("the store at {addr}"),
                reason: format!(
                    "store protocol version {version}, this rank speaks {VERSION}; run the same ringmaster version on every rank"
                ),
            });
        }
        let server_nonce = &reply[6..6 + NONCE_LEN];
        if !token.verify(
            &[SERVER_LABEL, &client_nonce, server_nonce],
            &reply[6 + NONCE_LEN..],
        ) {
            return Err(Error::Auth {
                peer: format!("the store at {addr}"),
                reason: "the store could not prove it holds the job token".into(),
            });
        }
        s.write_all(&token.tag(&[CLIENT_LABEL, server_nonce, &client_nonce]))
            .map_err(io_err)?;
        let mut status = [0u8; 1];
        s.read_exact(&mut status).map_err(io_err)?;
        if status[0] != 0 {
            return Err(Error::Auth {
                peer: format!("the store at {addr}"),
                reason: "the store rejected this rank's token".into(),
            });
        }
        s.set_read_timeout(None).map_err(io_err)?;
        Ok(StoreClient {
            stream: s,
            addr: addr.to_string(),
            buf: Vec::new(),
        })
    }

    /// The local address of the connection: the interface through which this rank reaches
    /// rank 0, which is what other ranks can reach it on too.
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.stream
            .local_addr()
            .map_err(|e| Error::io("reading the local address of the store connection", e))
    }

    fn request(&mut self, op: u8, key: &str, args: &[u8], wait: Duration) -> Result<(u8, Vec<u8>)> {
        if key.len() > u16::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "store key of {} bytes is too long",
                key.len()
            )));
        }
        let body_len = 1 + 2 + key.len() + args.len();
        if body_len > MAX_FRAME {
            return Err(Error::InvalidArgument(format!(
                "store value for {key} is {} bytes; the store accepts at most {MAX_FRAME}",
                args.len()
            )));
        }
        self.buf.clear();
        self.buf.extend_from_slice(&(body_len as u32).to_le_bytes());
        self.buf.push(op);
        self.buf
            .extend_from_slice(&(key.len() as u16).to_le_bytes());
        self.buf.extend_from_slice(key.as_bytes());
        self.buf.extend_from_slice(args);
        let addr = self.addr.clone();
        let lost = |e: io::Error| Error::Store {
            addr: addr.clone(),
            reason: format!(
                "connection lost ({e}); rank 0, which hosts the store, probably exited or failed"
            ),
        };
        // The server answers a timed-out wait itself; the margin only catches a dead server.
        self.stream
            .set_read_timeout(Some(wait + Duration::from_secs(10)))
            .map_err(lost)?;
        self.stream.write_all(&self.buf).map_err(lost)?;
        let mut len = [0u8; 4];
        self.stream.read_exact(&mut len).map_err(lost)?;
        let len = u32::from_le_bytes(len) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(Error::Protocol {
                peer: format!("the store at {}", self.addr),
                reason: format!("response of {len} bytes"),
            });
        }
        let mut resp = vec![0u8; len];
        self.stream.read_exact(&mut resp).map_err(lost)?;
        let status = resp[0];
        resp.remove(0);
        if status == ST_ERROR {
            return Err(Error::Store {
                addr: self.addr.clone(),
                reason: String::from_utf8_lossy(&resp).into_owned(),
            });
        }
        Ok((status, resp))
    }

    pub fn set(&mut self, key: &str, value: &[u8]) -> Result<()> {
        self.request(OP_SET, key, value, Duration::ZERO).map(|_| ())
    }

    /// Waits up to `timeout` for `key` to be set and returns its value.
    pub fn get(&mut self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let ms = timeout.as_millis().min(u64::MAX as u128) as u64;
        match self.request(OP_GET, key, &ms.to_le_bytes(), timeout)? {
            (ST_OK, v) => Ok(v),
            _ => Err(Error::RendezvousTimeout {
                what: format!("key {key:?} in the store"),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// The value of `key` if it is set now.
    pub fn try_get(&mut self, key: &str) -> Result<Option<Vec<u8>>> {
        match self.request(OP_GET, key, &0u64.to_le_bytes(), Duration::ZERO)? {
            (ST_OK, v) => Ok(Some(v)),
            _ => Ok(None),
        }
    }

    /// Atomically adds `delta` to the counter `key` (created at 0) and returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> Result<i64> {
        let (_, v) = self.request(OP_ADD, key, &delta.to_le_bytes(), Duration::ZERO)?;
        let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| Error::Protocol {
            peer: format!("the store at {}", self.addr),
            reason: "counter reply is not 8 bytes".into(),
        })?;
        Ok(i64::from_le_bytes(bytes))
    }

    /// Waits up to `timeout` until the counter `key` reaches `target`.
    pub fn wait_at_least(&mut self, key: &str, target: i64, timeout: Duration) -> Result<()> {
        let ms = timeout.as_millis().min(u64::MAX as u128) as u64;
        let mut args = [0u8; 16];
        args[..8].copy_from_slice(&target.to_le_bytes());
        args[8..].copy_from_slice(&ms.to_le_bytes());
        match self.request(OP_WAIT_GE, key, &args, timeout)? {
            (ST_OK, _) => Ok(()),
            _ => Err(Error::RendezvousTimeout {
                what: format!("counter {key:?} to reach {target}"),
                secs: timeout.as_secs_f64(),
            }),
        }
    }

    /// Blocks until `world_size` callers have entered the barrier `name`. Each name is
    /// single-use: pick a new one (e.g. with a generation number) for every barrier.
    pub fn barrier(&mut self, name: &str, world_size: usize, timeout: Duration) -> Result<()> {
        let key = format!("barrier/{name}");
        self.add(&key, 1)?;
        self.wait_at_least(&key, world_size as i64, timeout)
    }
}
