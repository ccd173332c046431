//! Trainer benchmarks over MiniLM-L6's parameter shapes (22.7M f32):
//! - `ringmaster bench optimizer`: one AdamW step, ringmaster's fused update against
//!   candle's stock `AdamW` and, when a Python with torch is given, PyTorch's AdamW
//!   (for-loop, foreach and fused) in the same run with the same thread count;
//! - `ringmaster bench ddp`: DDP gradient averaging (bucketing, flattening, write-back)
//!   against one raw all-reduce of the same number of floats, over real rank processes
//!   (`bench ddp-step`, a whole training step, is in `ddp_step_bench.rs`).

use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::Init;
use candle_nn::optim::{AdamW as CandleAdamW, Optimizer as _, ParamsAdamW};
use ringmaster_collective::{Communicator, ReduceOp, RendezvousConfig, connect_tcp};

use crate::ddp::{Ddp, DdpConfig};
use crate::error::{Error, Result};
use crate::grads::Grads;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::params::{ModelVars, NamePatterns, NamedVar, Role, default_buffer_patterns};

/// MiniLM-L6 (all-MiniLM-L6-v2): embeddings, six encoder layers, pooler.
pub fn minilm_shapes() -> Vec<Vec<usize>> {
    let (h, inter, vocab) = (384, 1536, 30522);
    let mut shapes = vec![vec![vocab, h], vec![512, h], vec![2, h], vec![h], vec![h]];
    for _ in 0..6 {
        for _ in 0..4 {
            shapes.extend([vec![h, h], vec![h]]);
        }
        shapes.extend([vec![h], vec![h]]);
        shapes.extend([
            vec![inter, h],
            vec![inter],
            vec![h, inter],
            vec![h],
            vec![h],
            vec![h],
        ]);
    }
    shapes.extend([vec![h, h], vec![h]]);
    shapes
}

pub struct Row {
    pub variant: String,
    pub params: usize,
    pub ms: f64,
}

