//! The ResNet ops' hand-written backward passes against finite differences, and their
//! forward passes against candle's own ops where those exist.

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use ringmaster_nn::gradcheck::check_gradient;
use ringmaster_nn::models::batch_norm::{BatchNorm2d, is_batch_norm_buffer};
use ringmaster_nn::ops::batch_norm::{batch_norm_train, batch_norm_train_composed};
use ringmaster_nn::ops::conv2d::{Conv2dParams, conv2d};
use ringmaster_nn::ops::max_pool::MaxPool2d;
use ringmaster_nn::ops::residual::add_relu;

/// Distinct values (a permutation of 0..n spread over [-1, 1)), so no window has a tie
/// that a finite-difference probe could flip.
fn distinct(shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let values: Vec<f64> = (0..n)
        .map(|i| ((i * 7919) % n) as f64 / n as f64 * 2.0 - 1.0)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu)
}

/// A fixed random weighting, so that the loss gradient differs per output element.
fn weights_like(t: &Tensor) -> Result<Tensor> {
    Tensor::randn(0f64, 1., t.shape(), &Device::Cpu)
}

#[test]
fn max_pool_backward_matches_finite_differences() -> Result<()> {
    for (kernel, stride, padding) in [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 0), (2, 1, 1)] {
        let pool = MaxPool2d::new(kernel, stride, padding)?;
        let x = distinct(&[2, 3, 7, 6])?;
        let w = weights_like(&pool.forward(&x)?)?;
        let check = check_gradient(&x, 1e-6, |x| (pool.forward(x)? * &w)?.sum_all())?;
        assert!(
            check.max_abs_diff < 1e-6,
            "kernel {kernel} stride {stride} padding {padding}: {check:?}"
        );
    }
    Ok(())
}

#[test]
fn max_pool_forward_matches_candle_and_pads_with_minus_infinity() -> Result<()> {
    let x = distinct(&[2, 3, 8, 8])?;
    let ours = MaxPool2d::new(2, 2, 0)?.forward(&x)?;
    let candle = x.max_pool2d(2)?;
    let diff = (ours - candle)?.abs()?.max_all()?.to_scalar::<f64>()?;
    assert_eq!(diff, 0.0);

    // Padding never wins, even over negative inputs.
    let x = (Tensor::arange(0f32, 16., &Device::Cpu)?.reshape((1, 1, 4, 4))? - 100.)?;
    let pooled = MaxPool2d::new(3, 2, 1)?
        .forward(&x)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(pooled, vec![-95., -93., -87., -85.]);
    Ok(())
}

#[test]
fn max_pool_f32_backward_equals_f64() -> Result<()> {
    let pool = MaxPool2d::new(3, 2, 1)?;
    let x64 = Var::from_tensor(&distinct(&[2, 4, 9, 9])?)?;
    let w = weights_like(&pool.forward(&x64)?)?;
    let g64 = (pool.forward(&x64)? * &w)?.sum_all()?.backward()?;
    let x32 = Var::from_tensor(&x64.to_dtype(DType::F32)?)?;
    let g32 = (pool.forward(&x32)? * w.to_dtype(DType::F32)?)?
        .sum_all()?
        .backward()?;
    let (g64, g32) = (g64.get(&x64).unwrap(), g32.get(&x32).unwrap());
    let diff = (g64 - g32.to_dtype(DType::F64)?)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?;
    assert!(diff < 1e-6, "{diff}");
    Ok(())
}

/// As in PyTorch: a NaN in a window is its maximum (it propagates), the first of tied
/// maxima takes the gradient, and the gradient reaches the NaN it came from.
#[test]
fn max_pool_propagates_nan_and_routes_ties_to_the_first() -> Result<()> {
    let x = Var::new(
        &[[[[1f32, 5., 5., 2.], [0., f32::NAN, 3., 5.]]]],
        &Device::Cpu,
    )?;
    let pooled = MaxPool2d::new(2, 2, 0)?.forward(&x)?;
    let values = pooled.flatten_all()?.to_vec1::<f32>()?;
    assert!(values[0].is_nan() && values[1] == 5.0, "{values:?}");
    let grads = pooled.sum_all()?.backward()?;
    let grad = grads.get(&x).unwrap().flatten_all()?.to_vec1::<f32>()?;
    assert_eq!(grad, [0., 0., 1., 0., 0., 1., 0., 0.]);
    Ok(())
}

#[test]
fn max_pool_rejects_bad_geometry() {
    let err = MaxPool2d::new(3, 2, 2).unwrap_err().to_string();
    assert!(
        err.contains("padding 2 must be at most half the kernel 3"),
        "{err}"
    );
    let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
    let err = MaxPool2d::new(5, 1, 0)
        .unwrap()
        .forward(&x)
        .unwrap_err()
        .to_string();
    assert!(err.contains("smaller than the kernel"), "{err}");
}

