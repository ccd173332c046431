//! The optimizer step pipeline on a small MLP: accumulation, clipping, frozen variables,
//! NaN/Inf handling and bit-for-bit resume from a checkpoint.

use candle_core::{DType, Device, Tensor};
use candle_nn::Init;
use ringmaster_trainer::checkpoint;
use ringmaster_trainer::optim::{OptimizerConfig, Schedule};
use ringmaster_trainer::params::{ModelVars, NamePatterns, default_buffer_patterns};
use ringmaster_trainer::rng::TrainRng;
use ringmaster_trainer::selftest::{Mlp, batch, init_deterministic, loss};
use ringmaster_trainer::step::{NonFinitePolicy, StepConfig, StepOutcome, Stepper};
use ringmaster_trainer::{Error, Result};

fn model(frozen: &[&str]) -> Result<(ModelVars, Mlp)> {
    let vars = ModelVars::new(NamePatterns::parse(frozen)?, default_buffer_patterns());
    let mlp = Mlp::new(vars.var_builder(DType::F32, &Device::Cpu), 16)?;
    init_deterministic(&vars, 11)?;
    Ok((vars, mlp))
}

fn snapshot(vars: &ModelVars) -> Vec<(String, Vec<u32>)> {
    vars.all()
        .into_iter()
        .map(|v| {
            let bits = v.var.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (v.name, bits.iter().map(|x| x.to_bits()).collect())
        })
        .collect()
}

fn max_diff(a: &[(String, Vec<u32>)], b: &[(String, Vec<u32>)]) -> f32 {
    a.iter()
        .zip(b)
        .flat_map(|((na, a), (nb, b))| {
            assert_eq!(na, nb);
            a.iter()
                .zip(b)
                .map(|(x, y)| (f32::from_bits(*x) - f32::from_bits(*y)).abs())
        })
        .fold(0.0, f32::max)
}

#[test]
fn accumulated_micro_batches_equal_one_big_batch() -> Result<()> {
    let run = |accumulation: usize| -> Result<_> {
        let (vars, mlp) = model(&[])?;
        let mut cfg = StepConfig::new(0.5);
        cfg.accumulation = accumulation;
        // SGD, not Adam: Adam hardly notices a wrongly scaled gradient.
        let mut stepper = Stepper::new(cfg, &vars, OptimizerConfig::sgd(0.9, false, 0.0), None)?;
        let micro = 8 / accumulation as u64;
        for step in 0..3u64 {
            for k in 0..accumulation as u64 {
                let first = step * 8 + k * micro;
                let (x, y) = batch(first..first + micro, &Device::Cpu)?;
                let outcome = stepper.backward(&loss(&mlp, &x, &y)?)?;
                let last = k + 1 == accumulation as u64;
                assert_eq!(matches!(outcome, StepOutcome::Updated { .. }), last);
            }
        }
        assert_eq!(stepper.step(), 3);
        Ok(snapshot(&vars))
    };
    let (big, accumulated) = (run(1)?, run(4)?);
    let (start_vars, _) = model(&[])?;
    assert!(
        max_diff(&big, &snapshot(&start_vars)) > 1e-3,
        "training moved the weights"
    );
    let diff = max_diff(&big, &accumulated);
    assert!(diff < 1e-6, "accumulated run differs by {diff}");
    Ok(())
}

