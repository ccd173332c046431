//! ResNet-18 training throughput on CPU (samples/s, split into forward / backward /
//! optimizer), optionally side by side with PyTorch's `resnet_bench.py` in the same run.
//!
//! Same definitions as `resnet_bench.py`: torchvision-shaped ResNet-18 with 10 classes
//! (ImageNet stem at every size), random NCHW input, cross-entropy, SGD (lr 0.01, momentum
//! 0.9), BatchNorm in training mode, 3 warm-up + 10 timed steps, medians.
//!
//! cargo bench -p ringmaster-trainer --bench resnet_step -- [--configs 224:32,32:128]
//!     [--threads 2] [--steps 10] [--warmup 3] [--infer]
//!     [--torch /tmp/bench-baselines --python /tmp/venv-torch/bin/python [--runs 3]]
//!
//! `--torch DIR` runs `DIR/resnet_bench.py` (a writable copy of shared/bench-baselines)
//! with the same configs and threads, `--runs` times, each side after the machine is quiet
//! and the two taking turns going first, and prints the median ratios over the undisturbed
//! runs (`support/protocol.rs`).

use clap::Parser;

#[path = "support/protocol.rs"]
mod protocol;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, ModuleT, Result, Tensor};
use ringmaster_nn::models::resnet::{ResNet, ResNetConfig};
use ringmaster_trainer::allocator::retain_freed_memory;
use ringmaster_trainer::grads::Grads;
use ringmaster_trainer::optim::{Optimizer, OptimizerConfig};
use ringmaster_trainer::params::{ModelVars, NamePatterns, default_buffer_patterns};

