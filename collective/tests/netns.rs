//! Ranks in separate network namespaces joined by veth pairs on a bridge, so the ring's
//! traffic crosses real interfaces rather than loopback.
//!
//! Needs root and iproute2; without them it fails and says why. On a machine that cannot
//! have network namespaces, `RINGMASTER_SKIP_NETNS=1` opts out explicitly (the test then
//! prints SKIPPED).

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ringmaster_collective::{Communicator, ReduceOp, RendezvousConfig, connect_tcp};

/// Entry point of a rank process inside a namespace (re-executed test binary).
#[test]
fn netns_rank_process() {
    if std::env::var("RINGMASTER_TEST_ROLE").is_err() {
        return;
    }
    let result = (|| {
        let mut comm = connect_tcp(&RendezvousConfig::from_env()?)?;
        // Transport auto: ranks in different network namespaces are not one host.
        assert_eq!(comm.transport(), "tcp", "ranks in separate namespaces");
        let n = comm.world_size();
        for len in [1usize, 1000, 77_777, 1 << 20] {
            let mut buf: Vec<f32> = (0..len)
                .map(|i| (i % 97) as f32 + comm.rank() as f32)
                .collect();
            comm.all_reduce_f32(&mut buf, ReduceOp::Sum)?;
            let ranks: f32 = (0..n).map(|r| r as f32).sum();
            for (i, x) in buf.iter().enumerate() {
                assert_eq!(*x, (i % 97) as f32 * n as f32 + ranks, "len {len} elem {i}");
            }
        }
        let mut b = vec![comm.rank() as f32; 100_000];
        comm.broadcast_f32(&mut b, n - 1)?;
        assert!(b.iter().all(|&x| x == (n - 1) as f32));
        comm.barrier()
    })();
    if let Err(e) = result {
        eprintln!("RANK-ERROR: {e}");
        std::process::exit(3);
    }
}

fn ip(args: &[&str]) -> Result<Output, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Namespaces and links of one test run; removed on drop (deleting a namespace deletes
/// the veth ends inside it).
struct Topology {
    hub: String,
    ranks: Vec<String>,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for ns in self.ranks.iter().chain(std::iter::once(&self.hub)) {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

fn rank_ip(i: usize) -> String {
    format!("10.213.7.{}", i + 1)
}

fn build(n: usize) -> Result<Topology, String> {
    let id = std::process::id() % 100_000;
    let mut topo = Topology {
        hub: format!("rmc{id}hub"),
        ranks: Vec::new(),
    };
    ip(&["netns", "add", &topo.hub])?;
    ip(&["-n", &topo.hub, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &topo.hub, "link", "set", "br0", "up"])?;
    for i in 0..n {
        let ns = format!("rmc{id}r{i}");
        ip(&["netns", "add", &ns])?;
        topo.ranks.push(ns.clone());
        let host_end = format!("rm{id}h{i}");
        ip(&[
            "link",
            "add",
            &host_end,
            "type",
            "veth",
            "peer",
            "name",
            &format!("rm{id}p{i}"),
        ])?;
        ip(&["link", "set", &host_end, "netns", &topo.hub])?;
        ip(&["link", "set", &format!("rm{id}p{i}"), "netns", &ns])?;
        ip(&[
            "-n", &topo.hub, "link", "set", &host_end, "master", "br0", "up",
        ])?;
        ip(&[
            "-n",
            &ns,
            "link",
            "set",
            &format!("rm{id}p{i}"),
            "name",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", rank_ip(i)),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
    }
    Ok(topo)
}

fn tx_bytes(ns: &str) -> u64 {
    let out = ip(&["-n", ns, "-s", "-j", "link", "show", "eth0"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // JSON: ..."tx":{"bytes":N,... ; a dependency-free scan is enough here.
    let after = text
        .split("\"tx\":{\"bytes\":")
        .nth(1)
        .expect("ip -s -j output has tx bytes");
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn ring_across_network_namespaces() {
    let required = std::env::var("RINGMASTER_SKIP_NETNS").map_or(true, |v| v != "1");
    let n = 3;
    let topo = match build(n) {
        Ok(t) => t,
        Err(why) if !required => {
            eprintln!("SKIPPED (RINGMASTER_SKIP_NETNS=1): network namespaces unavailable ({why})");
            return;
        }
        Err(why) => panic!(
            "network namespaces cannot be set up: {why} (needs root and iproute2; RINGMASTER_SKIP_NETNS=1 opts out)"
        ),
    };
    let port = 29_500 + (std::process::id() % 1000) as u16;
    let before: Vec<u64> = topo.ranks.iter().map(|ns| tx_bytes(ns)).collect();
    let exe = std::env::current_exe().unwrap();
    let kids: Vec<_> = (0..n)
        .map(|r| {
            Command::new("ip")
                .args(["netns", "exec", &topo.ranks[r]])
                .arg(&exe)
                .args([
                    "netns_rank_process",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                    "-q",
                ])
                .env("RINGMASTER_TEST_ROLE", "netns")
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", rank_ip(0))
                .env("MASTER_PORT", port.to_string())
                .env("RINGMASTER_TOKEN", common::TOKEN)
                .env("RINGMASTER_RENDEZVOUS_TIMEOUT_S", "30")
                .env("RINGMASTER_TIMEOUT_S", "30")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let t = Instant::now();
    for (r, mut k) in kids.into_iter().enumerate() {
        loop {
            if let Some(status) = k.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(k.stderr.as_mut().unwrap(), &mut err).unwrap();
                assert!(status.success(), "rank {r} in its namespace failed: {err}");
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(90), "rank {r} hangs");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Each rank sent at least its share of the 4 MiB all-reduce over its veth.
    for (r, ns) in topo.ranks.iter().enumerate() {
        let sent = tx_bytes(ns) - before[r];
        eprintln!("rank {r} ({}) sent {sent} bytes over its veth", rank_ip(r));
        assert!(sent > 2 << 20, "rank {r} sent only {sent} bytes over eth0");
    }
}
