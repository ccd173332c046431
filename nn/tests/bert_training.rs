//! BERT trains: every tensor gets a gradient, dropout is on only in training, padding
//! does not leak into real tokens. Small random configurations, fast enough for CI.

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{Optimizer, SGD, VarBuilder, VarMap};
use ringmaster_nn::models::bert::{
    BertConfig, BertForSequenceClassification, BertInput, Pooling, attention_bias,
};

fn small_config(dropout: f64) -> BertConfig {
    BertConfig::from_json(&format!(
        r#"{{"model_type": "bert", "architectures": ["BertForSequenceClassification"],
            "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 64, "hidden_act": "gelu", "max_position_embeddings": 16,
            "type_vocab_size": 2, "hidden_dropout_prob": {dropout},
            "attention_probs_dropout_prob": {dropout}, "layer_norm_eps": 1e-12}}"#
    ))
    .unwrap()
}

fn model(config: &BertConfig, pooling: Pooling) -> (VarMap, BertForSequenceClassification) {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let model = BertForSequenceClassification::new(vb, config, 3, pooling).unwrap();
    (varmap, model)
}

/// Two sequences of 6 tokens, the second padded after 4; both token types used.
fn batch() -> BertInput {
    let dev = Device::Cpu;
    BertInput {
        input_ids: Tensor::new(&[[1u32, 7, 9, 11, 13, 2], [1, 21, 8, 2, 0, 0]], &dev).unwrap(),
        token_type_ids: Some(
            Tensor::new(&[[0u32, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]], &dev).unwrap(),
        ),
        attention_mask: Some(
            Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &dev).unwrap(),
        ),
    }
}

fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let mut vars: Vec<_> = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

#[test]
fn one_training_step_gives_every_trainable_tensor_a_finite_nonzero_gradient_and_moves_it() {
    for pooling in [Pooling::Cls, Pooling::Mean] {
        let config = small_config(0.1);
        let (varmap, model) = model(&config, pooling);
        let vars = sorted_vars(&varmap);
        // 2 layers x 16 tensors + 5 embedding tensors + classifier (+ pooler).
        let expected = 2 * 16 + 5 + 2 + if pooling == Pooling::Cls { 2 } else { 0 };
        assert_eq!(
            vars.len(),
            expected,
            "{pooling:?}: {:?}",
            vars.iter().map(|v| &v.0).collect::<Vec<_>>()
        );
        let before: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| v.as_tensor().copy().unwrap())
            .collect();

        let logits = model.forward_t(&batch(), true).unwrap().logits;
        let labels = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
        let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in &vars {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{pooling:?}: {name} got no gradient"));
            let abs = grad
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert!(
                abs.iter().all(|g| g.is_finite()),
                "{pooling:?}: {name} has a non-finite gradient"
            );
            assert!(
                abs.iter().any(|&g| g > 0.),
                "{pooling:?}: {name} has an all-zero gradient"
            );
        }

        SGD::new(vars.iter().map(|(_, v)| v.clone()).collect(), 0.1)
            .unwrap()
            .step(&grads)
            .unwrap();
        for ((name, var), before) in vars.iter().zip(before) {
            let moved = (var.as_tensor() - before)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(moved > 0., "{pooling:?}: {name} did not change in the step");
        }
    }
}

#[test]
fn dropout_is_active_only_in_training() {
    let (_, model) = model(&small_config(0.3), Pooling::Cls);
    let logits = |train| {
        model
            .forward_t(&batch(), train)
            .unwrap()
            .logits
            .to_vec2::<f32>()
            .unwrap()
    };
    assert_eq!(
        logits(false),
        logits(false),
        "evaluation must be deterministic"
    );
    assert_ne!(logits(true), logits(true), "training must drop activations");
}

#[test]
fn padding_does_not_change_the_real_tokens() {
    let (_, model) = model(&small_config(0.1), Pooling::Mean);
    let dev = Device::Cpu;
    let short = BertInput {
        input_ids: Tensor::new(&[[1u32, 21, 8, 2]], &dev).unwrap(),
        token_type_ids: None,
        attention_mask: None,
    };
    let padded = BertInput {
        input_ids: Tensor::new(&[[1u32, 21, 8, 2, 5, 5, 5]], &dev).unwrap(),
        token_type_ids: None,
        attention_mask: Some(Tensor::new(&[[1u32, 1, 1, 1, 0, 0, 0]], &dev).unwrap()),
    };
    let a = model.forward_t(&short, false).unwrap();
    let b = model.forward_t(&padded, false).unwrap();
    let hidden_diff = (a.hidden - b.hidden.i((.., 0..4)).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let logit_diff = (a.logits - b.logits)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    assert!(hidden_diff.to_scalar::<f32>().unwrap() < 1e-5);
    assert!(logit_diff.to_scalar::<f32>().unwrap() < 1e-5);
}

#[test]
fn the_attention_bias_stays_finite_in_half_precision() {
    let mask = Tensor::new(&[[1u8, 1, 0]], &Device::Cpu).unwrap();
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        let bias = attention_bias(&mask, dtype)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert_eq!(bias.dims(), [1, 1, 1, 3]);
        let values = bias.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(
            values.iter().all(|v| v.is_finite()),
            "{dtype:?}: {values:?}"
        );
        assert_eq!(values[..2], [0., 0.]);
        assert!(values[2] <= -9000., "{dtype:?}: padding bias {}", values[2]);
    }
}

#[test]
fn a_sequence_longer_than_the_position_table_is_an_error() {
    let (_, model) = model(&small_config(0.1), Pooling::Cls);
    let input = BertInput {
        input_ids: Tensor::ones((1, 17), DType::U32, &Device::Cpu).unwrap(),
        token_type_ids: None,
        attention_mask: None,
    };
    let err = model.forward_t(&input, false).unwrap_err().to_string();
    assert!(
        err.contains("sequence length 17 exceeds max_position_embeddings 16"),
        "{err}"
    );
}

/// Unpadded inference: sequences packed end to end give the logits the padded batch gives.
#[test]
fn packed_sequences_classify_as_the_padded_batch_does() {
    use ringmaster_nn::models::bert::Sequence;
    for pooling in [Pooling::Cls, Pooling::Mean] {
        let (_, model) = model(&small_config(0.1), pooling);
        let padded = model.forward_t(&batch(), false).unwrap().logits;
        let packed = model
            .classify_packed(&[
                Sequence {
                    ids: &[1, 7, 9, 11, 13, 2],
                    types: &[0, 0, 0, 1, 1, 1],
                },
                Sequence {
                    ids: &[1, 21, 8, 2],
                    types: &[0, 0, 1, 1],
                },
            ])
            .unwrap();
        let difference = (padded - packed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            difference < 1e-5,
            "{pooling:?}: packed differs by {difference}"
        );
        let empty = model.classify_packed(&[Sequence {
            ids: &[],
            types: &[],
        }]);
        assert!(empty.unwrap_err().to_string().contains("1 to 16 tokens"));
    }
}