#[test]
fn clipping_bounds_the_global_gradient_norm() -> Result<()> {
    let (vars, mlp) = model(&[])?;
    let before = snapshot(&vars);
    let mut cfg = StepConfig::new(1.0);
    cfg.clip_norm = Some(1e-3);
    let mut stepper = Stepper::new(cfg, &vars, OptimizerConfig::sgd(0.0, false, 0.0), None)?;
    let (x, y) = batch(0..8, &Device::Cpu)?;
    let StepOutcome::Updated { grad_norm, .. } = stepper.backward(&loss(&mlp, &x, &y)?)? else {
        panic!("expected an update")
    };
    assert!(
        grad_norm > 1e-2,
        "unclipped norm {grad_norm} should exceed the limit"
    );
    // Plain SGD with lr 1 moves the parameters by exactly the clipped gradient.
    let moved: f64 = before
        .iter()
        .zip(snapshot(&vars))
        .flat_map(|((_, a), (_, b))| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (f32::from_bits(*x) as f64 - f32::from_bits(y) as f64).powi(2))
                .collect::<Vec<_>>()
        })
        .sum::<f64>()
        .sqrt();
    assert!((moved - 1e-3).abs() < 1e-6, "update norm {moved}");
    Ok(())
}

#[test]
fn frozen_variables_stay_bit_identical_and_get_no_state() -> Result<()> {
    let (vars, mlp) = model(&["fc1.*"])?;
    let before = snapshot(&vars);
    let mut stepper = Stepper::new(
        StepConfig::new(0.05),
        &vars,
        OptimizerConfig::adamw(0.01),
        None,
    )?;
    let names: Vec<&str> = stepper.params().iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["fc2.bias", "fc2.weight"]);
    for step in 0..3u64 {
        let (x, y) = batch(step * 8..step * 8 + 8, &Device::Cpu)?;
        stepper.backward(&loss(&mlp, &x, &y)?)?;
    }
    let after = snapshot(&vars);
    for ((name, a), (_, b)) in before.iter().zip(&after) {
        assert_eq!(a == b, name.starts_with("fc1."), "{name}");
    }
    let (meta, tensors) = stepper.optimizer().state();
    assert!(meta.steps.keys().all(|n| n.starts_with("fc2.")));
    assert!(tensors.iter().all(|(n, _)| n.starts_with("fc2.")));
    Ok(())
}

/// `a.weight` and `c.weight` get infinite gradients (sqrt at 0); the loss stays finite.
fn poisoned(policy: NonFinitePolicy) -> Result<(ModelVars, Stepper, Tensor)> {
    let vars = ModelVars::new(NamePatterns::default(), default_buffer_patterns());
    let vb = vars.var_builder(DType::F32, &Device::Cpu);
    let b = vb.get_with_hints((1, 2), "b.weight", Init::Const(1.0))?;
    let c = vb.get_with_hints((1, 2), "c.weight", Init::Const(0.0))?;
    let a = vb.get_with_hints((1, 2), "a.weight", Init::Const(0.0))?;
    let loss = ((a.sqrt()?.sum_all()? + b.sqr()?.sum_all()?)? + c.sqrt()?.sum_all()?)?;
    let mut cfg = StepConfig::new(0.1);
    cfg.non_finite = policy;
    let stepper = Stepper::new(cfg, &vars, OptimizerConfig::adamw(0.0), None)?;
    Ok((vars, stepper, loss))
}

