use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};

use super::*;
use crate::params::Role;

const GRADS: [[f32; 3]; 4] = [
    [0.5, -0.3, 2.0],
    [-0.1, 0.4, -1.5],
    [0.25, 0.25, 0.0],
    [1e-3, -2.0, 0.7],
];
const START: [f32; 3] = [1.0, -0.5, 0.25];
// From tests/golden/optim_torch.py (torch 2.x, foreach=False).
const TORCH_ADAMW: [f32; 3] = [0.7295576, -0.41280648, 0.11235445];
const TORCH_SGD_NESTEROV: [f32; 3] = [0.75059164, -0.19651164, -0.18666454];
const TORCH_SGD_MOMENTUM: [f32; 3] = [0.8096, -0.35713997, -0.13495];

fn param(name: &str, values: &[f32]) -> NamedVar {
    NamedVar {
        name: name.into(),
        var: Var::from_slice(values, (1, values.len()), &Device::Cpu).unwrap(),
        role: Role::Trainable,
    }
}

fn grads(values: &[f32]) -> Grads {
    Grads::from_slots(vec![Some(
        Tensor::from_slice(values, (1, values.len()), &Device::Cpu).unwrap(),
    )])
    .unwrap()
}

fn values(p: &NamedVar) -> Vec<f32> {
    p.var.flatten_all().unwrap().to_vec1().unwrap()
}

fn run(config: OptimizerConfig, lr: f64) -> Vec<f32> {
    let params = [param("fc.weight", &START)];
    let mut opt = Optimizer::new(config, &params);
    for g in GRADS {
        opt.step(&params, &grads(&g), lr).unwrap();
    }
    values(&params[0])
}

fn assert_close(got: &[f32], want: &[f32], tol: f32) {
    assert!(
        got.iter().zip(want).all(|(a, b)| (a - b).abs() <= tol),
        "got {got:?}, want {want:?}"
    );
}

#[test]
fn adamw_matches_torch() {
    assert_close(&run(OptimizerConfig::adamw(0.01), 0.1), &TORCH_ADAMW, 1e-6);
}

#[test]
fn sgd_matches_torch() {
    assert_close(
        &run(OptimizerConfig::sgd(0.9, true, 0.01), 0.1),
        &TORCH_SGD_NESTEROV,
        1e-6,
    );
    let damped = OptimizerConfig::Sgd {
        momentum: 0.9,
        dampening: 0.1,
        nesterov: false,
        weight_decay: 0.0,
    };
    assert_close(&run(damped, 0.1), &TORCH_SGD_MOMENTUM, 1e-6);
}

/// AdamW as written in Loshchilov & Hutter / the PyTorch docs, in f64.
fn textbook_adamw(lr: f64, wd: f64) -> Vec<f64> {
    let (b1, b2, eps) = (0.9f64, 0.999f64, 1e-8);
    let mut p: Vec<f64> = START.iter().map(|&x| x as f64).collect();
    let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
    for (t, g) in GRADS.iter().enumerate() {
        let t = t as i32 + 1;
        for i in 0..3 {
            let g = g[i] as f64;
            p[i] -= lr * wd * p[i];
            m[i] = b1 * m[i] + (1.0 - b1) * g;
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let m_hat = m[i] / (1.0 - b1.powi(t));
            let v_hat = v[i] / (1.0 - b2.powi(t));
            p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
        }
    }
    p
}

