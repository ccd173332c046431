//! `ringmaster`: the trainer's command line. Training (`train`, `launch`) and serving
//! (`serve`) arrive with the model work; today it runs the communication benchmark.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringmaster_collective::bench::{self, BenchArgs};

#[derive(Parser)]
#[command(
    name = "ringmaster",
    version,
    about = "ringmaster: data-parallel training and serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure this machine.
    #[command(subcommand)]
    Bench(Bench),
}

#[derive(Subcommand)]
enum Bench {
    /// All-reduce (f32 sum) bus bandwidth of the TCP ring on loopback, with the sizes,
    /// iteration rules and busbw formula of the Gloo baseline (nccl-tests definition:
    /// algbw x 2(n-1)/n). Example: `ringmaster bench allreduce --world-sizes 2,4`.
    Allreduce {
        /// Comma-separated numbers of ranks to run.
        #[arg(long, default_value = "2,4", value_delimiter = ',')]
        world_sizes: Vec<usize>,
        /// `tcp` (host buffers) or `nccl` (device buffers; a build with `--features nccl`).
        #[arg(long, default_value = "tcp")]
        backend: String,
        /// Also append one JSON object per measurement to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        #[command(flatten)]
        args: BenchArgs,
    },
    /// One rank of `bench allreduce` (started by it).
    #[command(hide = true)]
    AllreduceRank {
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
    let result = match Cli::parse().command {
        Command::Bench(Bench::Allreduce {
            world_sizes,
            backend,
            json,
            args,
        }) => bench::drive(
            &["bench", "allreduce-rank"],
            &world_sizes,
            &backend,
            json.as_deref(),
            &args,
        ),
        Command::Bench(Bench::AllreduceRank { backend, args }) => {
            bench::rank_from_env(&backend, &args)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
