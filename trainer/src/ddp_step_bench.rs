//! `ringmaster bench ddp-step`: is gradient averaging hidden under backward? A MiniLM-L6
//! training step (random weights, `batch x seq` synthetic tokens, AdamW) on one rank
//! against the same per-rank batch on N ranks (N times the global batch), every rank a
//! process on `threads` threads, the ranks joined by the TCP ring on loopback. Hidden
//! averaging makes N ranks take as long as one. Each rank also times the step with the
//! gradients averaged after backward (what DDP did before the overlap), in the same run.

use candle_core::{DType, Device, Tensor};
use ringmaster_collective::{Communicator, RendezvousConfig, connect_tcp};
use ringmaster_nn::models::bert::{BertConfig, BertForSequenceClassification, BertInput, Pooling};

use crate::bench::{median_ms, run_ranks};
use crate::ddp::{Ddp, DdpConfig};
use crate::error::{Error, Result};
use crate::optim::OptimizerConfig;
use crate::params::{ModelVars, NamePatterns, default_buffer_patterns};
use crate::rng::TrainRng;
use crate::step::{StepConfig, Stepper};

const LR: f64 = 5e-5;

fn adamw() -> OptimizerConfig {
    OptimizerConfig::adamw(0.01)
}

/// Runs the ranks for each world size and tabulates rank 0's medians against one rank.
pub fn drive(
    world_sizes: &[usize],
    batch: usize,
    seq: usize,
    threads: usize,
    iters: usize,
) -> Result<String> {
    check_shape(batch, seq)?;
    if threads == 0 {
        return Err(Error::Config("--threads must be at least 1".into()));
    }
    let mut table = String::from(
        "| ranks | batch per rank | step ms (averaged during backward) | step ms (averaged after backward) | vs 1 rank |\n|---|---|---|---|---|\n",
    );
    let mut single = None;
    for world in std::iter::once(1).chain(world_sizes.iter().copied().filter(|&w| w > 1)) {
        let args = [
            "bench",
            "ddp-step-rank",
            "--batch",
            &batch.to_string(),
            "--seq",
            &seq.to_string(),
            "--iters",
            &iters.to_string(),
        ]
        .map(String::from);
        let line = run_ranks(world, &args, Some(threads))?;
        let v: Vec<f64> = line.split(' ').filter_map(|x| x.parse().ok()).collect();
        let [during, after] = v[..] else {
            return Err(Error::Config(format!(
                "bench ddp-step rank 0 printed {line:?}"
            )));
        };
        let base = *single.get_or_insert(during);
        table.push_str(&format!(
            "| {world} | {batch} | {during:.0} | {after:.0} | {:.2}x |\n",
            during / base
        ));
    }
    Ok(table)
}

/// One rank (RANK/WORLD_SIZE/MASTER_* from the environment); rank 0 prints the median
/// step milliseconds with averaging during and after backward.
pub fn rank(batch: usize, seq: usize, iters: usize) -> Result<()> {
    check_shape(batch, seq)?;
    let comm = connect_tcp(&RendezvousConfig::from_env()?)?;
    let rank = comm.rank();
    let device = Device::Cpu;
    let vars = ModelVars::new(NamePatterns::default(), default_buffer_patterns());
    let model = BertForSequenceClassification::new(
        vars.var_builder(DType::F32, &device),
        &BertConfig::minilm_l6(),
        2,
        Pooling::Cls,
    )?;
    let (input, labels) = synthetic_batch(batch, seq, rank as u64, &device)?;
    let loss = || -> Result<Tensor> {
        let logits = model.forward_t(&input, true)?.logits;
        Ok(candle_nn::loss::cross_entropy(&logits, &labels)?)
    };
    let ddp = Ddp::new(Box::new(comm), &vars, DdpConfig::default())?;
    let mut stepper = Stepper::new(StepConfig::new(LR), &vars, adamw(), Some(ddp))?;
    let during = median_ms(iters, || stepper.backward(&loss()?).map(drop))?;
    stepper
        .ddp_mut()
        .expect("built with DDP")
        .set_overlap(false);
    let after = median_ms(iters, || stepper.backward(&loss()?).map(drop))?;
    if rank == 0 {
        println!("{during} {after}");
    }
    Ok(())
}

/// At least one sequence of [CLS], a token and [SEP], within MiniLM's 512 positions.
fn check_shape(batch: usize, seq: usize) -> Result<()> {
    let positions = BertConfig::minilm_l6().max_position_embeddings;
    if batch == 0 || !(3..=positions).contains(&seq) {
        return Err(Error::Config(format!(
            "--batch {batch} --seq {seq}: need a batch of at least 1 and 3 to {positions} tokens"
        )));
    }
    Ok(())
}

/// Token ids uniform in [1000, 30522) between [CLS] and [SEP], full mask, binary labels.
fn synthetic_batch(
    batch: usize,
    seq: usize,
    seed: u64,
    device: &Device,
) -> Result<(BertInput, Tensor)> {
    let mut rng = TrainRng::new(seed);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|i| match i % seq {
            0 => 101,
            p if p == seq - 1 => 102,
            _ => 1000 + rng.below(30522 - 1000) as u32,
        })
        .collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.below(2) as u32).collect();
    let input = BertInput {
        input_ids: Tensor::from_vec(ids, (batch, seq), device)?,
        token_type_ids: None,
        attention_mask: Some(Tensor::ones((batch, seq), DType::U32, device)?),
    };
    Ok((input, Tensor::from_vec(labels, batch, device)?))
}