#[test]
fn non_finite_gradients_stop_with_the_step_and_tensor_named() -> Result<()> {
    let (_, mut stepper, loss) = poisoned(NonFinitePolicy::Error)?;
    let err = stepper.backward(&loss).unwrap_err();
    assert!(matches!(err, Error::NonFinite { step: 1, .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("step 1") && msg.contains("gradient of a.weight"),
        "{msg}"
    );
    Ok(())
}

#[test]
fn non_finite_gradients_can_skip_the_update() -> Result<()> {
    let (vars, mut stepper, loss) = poisoned(NonFinitePolicy::Skip)?;
    let before = snapshot(&vars);
    let outcome = stepper.backward(&loss)?;
    assert_eq!(
        outcome,
        StepOutcome::Skipped {
            step: 1,
            what: "the gradient of a.weight".into()
        }
    );
    assert_eq!(snapshot(&vars), before, "a skipped step changes nothing");
    assert_eq!(stepper.step(), 1);
    Ok(())
}

#[test]
fn a_nan_loss_is_reported_as_the_loss() -> Result<()> {
    let (vars, mlp) = model(&[])?;
    let mut stepper = Stepper::new(
        StepConfig::new(0.1),
        &vars,
        OptimizerConfig::adamw(0.0),
        None,
    )?;
    let (x, y) = batch(0..4, &Device::Cpu)?;
    let nan = (loss(&mlp, &x, &y)? * f64::NAN)?;
    let msg = stepper.backward(&nan).unwrap_err().to_string();
    assert!(msg.contains("step 1: the loss is not finite"), "{msg}");
    Ok(())
}

struct Run {
    vars: ModelVars,
    mlp: Mlp,
    stepper: Stepper,
    rng: TrainRng,
}

fn fresh_run(optimizer: &OptimizerConfig) -> Result<Run> {
    let (vars, mlp) = model(&[])?;
    let cfg = StepConfig {
        lr: 0.05,
        schedule: Schedule::WarmupCosine {
            warmup: 2,
            total: 6,
        },
        accumulation: 2,
        clip_norm: Some(0.5),
        non_finite: NonFinitePolicy::Error,
    };
    let stepper = Stepper::new(cfg, &vars, optimizer.clone(), None)?;
    Ok(Run {
        vars,
        mlp,
        stepper,
        rng: TrainRng::new(3),
    })
}

/// Optimizer steps whose micro-batches are drawn from the run's random stream.
fn train(run: &mut Run, steps: u64) -> Result<()> {
    for _ in 0..steps * 2 {
        let picks: Vec<u64> = (0..4).map(|_| run.rng.below(1000) as u64).collect();
        let (x, y) = batch(picks, &Device::Cpu)?;
        run.stepper.backward(&loss(&run.mlp, &x, &y)?)?;
    }
    Ok(())
}

#[test]
fn resumed_training_continues_bit_for_bit() -> Result<()> {
    for optimizer in [
        OptimizerConfig::adamw(0.01),
        OptimizerConfig::sgd(0.9, true, 1e-4),
    ] {
        let mut straight = fresh_run(&optimizer)?;
        train(&mut straight, 6)?;

        let dir = tempdir("resume");
        let mut first = fresh_run(&optimizer)?;
        train(&mut first, 3)?;
        checkpoint::save(&dir, &first.vars, &first.stepper, 1, &first.rng)?;
        drop(first);

        let mut resumed = fresh_run(&optimizer)?;
        init_deterministic(&resumed.vars, 999)?; // the checkpoint must overwrite everything
        let state = checkpoint::load(&dir, &resumed.vars, &mut resumed.stepper)?;
        assert_eq!((state.step, state.epoch), (3, 1));
        resumed.rng = state.rng;
        train(&mut resumed, 3)?;

        assert_eq!(
            snapshot(&resumed.vars),
            snapshot(&straight.vars),
            "{optimizer:?}"
        );
        let dir2 = tempdir("resume-end");
        checkpoint::save(&dir2, &straight.vars, &straight.stepper, 1, &straight.rng)?;
        checkpoint::save(&dir, &resumed.vars, &resumed.stepper, 1, &resumed.rng)?;
        for file in [checkpoint::OPTIMIZER_FILE, checkpoint::STATE_FILE] {
            assert_eq!(
                std::fs::read(dir.join(file)).unwrap(),
                std::fs::read(dir2.join(file)).unwrap(),
                "{file}"
            );
        }
    }
    Ok(())
}

#[test]
fn a_checkpoint_missing_a_tensor_is_rejected_by_name() -> Result<()> {
    let dir = tempdir("bad-checkpoint");
    let mut run = fresh_run(&OptimizerConfig::adamw(0.01))?;
    train(&mut run, 1)?;
    checkpoint::save(&dir, &run.vars, &run.stepper, 0, &run.rng)?;
    let model_file = dir.join(checkpoint::MODEL_FILE);
    let mut tensors = candle_core::safetensors::load(&model_file, &Device::Cpu)?;
    tensors.remove("fc2.bias");
    candle_core::safetensors::save(&tensors, &model_file)?;
    let mut other = fresh_run(&OptimizerConfig::adamw(0.01))?;
    let msg = checkpoint::load(&dir, &other.vars, &mut other.stepper)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("fc2.bias") && msg.contains("model.safetensors"),
        "{msg}"
    );

    std::fs::write(dir.join(checkpoint::STATE_FILE), b"{\"step\": \"x\"}").unwrap();
    let msg = checkpoint::load(&dir, &other.vars, &mut other.stepper)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("trainer_state.json"), "{msg}");
    Ok(())
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ringmaster-trainer-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn bf16_parameters_train_through_f32_master_weights() -> Result<()> {
    let vars = ModelVars::new(NamePatterns::default(), default_buffer_patterns());
    let mlp = Mlp::new(vars.var_builder(DType::BF16, &Device::Cpu), 16)?;
    init_deterministic(&vars, 11)?;
    let start = snapshot_f32(&vars);
    // Updates of about 1e-5 are far below bf16's resolution (2^-8 relative): stored in
    // bf16 alone they would round away.
    let mut stepper = Stepper::new(
        StepConfig::new(1e-4),
        &vars,
        OptimizerConfig::sgd(0.0, false, 0.0),
        None,
    )?;
    for step in 0..5u64 {
        let (x, y) = batch(step * 8..step * 8 + 8, &Device::Cpu)?;
        let logits = candle_core::Module::forward(&mlp, &x.to_dtype(DType::BF16)?)?;
        let loss = candle_nn::loss::cross_entropy(&logits.to_dtype(DType::F32)?, &y)?;
        stepper.backward(&loss)?;
    }
    let model = vars.trainable();
    for (p, master) in model.iter().zip(stepper.master_params()) {
        assert_eq!(master.var.dtype(), DType::F32, "{}", master.name);
        let master_values = master.var.flatten_all()?.to_vec1::<f32>()?;
        let moved = master_values
            .iter()
            .zip(&start[&p.name])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            moved > 1e-6 && moved < 1e-3,
            "{}: master moved {moved}",
            p.name
        );
        let rounded = master.var.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
        let model_values = p
            .var
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert_eq!(
            model_values,
            rounded.flatten_all()?.to_vec1::<f32>()?,
            "{}",
            p.name
        );
    }
    let dir = tempdir("bf16");
    checkpoint::save(&dir, &vars, &stepper, 0, &TrainRng::new(0))?;
    let saved = candle_core::safetensors::load(dir.join(checkpoint::MODEL_FILE), &Device::Cpu)?;
    assert_eq!(
        saved["fc1.weight"].dtype(),
        DType::F32,
        "checkpoints keep the masters"
    );
    Ok(())
}

fn snapshot_f32(vars: &ModelVars) -> std::collections::HashMap<String, Vec<f32>> {
    vars.all()
        .into_iter()
        .map(|v| {
            let t = v.var.to_dtype(DType::F32).unwrap();
            (v.name, t.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect()
}

#[test]
fn updates_follow_the_learning_rate_schedule() -> Result<()> {
    let (vars, mlp) = model(&[])?;
    let mut cfg = StepConfig::new(0.1);
    cfg.schedule = Schedule::WarmupLinear {
        warmup: 2,
        total: 4,
    };
    let mut stepper = Stepper::new(cfg, &vars, OptimizerConfig::sgd(0.0, false, 0.0), None)?;
    let mut lrs = Vec::new();
    for step in 0..5u64 {
        let (x, y) = batch(step * 4..step * 4 + 4, &Device::Cpu)?;
        match stepper.backward(&loss(&mlp, &x, &y)?)? {
            StepOutcome::Updated { lr, .. } => lrs.push(lr),
            other => panic!("{other:?}"),
        }
    }
    let want = [0.0, 0.05, 0.1, 0.05, 0.0];
    assert!(
        lrs.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
        "{lrs:?}"
    );
    Ok(())
}
