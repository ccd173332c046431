#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::net::TcpListener;
use std::time::Duration;

use ringmaster_collective::{RendezvousConfig, RingConfig, TcpRing, Token, Transport, connect_tcp};

pub const TOKEN: &str = "test-job-token";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn config(rank: usize, n: usize, port: u16) -> RendezvousConfig {
    let mut c = RendezvousConfig::new(rank, n, "127.0.0.1", port, Token::new(TOKEN).unwrap());
    c.rendezvous_timeout = Duration::from_secs(30);
    c.ring.timeout = Duration::from_secs(30);
    c
}

/// Every bulk-data transport, with the name `TcpRing::transport` reports for it when all
/// ranks run on this host (as in these tests).
pub const TRANSPORTS: [(Transport, &str); 2] = [(Transport::Auto, "shm"), (Transport::Tcp, "tcp")];

/// `ring` once per transport, with the name the ring must report.
pub fn per_transport(ring: RingConfig) -> impl Iterator<Item = (RingConfig, &'static str)> {
    TRANSPORTS.into_iter().map(move |(transport, name)| {
        (
            RingConfig {
                transport,
                ..ring.clone()
            },
            name,
        )
    })
}

/// Runs `f` on `n` ranks, each a thread with its own rendezvous over real sockets.
pub fn run_ranks<T: Send>(
    n: usize,
    ring: RingConfig,
    order: Option<Vec<usize>>,
    f: impl Fn(&mut TcpRing) -> T + Sync,
) -> Vec<T> {
    run_configured_ranks(
        n,
        |cfg| {
            cfg.ring = ring.clone();
            cfg.ring_order = order.clone();
        },
        f,
    )
}

/// Like `run_ranks`, with each rank's config adjusted by `configure` before it connects.
pub fn run_configured_ranks<T: Send>(
    n: usize,
    configure: impl Fn(&mut RendezvousConfig) + Sync,
    f: impl Fn(&mut TcpRing) -> T + Sync,
) -> Vec<T> {
    let port = free_port();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|rank| {
                let (configure, f) = (&configure, &f);
                s.spawn(move || {
                    let mut cfg = config(rank, n, port);
                    configure(&mut cfg);
                    let mut comm = connect_tcp(&cfg).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                    f(&mut comm)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread panicked"))
            .collect()
    })
}

/// Deterministic pseudo-random floats in [-1, 1), different per rank and seed.
pub fn random_floats(len: usize, rank: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (rank as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Integer-valued floats whose sums over five ranks stay exact in f32.
pub fn integer_floats(len: usize, rank: usize) -> Vec<f32> {
    (0..len)
        .map(|i| ((i * 7 + rank * 13) % 1001) as f32 - 500.0)
        .collect()
}
