//! A small model on a synthetic task that drives the training machinery end to end over
//! real processes: `ringmaster ddp-selftest` (hidden) runs one rank of it, and the
//! trainer's tests compare runs with different world sizes.

use std::path::PathBuf;

use candle_core::{DType, Device, Module, ModuleT, Tensor};
use candle_nn::{Linear, VarBuilder, linear};
use ringmaster_collective::Communicator;
use ringmaster_nn::models::bert::{BertConfig, BertForSequenceClassification, BertInput, Pooling};
use ringmaster_nn::models::resnet::{ResNet, ResNetConfig};

use crate::ddp::{Ddp, DdpConfig};
use crate::error::{Error, Result};
use crate::optim::OptimizerConfig;
use crate::params::{ModelVars, NamePatterns, default_buffer_patterns};
use crate::rng::TrainRng;
use crate::step::{NonFinitePolicy, StepConfig, Stepper};

pub const INPUTS: usize = 8;
pub const CLASSES: usize = 3;

/// Two linear layers with a tanh between them.
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    pub fn new(vb: VarBuilder, hidden: usize) -> candle_core::Result<Self> {
        Ok(Mlp {
            fc1: linear(INPUTS, hidden, vb.pp("fc1"))?,
            fc2: linear(hidden, CLASSES, vb.pp("fc2"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.fc2.forward(&self.fc1.forward(x)?.tanh()?)
    }
}

/// Sets every variable to values drawn from `seed` and its name: candle's CPU
/// initialisers cannot be seeded, and tests need the same start in every process.
/// Uniform in ±0.5, except convolution kernels, whose variance is 1/fan-in so that a deep
/// ResNet neither explodes nor vanishes, and BatchNorm variances, in [0.5, 1.5).
pub fn init_deterministic(vars: &ModelVars, seed: u64) -> Result<()> {
    for v in vars.all() {
        let mut rng = TrainRng::new(seed ^ name_hash(&v.name));
        let (offset, spread) = match v.var.dims() {
            _ if v.name.ends_with("running_var") => (1.0, 0.5),
            [_, fan_in @ ..] if fan_in.len() == 3 => {
                (0.0, (3.0 / fan_in.iter().product::<usize>() as f32).sqrt())
            }
            _ => (0.0, 0.5),
        };
        let values: Vec<f32> = (0..v.var.elem_count())
            .map(|_| offset + spread * rng.next_signed())
            .collect();
        let t = Tensor::from_vec(values, v.var.shape(), v.var.device())?;
        v.var.set(&t.to_dtype(v.var.dtype())?)?;
    }
    Ok(())
}

fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Sample `index` of the task: a function of the index alone, so any rank can draw any
/// part of a global batch.
pub fn sample(index: u64) -> ([f32; INPUTS], u32) {
    let mut rng = TrainRng::new(index.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let x: [f32; INPUTS] = std::array::from_fn(|_| rng.next_signed());
    let score = x[0] - 0.5 * x[1] + x[2] * x[3];
    let label = if score < -0.3 {
        0
    } else if score < 0.3 {
        1
    } else {
        2
    };
    (x, label)
}

/// Inputs `[n, INPUTS]` and labels `[n]` for the given sample indices.
pub fn batch(indices: impl IntoIterator<Item = u64>, device: &Device) -> Result<(Tensor, Tensor)> {
    let (mut xs, mut ys) = (Vec::new(), Vec::new());
    for i in indices {
        let (x, y) = sample(i);
        xs.extend_from_slice(&x);
        ys.push(y);
    }
    let n = ys.len();
    Ok((
        Tensor::from_vec(xs, (n, INPUTS), device)?,
        Tensor::from_vec(ys, n, device)?,
    ))
}

/// Mean cross-entropy of the model on a batch.
pub fn loss(model: &Mlp, x: &Tensor, y: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::loss::cross_entropy(&model.forward(x)?, y)?)
}

/// A tiny BERT for sequence classification (no dropout, so runs are deterministic).
pub fn tiny_bert_config() -> BertConfig {
    BertConfig::from_json(
        r#"{"model_type": "bert", "architectures": ["BertForSequenceClassification"],
            "vocab_size": 40, "hidden_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 32, "hidden_act": "gelu",
            "max_position_embeddings": 16, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0}"#,
    )
    .expect("valid tiny BERT config")
}

pub const BERT_SEQ: usize = 8;

/// Token sequences for the given sample indices, padded to [`BERT_SEQ`] with a mask;
/// the label is the sum of the tokens modulo [`CLASSES`].
pub fn bert_batch(
    indices: impl IntoIterator<Item = u64>,
    device: &Device,
) -> Result<(BertInput, Tensor)> {
    let (mut ids, mut mask, mut labels) = (Vec::new(), Vec::new(), Vec::new());
    for i in indices {
        let mut rng = TrainRng::new(i.wrapping_mul(0x9E6C_63D0_676A_9A99));
        let len = 3 + rng.below(BERT_SEQ - 2);
        let tokens: Vec<u32> = (0..len).map(|_| 1 + rng.below(39) as u32).collect();
        labels.push(tokens.iter().sum::<u32>() % CLASSES as u32);
        ids.extend(
            tokens
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, BERT_SEQ - len)),
        );
        mask.extend((0..BERT_SEQ).map(|p| u32::from(p < len)));
    }
    let n = labels.len();
    let input = BertInput {
        input_ids: Tensor::from_vec(ids, (n, BERT_SEQ), device)?,
        token_type_ids: None,
        attention_mask: Some(Tensor::from_vec(mask, (n, BERT_SEQ), device)?),
    };
    Ok((input, Tensor::from_vec(labels, n, device)?))
}

