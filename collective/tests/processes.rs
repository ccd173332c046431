//! Ranks as real processes: rendezvous in any order, a killed rank, a stalled rank.
//!
//! The test binary re-executes itself as the rank processes (`rank_process`, which does
//! nothing unless RINGMASTER_TEST_ROLE is set).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ringmaster_collective::{Communicator, ReduceOp, RendezvousConfig, connect_tcp};

/// Entry point of a rank process. Roles: `once` (one verified all-reduce), `loop`
/// (all-reduce until failure, printing `ready` after the first).
#[test]
fn rank_process() {
    let Ok(role) = std::env::var("RINGMASTER_TEST_ROLE") else {
        return;
    };
    if let Ok(ms) = std::env::var("RINGMASTER_TEST_DELAY_MS") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap()));
    }
    let result = (|| {
        let cfg = RendezvousConfig::from_env()?;
        let mut comm = connect_tcp(&cfg)?;
        let n = comm.world_size() as f32;
        let mut buf = vec![comm.rank() as f32 + 1.0; 1 << 18];
        let mut first = true;
        loop {
            buf.fill(comm.rank() as f32 + 1.0);
            comm.all_reduce_f32(&mut buf, ReduceOp::Sum)?;
            assert!(buf.iter().all(|&x| x == n * (n + 1.0) / 2.0));
            if first {
                let order = comm.ring_order().unwrap_or_default();
                let order: Vec<String> = order.iter().map(usize::to_string).collect();
                println!(
                    "ready rank {} transport {} order {}",
                    comm.rank(),
                    comm.transport(),
                    order.join(",")
                );
                first = false;
            }
            if role == "once" {
                return Ok::<(), ringmaster_collective::Error>(());
            }
        }
    })();
    if let Err(e) = result {
        eprintln!("RANK-ERROR: {e}");
        std::process::exit(3);
    }
}