/// `sum(w * batch_norm(x, gamma, beta))` with the non-probed arguments fixed.
fn bn_loss(x: &Tensor, gamma: &Tensor, beta: &Tensor, w: &Tensor, relu: bool) -> Result<Tensor> {
    (batch_norm_train(x, gamma, beta, 1e-5, relu)?.output * w)?.sum_all()
}

#[test]
fn batch_norm_backward_matches_finite_differences() -> Result<()> {
    let x = (distinct(&[3, 4, 3, 2])? * 3.)?;
    let gamma = Tensor::new(&[0.5f64, 1.5, -1.0, 2.0], &Device::Cpu)?;
    let beta = Tensor::new(&[0.1f64, -0.2, 0.3, 0.0], &Device::Cpu)?;
    let w = weights_like(&x)?;
    for relu in [false, true] {
        let by_x = check_gradient(&x, 1e-6, |x| bn_loss(x, &gamma, &beta, &w, relu))?;
        let by_gamma = check_gradient(&gamma, 1e-6, |g| bn_loss(&x, g, &beta, &w, relu))?;
        let by_beta = check_gradient(&beta, 1e-6, |b| bn_loss(&x, &gamma, b, &w, relu))?;
        for (what, check) in [("x", by_x), ("gamma", by_gamma), ("beta", by_beta)] {
            assert!(
                check.max_abs_diff < 1e-6,
                "relu {relu}: d/d{what}: {check:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn fused_batch_norm_equals_composed_in_f32() -> Result<()> {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&(Tensor::randn(0f32, 2., (4, 8, 5, 5), &dev)? + 1.)?)?;
    let gamma = Var::from_tensor(&Tensor::randn(1f32, 0.3, 8, &dev)?)?;
    let beta = Var::from_tensor(&Tensor::randn(0f32, 0.3, 8, &dev)?)?;
    let w = Tensor::randn(0f32, 1., (4, 8, 5, 5), &dev)?;
    for relu in [false, true] {
        let fused = batch_norm_train(&x, &gamma, &beta, 1e-5, relu)?;
        let composed = batch_norm_train_composed(&x, &gamma, &beta, 1e-5, relu)?;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(max_diff(&fused.output, &composed.output)? < 1e-5);
        assert!(max_diff(&fused.mean, &composed.mean)? < 1e-5);
        assert!(max_diff(&fused.var, &composed.var)? < 1e-5);
        let g_fused = (fused.output * &w)?.sum_all()?.backward()?;
        let g_composed = (composed.output * &w)?.sum_all()?.backward()?;
        for var in [&x, &gamma, &beta] {
            let (a, b) = (g_fused.get(var).unwrap(), g_composed.get(var).unwrap());
            assert!(max_diff(a, b)? < 1e-4, "relu {relu}: {:?}", var.shape());
        }
    }
    Ok(())
}

#[test]
fn batch_norm_needs_more_than_one_value_per_channel_in_training() -> Result<()> {
    let x = Tensor::ones((1, 2, 1, 1), DType::F32, &Device::Cpu)?;
    let ones = Tensor::ones(2, DType::F32, &Device::Cpu)?;
    let err = batch_norm_train(&x, &ones, &ones, 1e-5, false)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("more than one value per channel"), "{err}");
    Ok(())
}

#[test]
fn batch_norm_buffers_are_recognised_by_name() {
    for name in [
        "bn1.running_mean",
        "layer1.0.bn2.running_var",
        "layer2.0.downsample.1.num_batches_tracked",
    ] {
        assert!(is_batch_norm_buffer(name), "{name}");
    }
    for name in [
        "bn1.weight",
        "bn1.bias",
        "fc.weight",
        "running_mean_proj.weight",
    ] {
        assert!(!is_batch_norm_buffer(name), "{name}");
    }
}

#[test]
fn batch_norm_module_updates_running_statistics_only_in_training() -> Result<()> {
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let bn = BatchNorm2d::new(1, vb)?;
    // One channel holding 1, 2, 3, 4: mean 2.5, unbiased variance 5/3.
    let x = Tensor::new(&[1f32, 2., 3., 4.], &Device::Cpu)?.reshape((2, 1, 1, 2))?;
    bn.forward_t(&x, false)?;
    assert_eq!(bn.running_mean().to_vec1::<f32>()?, [0.0]);
    bn.forward_t(&x, true)?;
    let (mean, var) = (
        bn.running_mean().to_vec1::<f32>()?[0],
        bn.running_var().to_vec1::<f32>()?[0],
    );
    assert!((mean - 0.25).abs() < 1e-6, "{mean}");
    assert!((var - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6, "{var}");
    // The update is visible through the VarMap, so it is saved with the checkpoint.
    let saved = varmap.data().lock().unwrap()["running_mean"].to_vec1::<f32>()?;
    assert_eq!(saved, [mean]);
    Ok(())
}

/// (input NCHW, weight OIHW, stride, padding): the ResNet shapes plus odd ones; the
/// last three have outputs wide enough (>= 32) for the row-copy im2col path; three have
/// kernel taps that read only padding (ResNet's last stage on 32x32 images: 1x1 and 2x2
/// planes).
const CONV_CASES: [([usize; 4], [usize; 4], usize, usize); 11] = [
    ([2, 4, 1, 1], [3, 4, 3, 3], 1, 1),
    ([2, 3, 2, 2], [4, 3, 3, 3], 2, 1),
    ([2, 3, 7, 6], [4, 3, 3, 3], 1, 1),
    ([3, 2, 8, 8], [5, 2, 3, 3], 2, 1),
    ([2, 4, 5, 5], [3, 4, 1, 1], 2, 0),
    ([1, 3, 9, 9], [2, 3, 7, 7], 2, 3),
    ([2, 2, 6, 5], [3, 2, 2, 3], 1, 0),
    ([5, 3, 4, 4], [2, 3, 3, 3], 1, 1),
    ([2, 2, 5, 36], [3, 2, 3, 3], 1, 1),
    ([1, 2, 6, 70], [2, 2, 3, 3], 2, 1),
    ([1, 2, 1, 40], [2, 2, 3, 3], 1, 1),
];

#[test]
fn conv2d_backward_matches_finite_differences() -> Result<()> {
    for (x_shape, w_shape, stride, padding) in CONV_CASES {
        let params = Conv2dParams { stride, padding };
        let x = Tensor::randn(0f64, 1., &x_shape, &Device::Cpu)?;
        let weight = Tensor::randn(0f64, 1., &w_shape, &Device::Cpu)?;
        let w = weights_like(&conv2d(&x, &weight, params)?)?;
        let by_x = check_gradient(&x, 1e-6, |x| (conv2d(x, &weight, params)? * &w)?.sum_all())?;
        let by_w = check_gradient(&weight, 1e-6, |k| (conv2d(&x, k, params)? * &w)?.sum_all())?;
        for (what, check) in [("x", by_x), ("weight", by_w)] {
            assert!(
                check.max_rel_diff < 1e-7,
                "{x_shape:?} * {w_shape:?} stride {stride} padding {padding}: d/d{what} {check:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn conv2d_forward_and_backward_equal_candle_in_f32() -> Result<()> {
    for (x_shape, w_shape, stride, padding) in CONV_CASES {
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., &x_shape, &Device::Cpu)?)?;
        let weight = Var::from_tensor(&Tensor::randn(0f32, 1., &w_shape, &Device::Cpu)?)?;
        let ours = conv2d(&x, &weight, Conv2dParams { stride, padding })?;
        let candle = x.conv2d(&weight, padding, stride, 1, 1)?;
        let w = Tensor::randn(0f32, 1., ours.shape(), &Device::Cpu)?;
        let (g_ours, g_candle) = (
            (&ours * &w)?.sum_all()?.backward()?,
            (&candle * &w)?.sum_all()?.backward()?,
        );
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
        };
        assert!(
            max_diff(&ours, &candle)? < 1e-4,
            "forward {x_shape:?} * {w_shape:?}"
        );
        for var in [&x, &weight] {
            let diff = max_diff(g_ours.get(var).unwrap(), g_candle.get(var).unwrap())?;
            assert!(
                diff < 1e-4,
                "gradient {:?} of {x_shape:?} * {w_shape:?}: {diff}",
                var.shape()
            );
        }
    }
    Ok(())
}

#[test]
fn conv2d_rejects_mismatched_channels() {
    let x = Tensor::zeros((1, 3, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let w = Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap();
    let err = conv2d(
        &x,
        &w,
        Conv2dParams {
            stride: 1,
            padding: 1,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("input has 3 channels"), "{err}");
}

#[test]
fn add_relu_backward_matches_finite_differences() -> Result<()> {
    let a = distinct(&[2, 3, 4, 5])?;
    let b = (distinct(&[2, 3, 4, 5])?.flip(&[3])? * 0.37)?;
    let w = weights_like(&a)?;
    let by_a = check_gradient(&a, 1e-6, |a| (add_relu(a, &b)? * &w)?.sum_all())?;
    let by_b = check_gradient(&b, 1e-6, |b| (add_relu(&a, b)? * &w)?.sum_all())?;
    for (what, check) in [("a", by_a), ("b", by_b)] {
        assert!(check.max_abs_diff < 1e-6, "d/d{what}: {check:?}");
    }
    let err = add_relu(&a, &a.flatten_all()?).unwrap_err().to_string();
    assert!(err.contains("shapes"), "{err}");
    Ok(())
}
