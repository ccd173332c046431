//! From the PyTorch-style environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) to a
//! connected ring: rank 0 serves the store, every rank publishes where it listens, checks
//! that all ranks agree on the job shape, and connects to its ring neighbours.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::auth::{Token, hex, random_bytes};
use crate::error::{Error, Peer, Result};
use crate::failure::FailureLog;
use crate::location::{self, Location};
use crate::net;
use crate::ring::{Links, RingConfig, TcpRing, Transport};
use crate::shm;
use crate::store::{StoreClient, StoreServer};

pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

const RING_MAGIC: [u8; 4] = *b"RMRG";
const RING_VERSION: u16 = 1;
const RING_LABEL: &[u8] = b"ringmaster-ring";
const HELLO_LEN: usize = 4 + 2 + 4 * 4 + 32;

/// Everything a rank needs to join a job.
#[derive(Debug, Clone)]
pub struct RendezvousConfig {
    pub rank: usize,
    pub world_size: usize,
    /// Host name or IP of rank 0, which serves the store.
    pub master_addr: String,
    pub master_port: u16,
    pub token: Token,
    /// Bound on the whole rendezvous (ranks may start minutes apart while images pull).
    pub rendezvous_timeout: Duration,
    pub ring: RingConfig,
    /// Ring positions (`order[p]` is the rank at position p). Every rank must pass the
    /// same order; unset, the ring follows the ranks' locations (0..n when none is known).
    pub ring_order: Option<Vec<usize>>,
    /// Where this rank runs, published at rendezvous to order the ring.
    pub location: Location,
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_parse<T: std::str::FromStr>(name: &str, what: &str) -> Result<Option<T>> {
    env_var(name)
        .map(|v| {
            v.trim()
                .parse()
                .map_err(|_| Error::Config(format!("{name}={v:?} is not {what}")))
        })
        .transpose()
}

fn env_required<T: std::str::FromStr>(name: &str, what: &str) -> Result<T> {
    env_parse(name, what)?.ok_or_else(|| {
        Error::Config(format!(
            "{name} is not set; the launcher (ringmaster launch, the operator, torchrun) sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        ))
    })
}

fn secs(name: &str, default: Duration) -> Result<Duration> {
    match env_parse::<f64>(name, "a number of seconds")? {
        Some(s) if s > 0.0 && s.is_finite() => Ok(Duration::from_secs_f64(s)),
        Some(_) => Err(Error::Config(format!(
            "{name} must be a positive number of seconds"
        ))),
        None => Ok(default),
    }
}

pub fn parse_order(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .map(|x| {
            x.trim().parse().map_err(|_| {
                Error::Config(format!(
                    "ring order {s:?} must be comma-separated ranks, e.g. 0,2,1,3"
                ))
            })
        })
        .collect()
}

impl RendezvousConfig {
    pub fn new(
        rank: usize,
        world_size: usize,
        master_addr: impl Into<String>,
        master_port: u16,
        token: Token,
    ) -> Self {
        RendezvousConfig {
            rank,
            world_size,
            master_addr: master_addr.into(),
            master_port,
            token,
            rendezvous_timeout: DEFAULT_RENDEZVOUS_TIMEOUT,
            ring: RingConfig::default(),
            ring_order: None,
            location: Location::default(),
        }
    }

    /// Reads `RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`, the token
    /// (`RINGMASTER_TOKEN` or `RINGMASTER_TOKEN_FILE`) and the optional
    /// `RINGMASTER_TIMEOUT_S` (60), `RINGMASTER_RENDEZVOUS_TIMEOUT_S` (300),
    /// `RINGMASTER_RING_ORDER` (e.g. `0,2,1,3`), `RINGMASTER_RING_STREAMS` (2),
    /// `RINGMASTER_RING_CHUNK_BYTES` (1 MiB), `RINGMASTER_RING_SMALL_BYTES` (1 MiB),
    /// `RINGMASTER_TRANSPORT` (`auto`: shared memory when all ranks share this host; `tcp`),
    /// and where this rank runs: `RINGMASTER_NODE_NAME`, `RINGMASTER_RACK`,
    /// `RINGMASTER_ZONE` (each unknown when unset or empty, as the downward API gives for
    /// a missing annotation). Without `RINGMASTER_RING_ORDER` the ring visits ranks
    /// grouped by zone, then rack, then node.
    pub fn from_env() -> Result<Self> {
        let rank = env_required("RANK", "a rank number")?;
        let world_size = env_required("WORLD_SIZE", "a positive count")?;
        let master_addr: String = env_required("MASTER_ADDR", "a host name")?;
        let master_port = env_required("MASTER_PORT", "a TCP port number")?;
        let token = Token::from_env()?;
        let defaults = RingConfig::default();
        let ring = RingConfig {
            timeout: secs("RINGMASTER_TIMEOUT_S", DEFAULT_TIMEOUT)?,
            streams: env_parse("RINGMASTER_RING_STREAMS", "a count")?.unwrap_or(defaults.streams),
            chunk_bytes: env_parse("RINGMASTER_RING_CHUNK_BYTES", "a byte count")?
                .unwrap_or(defaults.chunk_bytes),
            small_max_bytes: env_parse("RINGMASTER_RING_SMALL_BYTES", "a byte count")?
                .unwrap_or(defaults.small_max_bytes),
            transport: match env_var("RINGMASTER_TRANSPORT") {
                None => defaults.transport,
                Some(v) => Transport::parse(&v).ok_or_else(|| {
                    Error::Config(format!(
                        "RINGMASTER_TRANSPORT={v:?} must be auto (shared memory between ranks on one host) or tcp"
                    ))
                })?,
            },
        };
        let ring_order = env_var("RINGMASTER_RING_ORDER")
            .map(|s| parse_order(&s))
            .transpose()?;
        let text = |name| env_var(name).map(|v| v.trim().to_string());
        let location = Location {
            zone: text("RINGMASTER_ZONE"),
            rack: text("RINGMASTER_RACK"),
            node: text("RINGMASTER_NODE_NAME"),
        };
        Ok(RendezvousConfig {
            rank,
            world_size,
            master_addr,
            master_port,
            token,
            rendezvous_timeout: secs(
                "RINGMASTER_RENDEZVOUS_TIMEOUT_S",
                DEFAULT_RENDEZVOUS_TIMEOUT,
            )?,
            ring,
            ring_order,
            location,
        })
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let n = self.world_size;
        if n == 0 {
            return Err(Error::Config("WORLD_SIZE must be at least 1".into()));
        }
        if self.rank >= n {
            return Err(Error::Config(format!(
                "RANK {} is out of range for WORLD_SIZE {n} (ranks are 0..{})",
                self.rank,
                n - 1
            )));
        }
        if self.ring.streams == 0 || self.ring.streams > 64 {
            return Err(Error::Config(format!(
                "ring streams must be 1..=64, got {}",
                self.ring.streams
            )));
        }
        if self.ring.chunk_bytes < 4 {
            return Err(Error::Config(
                "ring chunk size must be at least 4 bytes".into(),
            ));
        }
        let Some(order) = &self.ring_order else {
            return Ok(());
        };
        let mut seen = vec![false; n];
        for &r in order {
            if r >= n || std::mem::replace(&mut seen[r], true) {
                return Err(Error::Config(format!(
                    "ring order {order:?} must list every rank 0..{} exactly once",
                    n - 1
                )));
            }
        }
        if order.len() != n {
            return Err(Error::Config(format!(
                "ring order {order:?} must have WORLD_SIZE={n} entries"
            )));
        }
        Ok(())
    }

    /// `host:port` of the store, bracketing IPv6 literals.
    pub fn store_addr(&self) -> String {
        if self.master_addr.contains(':') && !self.master_addr.starts_with('[') {
            format!("[{}]:{}", self.master_addr, self.master_port)
        } else {
            format!("{}:{}", self.master_addr, self.master_port)
        }
    }
}

/// What each rank publishes about itself; compared across ranks so that a job started with
/// inconsistent settings fails at startup with an error naming the odd rank.
#[derive(Debug, PartialEq, Eq)]
struct RankInfo {
    world: usize,
    addr: SocketAddr,
    /// Bytes this rank's ring sockets buffer for sending (after the kernel's clamp).
    sndbuf: usize,
    ring: String,
    /// The explicit ring order, or `ORDER_BY_PLACEMENT`.
    order: String,
    /// Where the rank runs (`shm::host_identity`): equal on all ranks means one host.
    host: String,
    location: Location,
}

/// `RankInfo::order` of a rank without an explicit order: the ring follows placement.
const ORDER_BY_PLACEMENT: &str = "unset (by placement)";

impl RankInfo {
    fn encode(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}|{}|{}",
            self.world,
            self.addr,
            self.sndbuf,
            self.ring,
            self.order,
            self.host,
            self.location.encode()
        )
    }

    fn decode(s: &str) -> Option<RankInfo> {
        let mut it = s.split('|');
        Some(RankInfo {
            world: it.next()?.parse().ok()?,
            addr: it.next()?.parse().ok()?,
            sndbuf: it.next()?.parse().ok()?,
            ring: it.next()?.to_string(),
            order: it.next()?.to_string(),
            host: it.next()?.to_string(),
            location: Location::decode(&mut it)?,
        })
    }
}

/// Waits for `key`, but gives up early when another rank has already reported a failure,
/// so one misconfigured rank does not leave the rest waiting for the whole timeout.
pub(crate) fn wait_key(
    store: &mut StoreClient,
    key: &str,
    deadline: Instant,
    total: Duration,
) -> Result<Vec<u8>> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match store.get(key, left.min(Duration::from_millis(500))) {
            Ok(v) => return Ok(v),
            Err(Error::RendezvousTimeout { .. }) => {}
            Err(e) => return Err(e),
        }
        if let Some(f) = store.try_get("failure/1")? {
            return Err(Error::Config(format!(
                "rendezvous aborted because another rank failed: {}",
                String::from_utf8_lossy(&f)
            )));
        }
        if Instant::now() >= deadline {
            return Err(Error::RendezvousTimeout {
                what: format!("store key {key:?}"),
                secs: total.as_secs_f64(),
            });
        }
    }
}

