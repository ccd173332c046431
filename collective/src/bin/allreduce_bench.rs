//! Benchmarks the TCP ring all-reduce with the Gloo baseline's definitions, starting the
//! ranks as processes on loopback, and prints a markdown table.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringmaster_collective::bench::{self, BenchArgs};

#[derive(Parser)]
#[command(
    name = "ringmaster-allreduce-bench",
    about = "All-reduce (f32 sum) bus bandwidth of the TCP ring on loopback, with the same sizes, \
             iteration rules and busbw formula as bench-baselines/allreduce_bench.py (Gloo).",
    after_help = "Ring tuning is read from the environment by every rank: RINGMASTER_RING_STREAMS (2), \
                  RINGMASTER_RING_CHUNK_BYTES (1048576), RINGMASTER_RING_SMALL_BYTES (1048576), RINGMASTER_TIMEOUT_S (60), RINGMASTER_TRANSPORT (auto: shared memory between ranks on one host; tcp).\n\
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
        Some(Worker::Rank { backend, args }) => bench::rank_from_env(&backend, &args),
        None => bench::drive(
            &["rank"],
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