pub const IMAGE_SIZE: usize = 16;

/// Images `[n, 3, IMAGE_SIZE, IMAGE_SIZE]` for the given sample indices: noise around a
/// brightness per channel; the label is the brightest channel (one class per channel).
pub fn image_batch(
    indices: impl IntoIterator<Item = u64>,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let (mut pixels, mut labels) = (Vec::new(), Vec::new());
    for i in indices {
        let mut rng = TrainRng::new(i.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let brightness: [f32; CLASSES] = std::array::from_fn(|_| rng.next_signed());
        let brightest = (0..CLASSES).fold(0, |best, c| {
            if brightness[c] > brightness[best] {
                c
            } else {
                best
            }
        });
        labels.push(brightest as u32);
        for b in brightness {
            pixels.extend((0..IMAGE_SIZE * IMAGE_SIZE).map(|_| b + 0.5 * rng.next_signed()));
        }
    }
    let n = labels.len();
    Ok((
        Tensor::from_vec(pixels, (n, CLASSES, IMAGE_SIZE, IMAGE_SIZE), device)?,
        Tensor::from_vec(labels, n, device)?,
    ))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SelftestOptimizer {
    /// AdamW, weight decay 0.01.
    Adamw,
    /// SGD with momentum 0.9.
    Sgd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SelftestModel {
    Mlp,
    TinyBert,
    /// ResNet-18 on 3x16x16 images ([`image_batch`]) with frozen BatchNorm.
    TinyResnet,
}

enum Model {
    Mlp(Mlp),
    Bert(Box<BertForSequenceClassification>),
    ResNet(Box<ResNet>),
}

impl Model {
    fn new(which: SelftestModel, vb: VarBuilder, hidden: usize) -> Result<Self> {
        Ok(match which {
            SelftestModel::Mlp => Model::Mlp(Mlp::new(vb, hidden)?),
            SelftestModel::TinyBert => Model::Bert(Box::new(BertForSequenceClassification::new(
                vb,
                &tiny_bert_config(),
                CLASSES,
                Pooling::Cls,
            )?)),
            SelftestModel::TinyResnet => {
                let config =
                    ResNetConfig::new(18, CLASSES).map_err(|e| Error::Config(e.to_string()))?;
                let mut resnet = ResNet::new(&config, vb)?;
                // Batch statistics would make a sample's output depend on how the global
                // batch is split across ranks.
                resnet.set_batch_norm_frozen(true);
                Model::ResNet(Box::new(resnet))
            }
        })
    }

    fn loss(&self, indices: std::ops::Range<u64>, device: &Device) -> Result<Tensor> {
        match self {
            Model::Mlp(mlp) => {
                let (x, y) = batch(indices, device)?;
                loss(mlp, &x, &y)
            }
            Model::Bert(bert) => {
                let (input, y) = bert_batch(indices, device)?;
                let logits = bert.forward_t(&input, true)?.logits;
                Ok(candle_nn::loss::cross_entropy(&logits, &y)?)
            }
            Model::ResNet(resnet) => {
                let (x, y) = image_batch(indices, device)?;
                Ok(candle_nn::loss::cross_entropy(
                    &resnet.forward_t(&x, true)?,
                    &y,
                )?)
            }
        }
    }
}

/// One rank of a data-parallel run: the global batch of step s is samples
/// `s*G .. (s+1)*G` with `G = world_size * batch`, rank r taking the r-th slice.
#[derive(Debug, Clone, clap::Args)]
pub struct SelftestArgs {
    #[arg(long, value_enum, default_value = "mlp")]
    pub model: SelftestModel,
    #[arg(long, default_value_t = 5)]
    pub steps: u64,
    /// Samples per rank per step.
    #[arg(long, default_value_t = 4)]
    pub batch: u64,
    /// Micro-batches per step: the rank's batch in this many equal parts, their
    /// gradients accumulated (must divide `--batch`).
    #[arg(long, default_value_t = 1)]
    pub accumulation: u64,
    /// Hidden width of the MLP.
    #[arg(long, default_value_t = 16)]
    pub hidden: usize,
    /// Initial values come from this seed plus the rank, so only rank 0's broadcast
    /// makes the ranks agree.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Name patterns of frozen variables (glob or `re:<regex>`).
    #[arg(long)]
    pub freeze: Vec<String>,
    #[arg(long, default_value_t = 25 << 20)]
    pub bucket_bytes: usize,
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    #[arg(long, value_enum, default_value = "adamw")]
    pub optimizer: SelftestOptimizer,
    /// Make the loss NaN on this rank at `--nan-loss-step`.
    #[arg(long)]
    pub nan_loss_rank: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub nan_loss_step: u64,
    /// This rank exits with status 3 at the start of `--exit-step`, as a crashed worker.
    #[arg(long)]
    pub exit_rank: Option<u64>,
    #[arg(long, default_value_t = 0)]
    pub exit_step: u64,
    /// Skip steps with non-finite values instead of stopping.
    #[arg(long)]
    pub skip_non_finite: bool,
    /// Rank 0 writes the final variables here (safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Prints one line per step outcome on stdout.
pub fn run(args: &SelftestArgs, comm: Box<dyn Communicator>) -> Result<()> {
    if args.accumulation == 0 || !args.batch.is_multiple_of(args.accumulation) {
        return Err(Error::Config(format!(
            "--accumulation {} must divide --batch {}",
            args.accumulation, args.batch
        )));
    }
    let (rank, world) = (comm.rank() as u64, comm.world_size() as u64);
    let device = Device::Cpu;
    let vars = ModelVars::new(
        NamePatterns::parse(&args.freeze)?,
        default_buffer_patterns(),
    );
    let model = Model::new(
        args.model,
        vars.var_builder(DType::F32, &device),
        args.hidden,
    )?;
    init_deterministic(&vars, args.seed + rank)?;
    let ddp = Ddp::new(
        comm,
        &vars,
        DdpConfig {
            bucket_bytes: args.bucket_bytes,
            ..DdpConfig::default()
        },
    )?;
    let mut cfg = StepConfig::new(args.lr);
    cfg.accumulation = args.accumulation as usize;
    if args.skip_non_finite {
        cfg.non_finite = NonFinitePolicy::Skip;
    }
    let optimizer = match args.optimizer {
        SelftestOptimizer::Adamw => OptimizerConfig::adamw(0.01),
        SelftestOptimizer::Sgd => OptimizerConfig::sgd(0.9, false, 0.0),
    };
    let mut stepper = Stepper::new(cfg, &vars, optimizer, Some(ddp))?;
    let global = world * args.batch;
    for step in 0..args.steps {
        if args.exit_rank == Some(rank) && args.exit_step == step {
            std::process::exit(3);
        }
        let micro = args.batch / args.accumulation;
        for part in 0..args.accumulation {
            let first = step * global + rank * args.batch + part * micro;
            let mut loss = model.loss(first..first + micro, &device)?;
            if args.nan_loss_rank == Some(rank) && args.nan_loss_step == step {
                loss = (loss * f64::NAN)?;
            }
            println!("{:?}", stepper.backward(&loss)?);
        }
    }
    if let (0, Some(out)) = (rank, &args.out) {
        let tensors: std::collections::HashMap<String, Tensor> = vars
            .all()
            .into_iter()
            .map(|v| (v.name, v.var.as_tensor().clone()))
            .collect();
        candle_core::safetensors::save(&tensors, out).map_err(|e| Error::Checkpoint {
            path: out.clone(),
            detail: e.to_string(),
        })?;
    }
    Ok(())
}