/// Joins the job described by `cfg` and returns this rank's end of the TCP ring.
/// Rank 0 also serves the store for as long as the returned ring lives.
pub fn connect_tcp(cfg: &RendezvousConfig) -> Result<TcpRing> {
    cfg.validate()?;
    let n = cfg.world_size;
    if n == 1 {
        return Ok(TcpRing::new(
            cfg.rank,
            vec![0],
            None,
            cfg.ring.clone(),
            FailureLog::new(None, 0, 1, cfg.ring.timeout),
            None,
        ));
    }
    let (store, server) = connect_store(cfg)?;
    let mut store = store;
    match join_ring(cfg, &mut store) {
        Ok((order, description, links)) => {
            info!(rank = cfg.rank, world = n, next = %links.next, prev = %links.prev, "tcp ring connected");
            Ok(TcpRing::new(
                cfg.rank,
                order,
                Some(links),
                cfg.ring.clone(),
                FailureLog::new(Some(store), cfg.rank, n, cfg.ring.timeout),
                server,
            )
            .with_description(description))
        }
        Err(e) => {
            let mut log = FailureLog::new(Some(store), cfg.rank, n, cfg.ring.timeout);
            let e = log.record(e);
            log.linger_if_hosting(server.is_some());
            Err(e)
        }
    }
}