#[test]
fn fused_and_candle_op_updates_both_match_the_textbook() {
    let want: Vec<f32> = textbook_adamw(0.1, 0.01)
        .iter()
        .map(|&x| x as f32)
        .collect();
    for fused in [true, false] {
        let p = param("w", &START);
        let m = Var::zeros((1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let v = Var::zeros((1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        for (t, g) in GRADS.iter().enumerate() {
            let g = Tensor::from_slice(g, (1, 3), &Device::Cpu).unwrap();
            let h = adamw::Hyper {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                step: t as u64 + 1,
            };
            if fused {
                adamw::update_fused(&p.var, &g, &m, &v, h).unwrap();
            } else {
                adamw::update_with_ops(&p.var, &g, &m, &v, h).unwrap();
            }
        }
        assert_close(&values(&p), &want, 1e-6);
    }
}

#[test]
fn fused_and_candle_op_sgd_updates_both_match_torch() {
    for fused in [true, false] {
        let p = param("w", &START);
        let buffer = Var::zeros((1, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
        let h = sgd::Hyper {
            lr: 0.1,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 0.01,
        };
        for (t, g) in GRADS.iter().enumerate() {
            let g = Tensor::from_slice(g, (1, 3), &Device::Cpu).unwrap();
            let update = if fused {
                sgd::update_fused
            } else {
                sgd::update_with_ops
            };
            update(&p.var, &g, Some(&buffer), t == 0, h).unwrap();
        }
        assert_close(&values(&p), &TORCH_SGD_NESTEROV, 1e-6);
    }
}

#[test]
fn biases_and_norm_weights_are_not_decayed() {
    let params = [
        param("fc.weight", &[2.0, 2.0]),
        param("fc.bias", &[2.0, 2.0]),
        param("LayerNorm.weight", &[2.0, 2.0]),
    ];
    for config in [
        OptimizerConfig::adamw(0.5),
        OptimizerConfig::sgd(0.0, false, 0.5),
    ] {
        for p in &params {
            p.var
                .set(&Tensor::new(&[[2f32, 2.0]], &Device::Cpu).unwrap())
                .unwrap();
        }
        let mut opt = Optimizer::new(config, &params);
        let zero = || Some(Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap());
        opt.step(
            &params,
            &Grads::from_slots(vec![zero(), zero(), zero()]).unwrap(),
            0.1,
        )
        .unwrap();
        // AdamW: 2 * (1 - 0.1 * 0.5); SGD's L2 term: 2 - 0.1 * 0.5 * 2. Both 1.9.
        assert_close(&values(&params[0]), &[1.9, 1.9], 1e-6);
        assert_eq!(values(&params[1]), [2.0, 2.0]);
        assert_eq!(values(&params[2]), [2.0, 2.0]);
    }
}

#[test]
fn parameters_without_gradients_are_left_alone() {
    let params = [param("a.weight", &[1.0]), param("b.weight", &[1.0])];
    let mut opt = Optimizer::new(OptimizerConfig::adamw(0.1), &params);
    let g = Grads::from_slots(vec![
        None,
        Some(Tensor::new(&[[1f32]], &Device::Cpu).unwrap()),
    ])
    .unwrap();
    opt.step(&params, &g, 0.1).unwrap();
    assert_eq!(values(&params[0]), [1.0]);
    assert_ne!(values(&params[1]), [1.0]);
    assert_eq!(opt.state().0.steps.keys().collect::<Vec<_>>(), ["b.weight"]);
}

#[test]
fn restored_state_continues_bit_for_bit() {
    for config in [
        OptimizerConfig::adamw(0.01),
        OptimizerConfig::sgd(0.9, true, 0.01),
    ] {
        let a = [param("fc.weight", &START)];
        let mut opt_a = Optimizer::new(config.clone(), &a);
        for g in &GRADS[..2] {
            opt_a.step(&a, &grads(g), 0.1).unwrap();
        }
        let (meta, tensors) = opt_a.state();
        let json = serde_json::to_string(&meta).unwrap();
        let b = [param("fc.weight", &values(&a[0]))];
        let mut opt_b = Optimizer::new(config, &b);
        let tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
        opt_b
            .load_state(&b, &serde_json::from_str(&json).unwrap(), &tensors, "test")
            .unwrap();
        for g in &GRADS[2..] {
            opt_a.step(&a, &grads(g), 0.1).unwrap();
            opt_b.step(&b, &grads(g), 0.1).unwrap();
        }
        let bits = |p: &NamedVar| values(p).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a[0]), bits(&b[0]));
    }
}

#[test]
fn bad_state_is_rejected_with_the_tensor_named() {
    let p = [param("fc.weight", &START)];
    let mut opt = Optimizer::new(OptimizerConfig::adamw(0.01), &p);
    opt.step(&p, &grads(&GRADS[0]), 0.1).unwrap();
    let (meta, tensors) = opt.state();
    let mut tensors: HashMap<String, Tensor> = tensors.into_iter().collect();
    tensors.remove("fc.weight.exp_avg_sq");
    let mut fresh = Optimizer::new(OptimizerConfig::adamw(0.01), &p);
    let err = fresh
        .load_state(&p, &meta, &tensors, "opt.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fc.weight.exp_avg_sq") && err.contains("opt.safetensors"),
        "{err}"
    );

    let mut sgd = Optimizer::new(OptimizerConfig::sgd(0.9, false, 0.0), &p);
    let err = sgd
        .load_state(&p, &meta, &tensors, "opt.safetensors")
        .unwrap_err()
        .to_string();
    assert!(err.contains("AdamW") && err.contains("Sgd"), "{err}");
}
