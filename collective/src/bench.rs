//! All-reduce benchmark with the definitions of the Gloo baseline
//! (`bench-baselines/allreduce_bench.py`): sizes from `min` to `max` bytes by `factor`;
//! per size 3 warm-up iterations, then k = clamp(target_s / warm-up time, 10, 200) timed
//! ones, each = refill (untimed), barrier, time one all-reduce; an iteration's time is
//! the max over ranks; algbw = bytes / median, busbw = algbw * 2(n-1)/n, GB = 1e9.
//!
//! [`run_local`] starts the ranks as processes of a given executable on loopback; each
//! process calls [`run_rank`]. The trainer reuses both for `ringmaster bench allreduce`.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::auth::Token;
use crate::communicator::{Communicator, ReduceOp};
use crate::error::{Error, Result};

/// Benchmark settings; flatten into a clap command to expose them.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Smallest buffer per rank, bytes.
    #[arg(long, default_value_t = 1 << 10)]
    pub min_bytes: usize,
    /// Largest buffer per rank, bytes.
    #[arg(long, default_value_t = 256 << 20)]
    pub max_bytes: usize,
    /// Growth factor between sizes.
    #[arg(long, default_value_t = 4)]
    pub factor: usize,
    /// Untimed iterations per size.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Fewest timed iterations per size.
    #[arg(long, default_value_t = 10)]
    pub min_iters: usize,
    /// Most timed iterations per size.
    #[arg(long, default_value_t = 200)]
    pub max_iters: usize,
    /// Timed seconds aimed for per size.
    #[arg(long, default_value_t = 2.0)]
    pub target_s: f64,
}

impl BenchArgs {
    pub fn sizes(&self) -> Vec<usize> {
        let mut v = Vec::new();
        let mut s = self.min_bytes.max(4);
        while s <= self.max_bytes {
            v.push(s);
            s = s.saturating_mul(self.factor.max(2));
        }
        v
    }