/// ResNet-18 training step time against PyTorch.
#[derive(Parser)]
struct Args {
    /// Image size and batch pairs, `HxW:batch`.
    #[arg(long, value_delimiter = ',', default_value = "224:32,32:128", value_parser = parse_config)]
    configs: Vec<(usize, usize)>,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// A copy of shared/bench-baselines: run resnet_bench.py there in the same run.
    #[arg(long)]
    torch: Option<PathBuf>,
    /// Also eval-mode forward throughput (running BatchNorm statistics, no gradients),
    /// on both sides.
    #[arg(long)]
    infer: bool,
    /// Side-by-side runs (with --torch), alternating which side goes first.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = "python3")]
    python: String,
    /// Passed by `cargo bench` to every harness = false target.
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_config(config: &str) -> std::result::Result<(usize, usize), String> {
    let parse = |(size, batch): (&str, &str)| Some((size.parse().ok()?, batch.parse().ok()?));
    config
        .split_once(':')
        .and_then(parse)
        .ok_or_else(|| format!("`{config}` is not HxW:batch, e.g. 224:32"))
}

#[derive(Default)]
struct Timings {
    forward: Vec<f64>,
    backward: Vec<f64>,
    optimizer: Vec<f64>,
    step: Vec<f64>,
    /// CPU seconds this process used per step: on a shared machine, wall time counts
    /// other processes' load too, CPU time much less.
    cpu: Vec<f64>,
}

/// User + system CPU seconds of this process (Linux `/proc/self/stat`, 100 ticks/s).
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn bench(hw: usize, batch: usize, args: &Args) -> Result<Timings> {
    let device = Device::Cpu;
    let vars = ModelVars::new(NamePatterns::default(), default_buffer_patterns());
    let config = ResNetConfig::new(18, 10).expect("ResNet-18");
    let model = ResNet::new(&config, vars.var_builder(DType::F32, &device))?;
    let params = vars.trainable();
    let mut sgd = Optimizer::new(OptimizerConfig::sgd(0.9, false, 0.0), &params);
    let x = Tensor::randn(0f32, 1., (batch, 3, hw, hw), &device)?;
    let labels = Tensor::rand(0f32, 10., batch, &device)?.to_dtype(DType::U32)?;
    let mut t = Timings::default();
    for i in 0..args.warmup + args.steps {
        let (t0, cpu0) = (Instant::now(), process_cpu_seconds());
        let loss = candle_nn::loss::cross_entropy(&model.forward_t(&x, true)?, &labels)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = Grads::take(&params, &mut loss.backward()?)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let t2 = Instant::now();
        sgd.step(&params, &grads, 0.01)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let t3 = Instant::now();
        if i >= args.warmup {
            t.forward.push((t1 - t0).as_secs_f64());
            t.backward.push((t2 - t1).as_secs_f64());
            t.optimizer.push((t3 - t2).as_secs_f64());
            t.step.push((t3 - t0).as_secs_f64());
            t.cpu.push(process_cpu_seconds() - cpu0);
        }
    }
    Ok(t)
}

/// Median seconds of an eval-mode forward pass over `batch` images of `hw`.
fn bench_infer(hw: usize, batch: usize, args: &Args) -> Result<f64> {
    let device = Device::Cpu;
    let vars = ModelVars::new(NamePatterns::default(), default_buffer_patterns());
    let config = ResNetConfig::new(18, 10).expect("ResNet-18");
    let model = ResNet::new(&config, vars.var_builder(DType::F32, &device))?;
    let x = Tensor::randn(0f32, 1., (batch, 3, hw, hw), &device)?;
    let mut times = vec![];
    for i in 0..args.warmup + args.steps {
        let started = Instant::now();
        model.forward_t(&x, false)?.sum_all()?.to_scalar::<f32>()?;
        if i >= args.warmup {
            times.push(started.elapsed().as_secs_f64());
        }
    }
    Ok(median(&times))
}

/// One `resnet_bench.py` record per config: (samples/s, forward, backward, optimizer,
/// foreign CPU seconds, stolen seconds).
fn torch_results(dir: &Path, args: &Args) -> Result<HashMap<Key, [f64; 6]>> {
    let json = std::env::temp_dir().join(format!("resnet_step_torch_{}.jsonl", std::process::id()));
    let configs: Vec<String> = args
        .configs
        .iter()
        .map(|(hw, b)| format!("{hw}:{b}"))
        .collect();
    let status = Command::new(&args.python)
        .current_dir(dir)
        .args([
            "resnet_bench.py",
            "--threads",
            &args.threads.to_string(),
            "--configs",
            &configs.join(","),
        ])
        .args([
            "--steps",
            &args.steps.to_string(),
            "--warmup",
            &args.warmup.to_string(),
        ])
        .args(args.infer.then_some("--infer"))
        .arg("--json")
        .arg(&json)
        .status()
        .map_err(|e| candle_core::Error::Msg(format!("cannot run {}: {e}", args.python)))?;
    if !status.success() {
        candle_core::bail!("{} failed: {status}", dir.join("resnet_bench.py").display())
    }
    let text = std::fs::read_to_string(&json).map_err(|e| {
        candle_core::Error::Msg(format!("resnet_bench.py wrote no {}: {e}", json.display()))
    })?;
    let _ = std::fs::remove_file(&json);
    text.lines()
        .map(|line| {
            let r: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                candle_core::Error::Msg(format!("resnet_bench.py wrote `{line}`: {e}"))
            })?;
            let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
            let size = |k: &str| r[k].as_u64().unwrap_or(0) as usize;
            let mode = if r["bench"] == "resnet18_infer" {
                Mode::Infer
            } else {
                Mode::Train
            };
            let key = (mode, size("hw"), size("batch"));
            Ok((
                key,
                [
                    f("samples_per_s"),
                    f("forward_s"),
                    f("backward_s"),
                    f("optimizer_s"),
                    f("foreign_cpu_s"),
                    f("steal_s"),
                ],
            ))
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Mode {
    Train,
    Infer,
}

/// Mode, image size, batch.
type Key = (Mode, usize, usize);

/// Per key: samples/s, then forward, backward and optimizer seconds (inference: the
/// forward only).
type Rows = Vec<(Key, [f64; 4])>;

/// Our side of one run.
fn measure_ours(args: &Args) -> Result<Rows> {
    let mut rows = Vec::new();
    for &(hw, batch) in &args.configs {
        let t = bench(hw, batch, args)?;
        let sps = batch as f64 / median(&t.step);
        println!(
            "ours ResNet-18 train {hw}x{hw} batch {batch}, {} threads: {sps:.2} samples/s | step {:.0} ms = fwd {:.0} + bwd {:.0} + opt {:.0} ms | {:.2} CPU s/step",
            args.threads,
            median(&t.step) * 1e3,
            median(&t.forward) * 1e3,
            median(&t.backward) * 1e3,
            median(&t.optimizer) * 1e3,
            median(&t.cpu)
        );
        rows.push((
            (Mode::Train, hw, batch),
            [
                sps,
                median(&t.forward),
                median(&t.backward),
                median(&t.optimizer),
            ],
        ));
        if args.infer {
            let forward = bench_infer(hw, batch, args)?;
            let sps = batch as f64 / forward;
            println!(
                "ours ResNet-18 infer {hw}x{hw} batch {batch}, {} threads: {sps:.2} samples/s | batch {:.0} ms",
                args.threads,
                forward * 1e3
            );
            rows.push(((Mode::Infer, hw, batch), [sps, forward, 0.0, 0.0]));
        }
    }
    Ok(rows)
}

/// PyTorch's lowest quiet figure in bench-baselines/README.md.
fn reference_floor(config: &str) -> Option<f64> {
    match config {
        "224x224 b32" => Some(12.0),
        "32x32 b128" => Some(534.0),
        _ => None,
    }
}

fn main() -> Result<()> {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { ringmaster_nn::ops::blas::prefer_native_kernels() };
    let args = Args::parse();
    retain_freed_memory();
    // Before any thread pool exists: gemm and candle's own kernels read these.
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            // SAFETY: no other thread runs yet.
            unsafe { std::env::set_var(var, args.threads.to_string()) };
        }
    }
    let Some(dir) = args.torch.as_deref() else {
        measure_ours(&args)?;
        return Ok(());
    };
    let runs = protocol::take_turns(
        args.runs,
        dir,
        &args.python,
        || measure_ours(&args),
        || torch_results(dir, &args),
    )?;
    let mut samples = vec![];
    for (ours, our_foreign, theirs) in runs {
        println!("| config | fwd ours/torch (ms) | bwd ours/torch (ms) | opt ours/torch (ms) |");
        println!("|---|---|---|---|");
        for (key, c) in ours {
            let Some(t) = theirs.get(&key) else {
                continue;
            };
            let (mode, hw, batch) = key;
            let config = match mode {
                Mode::Train => format!("{hw}x{hw} b{batch}"),
                Mode::Infer => format!("infer {hw}x{hw} b{batch}"),
            };
            samples.push(protocol::Sample {
                config,
                ours: c[0],
                theirs: t[0],
                our_foreign,
                their_foreign: protocol::Foreign {
                    cpu_s: t[4],
                    steal_s: t[5],
                },
            });
            if mode == Mode::Infer {
                continue;
            }
            println!(
                "| {hw}x{hw} b{batch} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} |",
                c[1] * 1e3,
                t[1] * 1e3,
                c[2] * 1e3,
                t[2] * 1e3,
                c[3] * 1e3,
                t[3] * 1e3
            );
        }
    }
    protocol::report(&samples, reference_floor);
    Ok(())
}