fn spawn_rank(rank: usize, n: usize, port: u16, role: &str, extra: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "rank_process",
        "--exact",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env("RINGMASTER_TEST_ROLE", role)
    .env("RANK", rank.to_string())
    .env("WORLD_SIZE", n.to_string())
    .env("MASTER_ADDR", "127.0.0.1")
    .env("MASTER_PORT", port.to_string())
    .env("RINGMASTER_TOKEN", common::TOKEN)
    .env("RINGMASTER_RENDEZVOUS_TIMEOUT_S", "30")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in extra {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

/// Waits until the rank finished its first all-reduce, over the `transport` expected.
fn wait_ready(c: &mut Child, transport: &str) {
    let line = ready_line(c);
    assert!(
        line.contains(&format!(" transport {transport} ")),
        "expected the {transport} transport: {line}"
    );
}

/// The line a rank prints after its first all-reduce:
/// `ready rank R transport T order 0,2,1,3`.
fn ready_line(c: &mut Child) -> String {
    let mut line = String::new();
    let mut out = BufReader::new(c.stdout.as_mut().unwrap());
    while out.read_line(&mut line).unwrap() > 0 {
        if line.contains("ready rank") {
            return line.trim_end().to_string();
        }
        line.clear();
    }
    panic!("rank process ended before its first all-reduce");
}

/// Waits (bounded) for a child and returns (exit success, stderr, elapsed).
fn finish(mut c: Child, limit: Duration) -> (bool, String, Duration) {
    let t = Instant::now();
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.success(), err, t.elapsed());
        }
        if t.elapsed() > limit {
            let _ = c.kill();
            panic!("rank process still running after {limit:?}: a hang");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn rendezvous_with_ranks_started_in_any_order_and_with_delays() {
    let n = 4;
    let port = common::free_port();
    // Rank 0 (the store) starts last; the others retry until it is up.
    let delays = [900, 0, 300, 100];
    let kids: Vec<Child> = [3, 1, 2, 0]
        .into_iter()
        .map(|r| {
            spawn_rank(
                r,
                n,
                port,
                "once",
                &[("RINGMASTER_TEST_DELAY_MS", delays[r].to_string())],
            )
        })
        .collect();
    for k in kids {
        let (ok, err, _) = finish(k, Duration::from_secs(60));
        assert!(ok, "rank failed: {err}");
    }
}

#[test]
fn a_killed_rank_makes_every_other_rank_fail_fast_naming_it() {
    // Rank 0 also hosts the store, so killing it takes the failure reports down too.
    for (transport, name) in common::TRANSPORTS {
        for victim in [2, 0] {
            killed_rank_case(victim, transport.name(), name);
        }
    }
}

fn killed_rank_case(victim: usize, transport: &str, expect: &str) {
    let n = 4;
    let port = common::free_port();
    // A generous timeout: the failure must come from the closed sockets, not the timer.
    let extra = [
        ("RINGMASTER_TIMEOUT_S", "30".to_string()),
        ("RINGMASTER_TRANSPORT", transport.to_string()),
    ];
    let mut kids: Vec<Child> = (0..n)
        .map(|r| spawn_rank(r, n, port, "loop", &extra))
        .collect();
    for k in &mut kids {
        wait_ready(k, expect);
    }
    kids[victim].kill().unwrap();
    let _ = kids[victim].wait();
    let name = format!("rank {victim} (");
    for (r, k) in kids.into_iter().enumerate() {
        if r == victim {
            continue;
        }
        let (ok, err, took) = finish(k, Duration::from_secs(20));
        assert!(!ok, "{expect}: rank {r} must exit non-zero");
        assert!(
            took < Duration::from_secs(10),
            "{expect}: rank {r} took {took:?}"
        );
        if victim != 0 {
            // With the store alive every rank learns the root cause; without it, only the
            // dead rank's neighbours can name it and the others name the neighbour that hung up.
            assert!(
                err.contains("RANK-ERROR") && err.contains(&name),
                "{expect}: rank {r} error does not name rank {victim}: {err}"
            );
        } else {
            assert!(
                err.contains("RANK-ERROR") && err.contains("closed the connection"),
                "{expect}: rank {r}: {err}"
            );
        }
    }
}

#[test]
fn a_stalled_rank_times_out_with_an_error_naming_it() {
    for (transport, name) in common::TRANSPORTS {
        stalled_rank_case(transport.name(), name);
    }
}

fn stalled_rank_case(transport: &str, expect: &str) {
    let n = 3;
    let port = common::free_port();
    // 4 s gives a 1 s grace period for the live ranks to report, ample even on a busy CI box.
    let extra = [
        ("RINGMASTER_TIMEOUT_S", "4".to_string()),
        ("RINGMASTER_TRANSPORT", transport.to_string()),
    ];
    let mut kids: Vec<Child> = (0..n)
        .map(|r| spawn_rank(r, n, port, "loop", &extra))
        .collect();
    for k in &mut kids {
        wait_ready(k, expect);
    }
    let victim = 1;
    let pid = kids[victim].id().to_string();
    assert!(
        Command::new("kill")
            .args(["-STOP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut results = Vec::new();
    for (r, k) in kids.iter_mut().enumerate() {
        if r == victim {
            continue;
        }
        let t = Instant::now();
        while k.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "{expect}: rank {r} hangs next to a stalled peer"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut err = String::new();
        std::io::Read::read_to_string(k.stderr.as_mut().unwrap(), &mut err).unwrap();
        results.push((r, err));
    }
    let _ = kids[victim].kill();
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    let _ = kids[victim].wait();
    for (r, err) in results {
        assert!(
            err.contains("RANK-ERROR") && err.contains("stopped responding"),
            "{expect}: rank {r}: {err}"
        );
        let suspects = err.split("stopped responding").nth(1).unwrap();
        assert!(
            suspects.contains("rank 1"),
            "{expect}: rank {r} must name rank 1 as unresponsive: {err}"
        );
    }
}

/// Locations as the operator's pods get them: the node name from the downward API, and
/// zone and rack empty because the node had no such label (read as unknown).
#[test]
fn ring_order_follows_the_node_names_in_the_environment() {
    let n = 4;
    let port = common::free_port();
    let kids: Vec<Child> = (0..n)
        .map(|r| {
            let node = if r % 2 == 0 { "node-a" } else { "node-b" };
            let env = [
                ("RINGMASTER_NODE_NAME", node.to_string()),
                ("RINGMASTER_ZONE", String::new()),
                ("RINGMASTER_RACK", " ".to_string()),
            ];
            spawn_rank(r, n, port, "once", &env)
        })
        .collect();
    for (r, mut k) in kids.into_iter().enumerate() {
        let line = ready_line(&mut k);
        assert!(line.ends_with(" order 0,2,1,3"), "rank {r}: {line}");
        let (ok, err, _) = finish(k, Duration::from_secs(60));
        assert!(ok, "rank {r} failed: {err}");
    }
}

#[test]
fn an_explicit_ring_order_on_some_ranks_only_is_reported() {
    let port = common::free_port();
    let a = spawn_rank(0, 2, port, "once", &[]);
    let b = spawn_rank(
        1,
        2,
        port,
        "once",
        &[("RINGMASTER_RING_ORDER", "1,0".to_string())],
    );
    let (ok_b, err_b, _) = finish(b, Duration::from_secs(40));
    let (ok_a, err_a, _) = finish(a, Duration::from_secs(40));
    assert!(
        !ok_a && !ok_b,
        "neither rank can complete: {err_a} / {err_b}"
    );
    let reported = |err: &str| err.contains("RINGMASTER_RING_ORDER") && err.contains("1,0");
    assert!(reported(&err_a) || reported(&err_b), "{err_a} / {err_b}");
}

#[test]
fn mismatched_world_sizes_are_reported() {
    let port = common::free_port();
    let a = spawn_rank(0, 2, port, "once", &[]);
    let b = spawn_rank(
        1,
        3,
        port,
        "once",
        &[("RINGMASTER_RENDEZVOUS_TIMEOUT_S", "10".to_string())],
    );
    let (ok_b, err_b, _) = finish(b, Duration::from_secs(30));
    let (ok_a, err_a, _) = finish(a, Duration::from_secs(40));
    assert!(
        !ok_a && !ok_b,
        "neither rank can complete: {err_a} / {err_b}"
    );
    // Whichever rank reads the other's record first reports the mismatch, naming the other.
    let reported = |err: &str, other: &str| err.contains("WORLD_SIZE") && err.contains(other);
    assert!(
        reported(&err_a, "rank 1") || reported(&err_b, "rank 0"),
        "{err_a} / {err_b}"
    );
}