    /// The same settings as command-line arguments, for the rank processes.
    pub fn to_args(&self) -> Vec<String> {
        [
            ("--min-bytes", self.min_bytes.to_string()),
            ("--max-bytes", self.max_bytes.to_string()),
            ("--factor", self.factor.to_string()),
            ("--warmup", self.warmup.to_string()),
            ("--min-iters", self.min_iters.to_string()),
            ("--max-iters", self.max_iters.to_string()),
            ("--target-s", self.target_s.to_string()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    pub world_size: usize,
    pub bytes: usize,
    pub iters: usize,
    pub median_s: f64,
    pub min_s: f64,
    pub algbw_gbps: f64,
    pub busbw_gbps: f64,
    pub correct: bool,
    /// What carried the data (`Communicator::transport`): "shm", "tcp", "nccl".
    pub transport: String,
}

const ROW_PREFIX: &str = "RINGMASTER-BENCH-ROW";

impl BenchRow {
    pub(crate) fn new(
        world_size: usize,
        bytes: usize,
        mut times: Vec<f64>,
        correct: bool,
        transport: &str,
    ) -> BenchRow {
        times.sort_by(f64::total_cmp);
        let k = times.len();
        let median_s = if k % 2 == 1 {
            times[k / 2]
        } else {
            (times[k / 2 - 1] + times[k / 2]) / 2.0
        };
        let algbw_gbps = bytes as f64 / median_s / 1e9;
        BenchRow {
            world_size,
            bytes,
            iters: k,
            median_s,
            min_s: times[0],
            algbw_gbps,
            busbw_gbps: algbw_gbps * 2.0 * (world_size as f64 - 1.0) / world_size as f64,
            correct,
            transport: transport.to_string(),
        }
    }

    fn to_line(&self) -> String {
        format!(
            "{ROW_PREFIX} {} {} {} {:e} {:e} {} {}",
            self.world_size,
            self.bytes,
            self.iters,
            self.median_s,
            self.min_s,
            self.correct,
            self.transport
        )
    }

    fn from_line(line: &str) -> Option<BenchRow> {
        let mut it = line.strip_prefix(ROW_PREFIX)?.split_whitespace();
        let world_size: usize = it.next()?.parse().ok()?;
        let bytes = it.next()?.parse().ok()?;
        let iters = it.next()?.parse().ok()?;
        let median_s: f64 = it.next()?.parse().ok()?;
        let min_s = it.next()?.parse().ok()?;
        let correct = it.next()?.parse().ok()?;
        let transport = it.next()?;
        let mut row = BenchRow::new(world_size, bytes, vec![median_s], correct, transport);
        (row.iters, row.min_s) = (iters, min_s);
        Some(row)
    }
}

/// Hands a row to [`run_local`] (which reads rank 0's stdout); rank processes of other
/// backends call this for their rows too.
pub fn emit_row(row: &BenchRow) {
    println!("{}", row.to_line());
}

/// Max over ranks, element-wise, via all-gather (the trait reduces by sum only).
pub(crate) fn max_over_ranks(comm: &mut dyn Communicator, v: &[f32]) -> Result<Vec<f32>> {
    let n = comm.world_size();
    let mut all = vec![0.0; v.len() * n];
    comm.all_gather_f32(v, &mut all)?;
    Ok((0..v.len())
        .map(|i| {
            (0..n)
                .map(|r| all[r * v.len() + i])
                .fold(f32::MIN, f32::max)
        })
        .collect())
}

/// One rank's side of the benchmark; every rank returns the same rows. Rank 0 also
/// prints each row to stdout for [`run_local`].
pub fn run_rank(comm: &mut dyn Communicator, args: &BenchArgs) -> Result<Vec<BenchRow>> {
    let n = comm.world_size();
    let rank = comm.rank();
    let expected = (n * (n + 1) / 2) as f32;
    let mut rows = Vec::new();
    for bytes in args.sizes() {
        let mut buf = vec![0.0f32; bytes / 4];
        let one_iter = |comm: &mut dyn Communicator, buf: &mut [f32]| -> Result<f64> {
            buf.fill((rank + 1) as f32);
            comm.barrier()?;
            let t0 = Instant::now();
            comm.all_reduce_f32(buf, ReduceOp::Sum)?;
            Ok(t0.elapsed().as_secs_f64())
        };
        let mut warm: f64 = 0.0;
        for _ in 0..args.warmup {
            warm = warm.max(one_iter(comm, &mut buf)?);
        }
        let est = max_over_ranks(comm, &[warm as f32])?[0] as f64;
        let k = ((args.target_s / est.max(1e-9)) as usize)
            .clamp(args.min_iters, args.max_iters.max(args.min_iters));
        let mut times = Vec::with_capacity(k);
        for _ in 0..k {
            times.push(one_iter(comm, &mut buf)? as f32);
        }
        let ok = buf.iter().all(|&x| x == expected);
        let times = max_over_ranks(comm, &times)?;
        let all_ok = max_over_ranks(comm, &[if ok { 0.0 } else { 1.0 }])?[0] == 0.0;
        let row = BenchRow::new(
            n,
            bytes,
            times.iter().map(|&t| t as f64).collect(),
            all_ok,
            comm.transport(),
        );
        if rank == 0 {
            emit_row(&row);
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Starts `world_size` rank processes of `exe args...` on loopback (with RANK, WORLD_SIZE,
/// MASTER_ADDR, MASTER_PORT and a fresh RINGMASTER_TOKEN set; other environment, such as
/// the RINGMASTER_RING_* tuning, is inherited), reports rows as they arrive through
/// `on_row`, and fails if any rank fails. The child must call [`run_rank`].
pub fn run_local(
    exe: &Path,
    args: &[String],
    world_size: usize,
    mut on_row: impl FnMut(&BenchRow),
) -> Result<Vec<BenchRow>> {
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| Error::io("finding a free port for the benchmark", e))?
        .port();
    let token = Token::random()?;
    let mut kids = Vec::new();
    for rank in 0..world_size {
        let child = Command::new(exe)
            .args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", world_size.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("RINGMASTER_TOKEN", token.expose())
            .stdout(if rank == 0 {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .map_err(|e| Error::io(format!("starting rank process {}", exe.display()), e))?;
        kids.push(child);
    }
    let mut rows = Vec::new();
    let out = kids[0].stdout.take().expect("rank 0 stdout is piped");
    for line in BufReader::new(out).lines() {
        let line = line.map_err(|e| Error::io("reading rank 0 output", e))?;
        if let Some(row) = BenchRow::from_line(&line) {
            on_row(&row);
            rows.push(row);
        }
    }
    let mut failed = Vec::new();
    for (rank, mut k) in kids.into_iter().enumerate() {
        let status = k
            .wait()
            .map_err(|e| Error::io("waiting for a rank process", e))?;
        if !status.success() {
            failed.push(format!("rank {rank} ({status})"));
        }
    }
    if !failed.is_empty() {
        return Err(Error::Config(format!(
            "benchmark rank processes failed: {}; see their stderr above",
            failed.join(", ")
        )));
    }
    Ok(rows)
}

pub fn human_bytes(b: usize) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

pub const TABLE_HEADER: &str = "| ranks | transport | size | bytes | iters | median (us) | min (us) | algbw (GB/s) | busbw (GB/s) | check |\n|---:|:---|---:|---:|---:|---:|---:|---:|---:|:---:|";

pub fn table_row(r: &BenchRow) -> String {
    format!(
        "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.3} | {:.3} | {} |",
        r.world_size,
        r.transport,
        human_bytes(r.bytes),
        r.bytes,
        r.iters,
        r.median_s * 1e6,
        r.min_s * 1e6,
        r.algbw_gbps,
        r.busbw_gbps,
        if r.correct { "ok" } else { "FAIL" }
    )
}

pub fn markdown_table(rows: &[BenchRow]) -> String {
    let mut s = String::from(TABLE_HEADER);
    for r in rows {
        s.push('\n');
        s.push_str(&table_row(r));
    }
    s
}

/// One rank of a benchmark started by [`drive`]: rendezvous from the environment, then
/// measure (rank 0 prints the rows).
pub fn rank_from_env(backend: &str, args: &BenchArgs) -> Result<()> {
    let cfg = crate::RendezvousConfig::from_env()?;
    match backend {
        "tcp" => run_rank(&mut crate::connect_tcp(&cfg)?, args).map(|_| ()),
        #[cfg(feature = "nccl")]
        "nccl" => {
            let device = std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(cfg.rank);
            let mut comm = crate::connect_nccl(&cfg, device)?;
            for row in comm.bench_device(args)? {
                if cfg.rank == 0 {
                    emit_row(&row);
                }
            }
            Ok(())
        }
        other => Err(Error::Config(format!(
            "unknown backend {other:?}: use tcp, or nccl in a build with --features nccl"
        ))),
    }
}

/// Runs the benchmark for each world size with ranks as processes on loopback, printing a
/// markdown table (and JSON Lines to `json`). Each rank re-invokes this executable with
/// `rank_command` followed by the backend and `args`; that command must call
/// [`rank_from_env`].
pub fn drive(
    rank_command: &[&str],
    world_sizes: &[usize],
    backend: &str,
    json: Option<&Path>,
    args: &BenchArgs,
) -> Result<()> {
    let mut json = json
        .map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| Error::Config(format!("cannot open {}: {e}", p.display())))
        })
        .transpose()?;
    let exe = std::env::current_exe()
        .map_err(|e| Error::Config(format!("cannot find this executable: {e}")))?;
    let mut child_args: Vec<String> = rank_command.iter().map(|s| s.to_string()).collect();
    child_args.extend(["--backend".to_string(), backend.to_string()]);
    child_args.extend(args.to_args());
    println!("{}", TABLE_HEADER);
    for &n in world_sizes {
        run_local(&exe, &child_args, n, |row| {
            println!("{}", table_row(row));
            if let Some(f) = json.as_mut() {
                // Field names follow the Gloo script's JSON Lines, so both load alike.
                let _ = writeln!(
                    f,
                    "{{\"bench\": \"ringmaster_{backend}_allreduce\", \"world_size\": {}, \"bytes\": {}, \"dtype\": \"float32\", \"op\": \"sum\", \"iters\": {}, \"median_s\": {:e}, \"min_s\": {:e}, \"algbw_GBps\": {}, \"busbw_GBps\": {}, \"correct\": {}, \"transport\": \"{}\"}}",
                    row.world_size,
                    row.bytes,
                    row.iters,
                    row.median_s,
                    row.min_s,
                    row.algbw_gbps,
                    row.busbw_gbps,
                    row.correct,
                    row.transport
                );
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rows_follow_the_gloo_definitions() {
        let a = BenchArgs {
            min_bytes: 1024,
            max_bytes: 256 << 20,
            factor: 4,
            warmup: 3,
            min_iters: 10,
            max_iters: 200,
            target_s: 2.0,
        };
        let s = a.sizes();
        assert_eq!((s[0], *s.last().unwrap(), s.len()), (1024, 256 << 20, 10));
        let r = BenchRow::new(4, 1_000_000, vec![3e-3, 1e-3, 2e-3, 4e-3], true, "shm");
        assert_eq!(r.median_s, 2.5e-3);
        assert!((r.busbw_gbps - 0.4 * 1.5).abs() < 1e-12);
        assert_eq!(BenchRow::from_line(&r.to_line()), Some(r));
    }
}
