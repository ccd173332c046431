//! Benchmarks the TCP ring all-reduce with the Gloo baseline's definitions, starting the
//! ranks as processes on loopback, and prints a markdown table.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringmaster_collective::bench::{self, BenchArgs};
use ringmaster_collective::{RendezvousConfig, connect_tcp};

#[derive(Parser)]
#[command(
    name = "ringmaster-allreduce-bench",
    about = "All-reduce (f32 sum) bus bandwidth of the TCP ring on loopback, with the same sizes, \
             iteration rules and busbw formula as bench-baselines/allreduce_bench.py (Gloo).",
    after_help = "Ring tuning is read from the environment by every rank: RINGMASTER_RING_STREAMS (2), \
                  RINGMASTER_RING_CHUNK_BYTES (1048576), RINGMASTER_RING_SMALL_BYTES (1048576), RINGMASTER_TIMEOUT_S (60).\n\
                  Example: ringmaster-allreduce-bench --world-sizes 2,4 --max-bytes 268435456"
)]
struct Cli {
    #[command(subcommand)]
    worker: Option<Worker>,
    /// Comma-separated numbers of ranks to run.
    #[arg(long, default_value = "2,4", value_delimiter = ',')]
    world_sizes: Vec<usize>,
    /// `tcp` (the TCP ring, host buffers) or `nccl` (device buffers, one GPU per rank;
    /// needs a build with `--features nccl`).
    #[arg(long, default_value = "tcp")]
    backend: String,
    /// Also append one JSON object per measurement (JSON Lines) to this file, with the
    /// field names of the Gloo script's --json output.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    #[command(flatten)]
    args: BenchArgs,
}

#[derive(Subcommand)]
enum Worker {
    /// One rank of the benchmark (started by this program; reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, RINGMASTER_TOKEN).
    #[command(hide = true)]
    Rank {
        #[arg(long, default_value = "tcp")]
        backend: String,
        #[command(flatten)]
        args: BenchArgs,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.worker {
        Some(Worker::Rank { backend, args }) => rank(&backend, &args),
        None => drive(
            &cli.world_sizes,
            &cli.backend,
            cli.json.as_deref(),
            &cli.args,
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn rank(backend: &str, args: &BenchArgs) -> ringmaster_collective::Result<()> {
    let cfg = RendezvousConfig::from_env()?;
    match backend {
        "tcp" => bench::run_rank(&mut connect_tcp(&cfg)?, args).map(|_| ()),
        #[cfg(feature = "nccl")]
        "nccl" => {
            let device = std::env::var("LOCAL_RANK")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(cfg.rank);
            let mut comm = ringmaster_collective::connect_nccl(&cfg, device)?;
            for row in comm.bench_device(args)? {
                if cfg.rank == 0 {
                    bench::emit_row(&row);
                }
            }
            Ok(())
        }
        other => Err(ringmaster_collective::Error::Config(format!(
            "unknown backend {other:?}: use tcp, or nccl in a build with --features nccl"
        ))),
    }
}

fn drive(
    world_sizes: &[usize],
    backend: &str,
    json: Option<&std::path::Path>,
    args: &BenchArgs,
) -> ringmaster_collective::Result<()> {
    let mut json = json
        .map(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| {
                    ringmaster_collective::Error::Config(format!(
                        "cannot open {}: {e}",
                        p.display()
                    ))
                })
        })
        .transpose()?;
    let exe = std::env::current_exe().map_err(|e| {
        ringmaster_collective::Error::Config(format!("cannot find this executable: {e}"))
    })?;
    let mut child_args = vec![
        "rank".to_string(),
        "--backend".to_string(),
        backend.to_string(),
    ];
    child_args.extend(args.to_args());
    println!("{}", bench::TABLE_HEADER);
    for &n in world_sizes {
        bench::run_local(&exe, &child_args, n, |row| {
            println!("{}", bench::table_row(row));
            if let Some(f) = json.as_mut() {
                // Field names follow the Gloo script's JSON Lines, so both load alike.
                let _ = writeln!(
                    f,
                    "{{\"bench\": \"ringmaster_{backend}_allreduce\", \"world_size\": {}, \"bytes\": {}, \"dtype\": \"float32\", \"op\": \"sum\", \"iters\": {}, \"median_s\": {:e}, \"min_s\": {:e}, \"algbw_GBps\": {}, \"busbw_GBps\": {}, \"correct\": {}}}",
                    row.world_size,
                    row.bytes,
                    row.iters,
                    row.median_s,
                    row.min_s,
                    row.algbw_gbps,
                    row.busbw_gbps,
                    row.correct
                );
            }
        })?;
    }
    Ok(())
}