pub(crate) fn median_ms(iters: usize, mut step: impl FnMut() -> Result<()>) -> Result<f64> {
    if iters == 0 {
        return Err(Error::Config("--iters must be at least 1".into()));
    }
    step()?; // first step allocates the moments
    let mut times: Vec<f64> = (0..iters)
        .map(|_| {
            let t = Instant::now();
            step().map(|()| t.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn random_vars(shapes: &[Vec<usize>]) -> Result<Vec<(Var, Tensor)>> {
    shapes
        .iter()
        .map(|s| {
            let p = Var::randn(0f32, 1.0, s.as_slice(), &Device::Cpu)?;
            let g = Tensor::randn(0f32, 1.0, s.as_slice(), &Device::Cpu)?;
            Ok((p, g))
        })
        .collect()
}

/// `threads`: the size of rayon's global pool, which must not have started yet.
pub fn run(iters: usize, threads: usize, torch_python: Option<&Path>) -> Result<Vec<Row>> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .map_err(|e| Error::Config(format!("setting {threads} threads: {e}")))?;
    let shapes = minilm_shapes();
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let mut rows = Vec::new();

    let vars = random_vars(&shapes)?;
    let params: Vec<NamedVar> = vars
        .iter()
        .enumerate()
        .map(|(i, (v, _))| NamedVar {
            name: format!("p{i:03}.weight"),
            var: v.clone(),
            role: Role::Trainable,
        })
        .collect();
    let grads = Grads::from_slots(vars.iter().map(|(_, g)| Some(g.clone())).collect())?;
    let mut ours = Optimizer::new(OptimizerConfig::adamw(0.01), &params);
    let ms = median_ms(iters, || ours.step(&params, &grads, 1e-3))?;
    rows.push(Row {
        variant: "ringmaster-fused".into(),
        params: n,
        ms,
    });

    let vars = random_vars(&shapes)?;
    let mut store = GradStore::default();
    for (v, g) in &vars {
        store.insert(v.as_tensor(), g.clone());
    }
    let mut stock = CandleAdamW::new(
        vars.iter().map(|(v, _)| v.clone()).collect(),
        ParamsAdamW {
            lr: 1e-3,
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let ms = median_ms(iters, || Ok(stock.step(&store)?))?;
    rows.push(Row {
        variant: "candle-nn-adamw".into(),
        params: n,
        ms,
    });

    if let Some(python) = torch_python {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/adamw_torch.py");
        let out = Command::new(python)
            .arg(&script)
            .args([
                "--threads",
                &threads.to_string(),
                "--iters",
                &iters.to_string(),
            ])
            .output()
            .map_err(|source| Error::Io {
                what: "running",
                path: python.to_path_buf(),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::Config(format!(
                "{} {} failed: {}",
                python.display(),
                script.display(),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| Error::Config(format!("torch benchmark printed {line:?}: {e}")))?;
            rows.push(Row {
                variant: v["variant"].as_str().unwrap_or("torch").to_string(),
                params: v["params"].as_u64().unwrap_or(0) as usize,
                ms: v["ms"].as_f64().unwrap_or(f64::NAN),
            });
        }
    }
    Ok(rows)
}

/// A markdown table with each variant's time relative to ringmaster's.
pub fn table(rows: &[Row]) -> String {
    let base = rows.first().map_or(f64::NAN, |r| r.ms);
    let mut s =
        String::from("| variant | params | ms/step | ringmaster speed-up |\n|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.2}x |\n",
            r.variant,
            r.params,
            r.ms,
            r.ms / base
        ));
    }
    s
}

/// One rank of `bench ddp` (RANK/WORLD_SIZE/MASTER_* from the environment); rank 0 prints
/// `ddp_ms allreduce_ms params` on stdout.
pub fn ddp_rank(iters: usize, bucket_bytes: usize) -> Result<()> {
    let comm = connect_tcp(&RendezvousConfig::from_env()?)?;
    let rank = comm.rank();
    let vars = ModelVars::new(NamePatterns::default(), default_buffer_patterns());
    let vb = vars.var_builder(candle_core::DType::F32, &Device::Cpu);
    let shapes = minilm_shapes();
    for (i, s) in shapes.iter().enumerate() {
        vb.get_with_hints(s.as_slice(), &format!("p{i:03}.weight"), Init::Const(0.0))?;
    }
    let cfg = DdpConfig {
        bucket_bytes,
        ..DdpConfig::default()
    };
    let mut ddp = Ddp::new(Box::new(comm), &vars, cfg)?;
    let mut grads = Grads::from_slots(
        random_vars(&shapes)?
            .into_iter()
            .map(|(_, g)| Some(g))
            .collect(),
    )?;
    let ddp_ms = median_ms(iters, || ddp.reduce_grads(&mut grads, false).map(|_| ()))?;
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let mut flat = vec![1.0f32; n];
    let comm = ddp.communicator();
    let raw_ms = median_ms(iters, || Ok(comm.all_reduce_f32(&mut flat, ReduceOp::Avg)?))?;
    if rank == 0 {
        println!("{ddp_ms} {raw_ms} {n}");
    }
    Ok(())
}

/// Runs `bench ddp` ranks on loopback for each world size and tabulates rank 0's lines.
pub fn ddp_drive(world_sizes: &[usize], iters: usize, bucket_bytes: usize) -> Result<String> {
    let mut table = String::from(
        "| ranks | params | bucket MiB | DDP reduce ms | raw all-reduce ms | DDP overhead |\n|---|---|---|---|---|---|\n",
    );
    for &world in world_sizes {
        let args = [
            "bench".to_string(),
            "ddp-rank".into(),
            "--iters".into(),
            iters.to_string(),
            "--bucket-bytes".into(),
            bucket_bytes.to_string(),
        ];
        let line = run_ranks(world, &args, None)?;
        let v: Vec<f64> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
        let [ddp_ms, raw_ms, n] = v[..] else {
            return Err(Error::Config(format!("bench ddp rank 0 printed {line:?}")));
        };
        let overhead = if world > 1 {
            format!("{:.2}x", ddp_ms / raw_ms)
        } else {
            "-".into()
        };
        table.push_str(&format!(
            "| {world} | {n} | {:.0} | {ddp_ms:.1} | {raw_ms:.1} | {overhead} |\n",
            bucket_bytes as f64 / (1 << 20) as f64,
        ));
    }
    Ok(table)
}

/// Starts `world` processes of this executable with `args` as ranks of a TCP ring on
/// loopback (each on `threads` threads when given), waits for all, and answers what
/// rank 0 printed.
pub(crate) fn run_ranks(world: usize, args: &[String], threads: Option<usize>) -> Result<String> {
    let exe = std::env::current_exe().map_err(|source| Error::Io {
        what: "locating",
        path: "the ringmaster executable".into(),
        source,
    })?;
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|source| Error::Io {
            what: "finding a free port on",
            path: "127.0.0.1".into(),
            source,
        })?
        .port();
    let kids = (0..world)
        .map(|rank| {
            let mut command = Command::new(&exe);
            command
                .args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RINGMASTER_TOKEN", "ringmaster-bench")
                .stdout(Stdio::piped());
            if let Some(threads) = threads {
                for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
                    command.env(var, threads.to_string());
                }
            }
            command.spawn().map_err(|source| Error::Io {
                what: "starting",
                path: exe.clone(),
                source,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut line = String::new();
    for (rank, kid) in kids.into_iter().enumerate() {
        let out = kid.wait_with_output().map_err(|source| Error::Io {
            what: "waiting for",
            path: exe.clone(),
            source,
        })?;
        if !out.status.success() {
            return Err(Error::Config(format!(
                "{} rank {rank} failed ({})",
                args.join(" "),
                out.status
            )));
        }
        if rank == 0 {
            line = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
    }
    Ok(line)
}
