//! `ringmaster`: the trainer's command line: `launch` (a TrainingJob on this machine),
//! `train` (one rank; what the operator's pods run), and the benchmarks.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ringmaster_collective::bench::{self, BenchArgs};
use ringmaster_collective::{RendezvousConfig, connect_tcp};
use ringmaster_trainer::selftest::{self, SelftestArgs};

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
    /// Run a TrainingJob on this machine: N local ranks, progress bars, a results table
    /// per evaluation, the best model in <output>/best.
    /// Example: `ringmaster launch -n 2 examples/bert-spam.yaml --set training.epochs=1`
    Launch(ringmaster_trainer::launch::LaunchArgs),
    /// One rank of a TrainingJob (what each worker pod runs): reads the spec file and the
    /// rendezvous env (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, RINGMASTER_TOKEN).
    Train {
        /// The TrainingJob YAML.
        #[arg(long)]
        config: PathBuf,
        /// Override a spec field, e.g. `--set training.epochs=1` (repeatable).
        #[arg(long = "set", value_name = "FIELD=VALUE")]
        overrides: Vec<String>,
    },
    /// Serve a fine-tuned classifier over HTTP with dynamic batching: the Open Inference
    /// Protocol v2, KServe v1 and `POST /predict {"text": ...}`; `/metrics`; readiness
    /// after the model is loaded. Example, after `ringmaster launch` wrote runs/bert-spam:
    /// `ringmaster serve --model runs/bert-spam --name spam --port 8080`
    Serve(ringmaster_trainer::serve::ServeArgs),
    /// Measure this machine.
    #[command(subcommand)]
    Bench(Bench),
    /// One rank of a small data-parallel training run over the TCP ring, configured by
    /// RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT/RINGMASTER_TOKEN (started by tests).
    #[command(hide = true)]
    DdpSelftest(SelftestArgs),
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
    /// One AdamW step over MiniLM-L6's 22.7M f32 parameters: ringmaster's fused update
    /// against candle-nn's AdamW and, with `--torch-python`, PyTorch's AdamW.
    Optimizer {
        #[arg(long, default_value_t = 10)]
        iters: usize,
        /// Threads for every variant (torch.set_num_threads on the PyTorch side).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// A Python with torch installed, e.g. /tmp/venv-torch/bin/python.
        #[arg(long)]
        torch_python: Option<PathBuf>,
    },
    /// DDP gradient averaging of MiniLM-L6's 22.7M gradients (buckets, flattening,
    /// write-back) against one raw all-reduce of as many floats, over rank processes.
    Ddp {
        #[arg(long, default_value = "2", value_delimiter = ',')]
        world_sizes: Vec<usize>,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long, default_value_t = 25 << 20)]
        bucket_bytes: usize,
    },
    /// Whether DDP hides gradient averaging under backward: a MiniLM-L6 training step on
    /// one rank against the same per-rank batch on N ranks (rank processes over the TCP
    /// ring, `--threads` each). Example: `ringmaster bench ddp-step --world-sizes 2`.
    DdpStep {
        #[arg(long, default_value = "2", value_delimiter = ',')]
        world_sizes: Vec<usize>,
        /// Sequences per rank.
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        /// Threads per rank.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
    /// One rank of `bench ddp-step` (started by it).
    #[command(hide = true)]
    DdpStepRank {
        #[arg(long, default_value_t = 16)]
        batch: usize,
        #[arg(long, default_value_t = 128)]
        seq: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
    /// One rank of `bench ddp` (started by it).
    #[command(hide = true)]
    DdpRank {
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long, default_value_t = 25 << 20)]
        bucket_bytes: usize,
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
    // SAFETY: first thing in main, before any thread starts.
    unsafe { ringmaster_nn::ops::blas::prefer_native_kernels() };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    ringmaster_trainer::cpu::flush_denormals();
    ringmaster_trainer::allocator::retain_freed_memory();
    let result = match Cli::parse().command {
        Command::Launch(args) => ringmaster_trainer::launch::run(&args).map_err(|e| e.to_string()),
        Command::Serve(args) => ringmaster_trainer::serve::run(&args).map_err(|e| e.to_string()),
        Command::Train { config, overrides } => {
            train(&config, &overrides).map_err(|e| e.to_string())
        }
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
        )
        .map_err(|e| e.to_string()),
        Command::Bench(Bench::AllreduceRank { backend, args }) => {
            bench::rank_from_env(&backend, &args).map_err(|e| e.to_string())
        }
        Command::Bench(Bench::Optimizer {
            iters,
            threads,
            torch_python,
        }) => ringmaster_trainer::bench::run(iters, threads, torch_python.as_deref())
            .map(|rows| print!("{}", ringmaster_trainer::bench::table(&rows)))
            .map_err(|e| e.to_string()),
        Command::Bench(Bench::Ddp {
            world_sizes,
            iters,
            bucket_bytes,
        }) => ringmaster_trainer::bench::ddp_drive(&world_sizes, iters, bucket_bytes)
            .map(|table| print!("{table}"))
            .map_err(|e| e.to_string()),
        Command::Bench(Bench::DdpStep {
            world_sizes,
            batch,
            seq,
            threads,
            iters,
        }) => ringmaster_trainer::ddp_step_bench::drive(&world_sizes, batch, seq, threads, iters)
            .map(|table| println!("{table}"))
            .map_err(|e| e.to_string()),
        Command::Bench(Bench::DdpStepRank { batch, seq, iters }) => {
            ringmaster_trainer::ddp_step_bench::rank(batch, seq, iters).map_err(|e| e.to_string())
        }
        Command::Bench(Bench::DdpRank {
            iters,
            bucket_bytes,
        }) => ringmaster_trainer::bench::ddp_rank(iters, bucket_bytes).map_err(|e| e.to_string()),
        Command::DdpSelftest(args) => ddp_selftest(&args).map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One rank, or (in a pod with processesPerWorker > 1) the pod's ranks.
fn train(config: &std::path::Path, overrides: &[String]) -> ringmaster_trainer::Result<()> {
    use ringmaster_trainer::{launch, train::Rank};
    let job = ringmaster_trainer::spec::JobFile::load(config, overrides)?;
    let me = Rank::from_env()?;
    let local: usize = std::env::var("LOCAL_WORLD_SIZE")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(1);
    if local > 1 && std::env::var_os(launch::RANK_PROCESS_ENV).is_none() {
        if !overrides.is_empty() {
            return Err(ringmaster_trainer::Error::Config(
                "--set cannot be combined with LOCAL_WORLD_SIZE > 1: put the values in the spec"
                    .into(),
            ));
        }
        return launch::run_pod_ranks(config, me.rank, local);
    }
    ringmaster_trainer::train::run(&job, me)
}

fn ddp_selftest(args: &SelftestArgs) -> ringmaster_trainer::Result<()> {
    let ring = connect_tcp(&RendezvousConfig::from_env()?)?;
    selftest::run(args, Box::new(ring))
}