/// Starts the store on rank 0 and connects to it (every rank, rank 0 included).
pub(crate) fn connect_store(cfg: &RendezvousConfig) -> Result<(StoreClient, Option<StoreServer>)> {
    let server = if cfg.rank == 0 {
        // All interfaces: MASTER_ADDR names this host as others see it, which may be an
        // address this process cannot bind directly (NAT, a service IP).
        Some(StoreServer::bind(
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.master_port)),
            cfg.token.clone(),
        )?)
    } else {
        None
    };
    let store = StoreClient::connect(&cfg.store_addr(), &cfg.token, cfg.rendezvous_timeout)?;
    Ok((store, server))
}

/// Publishes this rank, checks every rank's record against it, and connects to the
/// neighbours in the ring order (explicit, or from the published locations).
/// The ring order, its description (ranks grouped by location) and this rank's links.
fn join_ring(
    cfg: &RendezvousConfig,
    store: &mut StoreClient,
) -> Result<(Vec<usize>, String, Links)> {
    let n = cfg.world_size;
    let rank = cfg.rank;
    let total = cfg.rendezvous_timeout;
    let deadline = Instant::now() + total;
    if store.add(&format!("rank/{rank}/claims"), 1)? != 1 {
        return Err(Error::Config(format!(
            "another process already joined this job as rank {rank}; every process needs a distinct RANK"
        )));
    }
    // Listen on the interface that reaches rank 0: it is the one other ranks can reach us on.
    let ip: IpAddr = store.local_addr()?.ip();
    let listener = TcpListener::bind((ip, 0))
        .map_err(|e| Error::io(format!("binding the ring listener on {ip}"), e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("reading the ring listener address", e))?;
    let ring = format!(
        "streams={},chunk={},small={},transport={}",
        cfg.ring.streams,
        cfg.ring.chunk_bytes,
        cfg.ring.small_max_bytes,
        cfg.ring.transport.name()
    );
    let order_s = cfg
        .ring_order
        .as_ref()
        .map_or(ORDER_BY_PLACEMENT.into(), |o| {
            o.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
        });
    let sndbuf = net::send_buffer_capacity()
        .map_err(|e| Error::io("probing the socket send buffer size", e))?;
    let mine = RankInfo {
        world: n,
        addr,
        sndbuf,
        ring,
        order: order_s,
        host: shm::host_identity(),
        location: cfg.location.clone(),
    };
    store.set(&format!("rank/{rank}/info"), mine.encode().as_bytes())?;
    if rank == 0 {
        store.set("session", hex(&random_bytes::<16>()?).as_bytes())?;
    }
    let session = wait_key(store, "session", deadline, total)?;

    let mut addrs = Vec::with_capacity(n);
    let mut locations = Vec::with_capacity(n);
    let mut max_message = usize::MAX;
    let mut one_host = true;
    for r in 0..n {
        let raw = wait_key(store, &format!("rank/{r}/info"), deadline, total)?;
        let theirs =
            RankInfo::decode(&String::from_utf8_lossy(&raw)).ok_or_else(|| Error::Protocol {
                peer: format!("rank {r}"),
                reason:
                    "unreadable rendezvous record; run the same ringmaster version on every rank"
                        .into(),
            })?;
        let disagree = |what: &str, a: &str, b: &str| Error::Mismatch {
            rank,
            peer: format!("rank {r} ({})", theirs.addr),
            detail: format!("{what}: rank {rank} has {a}, rank {r} has {b}"),
        };
        if theirs.world != n {
            return Err(disagree(
                "WORLD_SIZE",
                &n.to_string(),
                &theirs.world.to_string(),
            ));
        }
        if theirs.ring != mine.ring {
            return Err(disagree("ring settings", &mine.ring, &theirs.ring));
        }
        if theirs.order != mine.order {
            return Err(disagree(
                "ring order (RINGMASTER_RING_ORDER)",
                &mine.order,
                &theirs.order,
            ));
        }
        one_host &= theirs.host == mine.host;
        addrs.push(theirs.addr);
        locations.push(theirs.location);
        // Linux counts bookkeeping against the buffer too; half of it is safe for payload.
        max_message = max_message.min(theirs.sndbuf / 2);
    }
    // Every rank read the same records, so every rank computes the same order.
    let order = cfg
        .ring_order
        .clone()
        .unwrap_or_else(|| location::placement_order(&locations));
    let description = location::describe(&order, &locations);
    if rank == 0 {
        info!(
            by = if cfg.ring_order.is_some() {
                "RINGMASTER_RING_ORDER"
            } else {
                "placement"
            },
            "ring order {description}"
        );
    }
    let pos = order
        .iter()
        .position(|&r| r == rank)
        .expect("validated order");
    let next_rank = order[(pos + 1) % n];
    let prev_rank = order[(pos + n - 1) % n];
    let next = Peer {
        rank: next_rank,
        addr: addrs[next_rank],
    };
    let prev = Peer {
        rank: prev_rank,
        addr: addrs[prev_rank],
    };
    let hello = |stream: usize| Hello {
        from: rank,
        world: n,
        stream,
        streams: cfg.ring.streams,
    };

    // Connect first, accept second: connects complete against the peer's listen backlog,
    // so no rank waits for another to reach accept().
    let mut to_next = Vec::with_capacity(cfg.ring.streams);
    for k in 0..cfg.ring.streams {
        let s = net::connect_retry(
            &next.addr.to_string(),
            deadline,
            &format!("ring neighbour {next}"),
        )?;
        net::tune(&s, cfg.ring.timeout)
            .map_err(|e| Error::io(format!("configuring the connection to {next}"), e))?;
        (&s).write_all(&hello(k).encode(&cfg.token, &session))
            .map_err(|e| net::peer_error(next, "ring connection set-up", cfg.ring.timeout, e))?;
        to_next.push(s);
    }
    let from_prev = accept_from(&listener, prev, cfg, &session, deadline)?;
    // Every rank sees the same identities, so all choose the same transport.
    let shm = (one_host && cfg.ring.transport == Transport::Auto)
        .then(|| {
            shm::connect(
                &to_next[0],
                &from_prev[0],
                next,
                prev,
                cfg.ring.chunk_bytes,
                cfg.ring.timeout,
            )
        })
        .transpose()?;
    debug!(rank, %next, %prev, shm = shm.is_some(), "ring links up");
    let links = Links {
        next,
        prev,
        to_next,
        from_prev,
        max_message,
        shm,
    };
    Ok((order, description, links))
}

struct Hello {
    from: usize,
    world: usize,
    stream: usize,
    streams: usize,
}

impl Hello {
    fn fields(&self) -> [u8; 16] {
        let mut f = [0u8; 16];
        for (i, v) in [self.from, self.world, self.stream, self.streams]
            .into_iter()
            .enumerate()
        {
            f[i * 4..][..4].copy_from_slice(&(v as u32).to_le_bytes());
        }
        f
    }

    fn encode(&self, token: &Token, session: &[u8]) -> [u8; HELLO_LEN] {
        let mut b = [0u8; HELLO_LEN];
        b[..4].copy_from_slice(&RING_MAGIC);
        b[4..6].copy_from_slice(&RING_VERSION.to_le_bytes());
        let f = self.fields();
        b[6..22].copy_from_slice(&f);
        b[22..].copy_from_slice(&token.tag(&[RING_LABEL, session, &f]));
        b
    }

    fn decode(b: &[u8; HELLO_LEN], token: &Token, session: &[u8]) -> Result<Hello, String> {
        if b[..4] != RING_MAGIC {
            return Err(format!(
                "not a ringmaster ring peer (first bytes {:02x?})",
                &b[..4]
            ));
        }
        let v = u16::from_le_bytes([b[4], b[5]]);
        if v != RING_VERSION {
            return Err(format!(
                "ring protocol version {v}, this rank speaks {RING_VERSION}"
            ));
        }
        if !token.verify(&[RING_LABEL, session, &b[6..22]], &b[22..]) {
            return Err("bad authentication tag (wrong job token or another job's session)".into());
        }
        let u = |i: usize| u32::from_le_bytes(b[6 + i * 4..][..4].try_into().unwrap()) as usize;
        Ok(Hello {
            from: u(0),
            world: u(1),
            stream: u(2),
            streams: u(3),
        })
    }
}

/// Accepts the K connections from the previous rank. Anything else that connects (a
/// scanner, a stale rank of an older job) is logged and dropped; only the deadline fails.
fn accept_from(
    listener: &TcpListener,
    prev: Peer,
    cfg: &RendezvousConfig,
    session: &[u8],
    deadline: Instant,
) -> Result<Vec<TcpStream>> {
    let k = cfg.ring.streams;
    let mut slots: Vec<Option<TcpStream>> = (0..k).map(|_| None).collect();
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("configuring the ring listener", e))?;
    while slots.iter().any(Option::is_none) {
        let (s, from) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let got = slots.iter().filter(|s| s.is_some()).count();
                    return Err(Error::RendezvousTimeout {
                        what: format!("ring connections from {prev} ({got} of {k} arrived)"),
                        secs: cfg.rendezvous_timeout.as_secs_f64(),
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(Error::io("accepting ring connections", e)),
        };
        let checked = (|| -> Result<Hello, String> {
            s.set_nonblocking(false).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(5)))
                .map_err(|e| e.to_string())?;
            let mut b = [0u8; HELLO_LEN];
            (&s).read_exact(&mut b)
                .map_err(|e| format!("no complete hello: {e}"))?;
            let h = Hello::decode(&b, &cfg.token, session)?;
            if h.world != cfg.world_size || h.streams != k {
                return Err(format!(
                    "peer has world size {} and {} streams, this rank {} and {k}",
                    h.world, h.streams, cfg.world_size
                ));
            }
            if h.from != prev.rank || h.stream >= k {
                return Err(format!(
                    "unexpected hello from rank {} stream {} (expected rank {})",
                    h.from, h.stream, prev.rank
                ));
            }
            Ok(h)
        })();
        match checked {
            Ok(h) if slots[h.stream].is_none() => {
                net::tune(&s, cfg.ring.timeout)
                    .map_err(|e| Error::io(format!("configuring the connection from {prev}"), e))?;
                slots[h.stream] = Some(s);
            }
            Ok(h) => warn!(peer = %from, stream = h.stream, "ring: dropped duplicate connection"),
            Err(reason) => warn!(peer = %from, %reason, "ring: dropped connection"),
        }
    }
    Ok(slots
        .into_iter()
        .map(|s| s.expect("all slots filled"))
        .collect())
}
