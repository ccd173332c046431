//! One rank of a TrainingJob (`ringmaster train`): fine-tunes a BERT sequence classifier
//! on labelled text, data-parallel over the TCP ring when WORLD_SIZE > 1. Evaluates every
//! epoch across all ranks, keeps the best model servable in `best/`, checkpoints every
//! `checkpointIntervalSteps` and every epoch, and resumes from the newest intact
//! checkpoint in the output directory (so a whole-gang restart loses at most one
//! interval). Rank 0 writes the output directory and reports on stdout (`events`).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use ringmaster_collective::{ReduceOp, RendezvousConfig, connect_tcp};
use ringmaster_crds::{NonFinitePolicy, Optimizer, Pooling, Schedule as SpecSchedule};
use ringmaster_nn::models::bert::{self, BertConfig, BertForSequenceClassification};
use tokenizers::Tokenizer;
use tracing::info;

use crate::checkpoint;
use crate::data::batches::{self, TextBatch};
use crate::data::{Example, TextData, sampler};
use crate::ddp::{Ddp, DdpConfig};
use crate::error::{Error, Result};
use crate::evaluate::{Confusion, EvalReport};
use crate::events::{Event, Sink};
use crate::model_card;
use crate::optim::{OptimizerConfig, Schedule};
use crate::params::{ModelVars, NamePatterns, default_buffer_patterns};
use crate::rng::TrainRng;
use crate::run_dir::{Position, RunDir};
use crate::spec::JobFile;
use crate::step::{NonFinitePolicy as StepNonFinite, StepConfig, StepOutcome, Stepper};

/// Where this process sits in the job (RANK and WORLD_SIZE; 0 of 1 when unset).
#[derive(Debug, Clone, Copy)]
pub struct Rank {
    pub rank: usize,
    pub world: usize,
}

impl Rank {
    pub fn from_env() -> Result<Self> {
        let get = |name: &str, default: usize| -> Result<usize> {
            match std::env::var(name) {
                Ok(v) if !v.trim().is_empty() => v.trim().parse().map_err(|_| {
                    Error::Config(format!("{name}={v:?} is not a non-negative integer"))
                }),
                _ => Ok(default),
            }
        };
        let (rank, world) = (get("RANK", 0)?, get("WORLD_SIZE", 1)?);
        if world == 0 || rank >= world {
            return Err(Error::Config(format!(
                "RANK={rank} must be below WORLD_SIZE={world}"
            )));
        }
        Ok(Self { rank, world })
    }
}

/// The model, its tokenizer and where they came from.
struct Model {
    classifier: BertForSequenceClassification,
    vars: ModelVars,
    tokenizer: Arc<Tokenizer>,
    source_dir: std::path::PathBuf,
}

pub fn run(job: &JobFile, me: Rank) -> Result<()> {
    let started = Instant::now();
    let spec = &job.job.spec;
    let t = &spec.training;
    if t.distillation.is_some() {
        return Err(Error::Config(
            "spec.training.distillation: distillation is not built into the trainer yet".into(),
        ));
    }
    let run = RunDir::create(&job.output_dir())?;
    let data = TextData::load(&spec.data, &spec.model.labels, t.seed)?;
    if let Some(n) = spec.model.num_classes
        && n as usize != data.labels.len()
    {
        return Err(Error::Config(format!(
            "spec.model.numClasses is {n} but the training data has {} labels: {:?}",
            data.labels.len(),
            data.labels
        )));
    }
    let model = load_model(job, data.labels.len())?;
    let train = Arc::new(data.train);
    let validation = Arc::new(data.validation);

    let micro_per_epoch = (train.len().div_ceil(me.world) as u64).div_ceil(u64::from(t.batch_size));
    let accumulation = u64::from(t.gradient_accumulation_steps);
    let steps_per_epoch = micro_per_epoch.div_ceil(accumulation);
    let total_steps = steps_per_epoch * u64::from(t.epochs);
    let mut stepper = stepper(job, &model.vars, total_steps, me)?;

    let mut position = Position {
        epoch: 0,
        batch: 0,
        best_metric: None,
    };
    let mut resumed_at_step = None;
    if let Some((dir, saved)) = run.newest_valid_checkpoint() {
        checkpoint::load(&dir, &model.vars, &mut stepper)?;
        info!(checkpoint = %dir.display(), step = stepper.step(), "resumed");
        position = saved;
        resumed_at_step = Some(stepper.step());
    }
    let leader = me.rank == 0;
    // Rank 0 reports; the others stay quiet.
    let sink = leader.then(Sink::new);
    let tell = |event: Event| {
        if let Some(sink) = &sink {
            sink.send(event);
        }
    };
    tell(Event::Start {
        epochs: u64::from(t.epochs),
        steps_per_epoch,
        total_steps,
        train_examples: train.len(),
        validation_examples: validation.len(),
        world_size: me.world,
        labels: data.labels.clone(),
        resumed_at_step,
    });

    let batch_size = t.batch_size as usize;
    let global_batch = (batch_size * me.world) as f64;
    for epoch in position.epoch..u64::from(t.epochs) {
        let order = sampler::shard(train.len(), me.world, me.rank, t.seed, epoch, true);
        let skip = if epoch == position.epoch {
            (position.batch as usize * batch_size).min(order.len())
        } else {
            0
        };
        let batches = batches::stream(
            model.tokenizer.clone(),
            train.clone(),
            order[skip..].to_vec(),
            batch_size,
        );
        let mut batch_index = position.batch * u64::from(epoch == position.epoch);
        let mut last_update = Instant::now();
        for batch in batches {
            let batch = batch?;
            let logits = model.classifier.forward_t(&batch.input, true)?.logits;
            let loss = candle_nn::loss::cross_entropy(&logits, &batch.labels)?;
            let loss_value = f64::from(loss.to_scalar::<f32>()?);
            batch_index += 1;
            if let StepOutcome::Updated { step, lr, .. } = stepper.backward(&loss)? {
                let took = last_update.elapsed().as_secs_f64();
                last_update = Instant::now();
                tell(Event::Step {
                    epoch,
                    step,
                    loss: loss_value,
                    lr,
                    samples_per_s: global_batch * accumulation as f64 / took.max(1e-9),
                });
                let interval = t.checkpoint_interval_steps;
                if leader && interval > 0 && step.is_multiple_of(interval) {
                    position.epoch = epoch;
                    position.batch = batch_index;
                    tell(save_checkpoint(&run, &model, &stepper, &position, job)?);
                }
            }
        }

        let report = evaluate(&model, &validation, &data.labels, me, &mut stepper)?;
        let step = stepper.step();
        // Without validation data there is nothing to rank epochs by: the latest is kept.
        let best =
            validation.is_empty() || position.best_metric.is_none_or(|b| report.accuracy > b);
        if best && !validation.is_empty() {
            position.best_metric = Some(report.accuracy);
        }
        if leader {
            let line = serde_json::json!({"epoch": epoch + 1, "step": step, "validation": &report});
            run.append_metrics(&line)?;
            if best {
                run.replace_best(|dir| export_best(dir, &model, &data.labels, job, &report))?;
            }
            tell(Event::Eval {
                epoch,
                step,
                best,
                report,
            });
        }
        position.epoch = epoch + 1;
        position.batch = 0;
        if leader && !stepper.mid_step() {
            tell(save_checkpoint(&run, &model, &stepper, &position, job)?);
        }
    }
    tell(Event::Done {
        steps: stepper.step(),
        best_accuracy: position.best_metric,
        output: run.root().display().to_string(),
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(())
}

fn load_model(job: &JobFile, num_labels: usize) -> Result<Model> {
    let spec = &job.job.spec;
    let source_dir = crate::source::resolve(&spec.model.source)?;
    let config_file = source_dir.join("config.json");
    let config = BertConfig::from_file(&config_file)?;
    // Patterns are written against the encoder (`embeddings.*`, `encoder.layer.0.*`) or
    // against the full names (`bert.embeddings.*`).
    let freeze: Vec<String> = spec
        .model
        .freeze
        .iter()
        .flat_map(|p| [p.clone(), format!("bert.{p}")])
        .collect();
    let vars = ModelVars::new(NamePatterns::parse(&freeze)?, default_buffer_patterns());
    let pooling = match spec.model.pooling {
        Pooling::Cls => bert::Pooling::Cls,
        Pooling::Mean => bert::Pooling::Mean,
    };
    let classifier = BertForSequenceClassification::new(
        vars.var_builder(DType::F32, &Device::Cpu),
        &config,
        num_labels,
        pooling,
    )?;
    bert::load_weights(
        vars.varmap(),
        &source_dir.join("model.safetensors"),
        &config_file,
        |name| name.starts_with("classifier.") || name.starts_with("bert.pooler."),
    )?;
    let mut tokenizer =
        bert::load_tokenizer(&source_dir.join("tokenizer.json"), &config, &config_file)?;
    let max_len = (spec.training.max_sequence_length as usize).min(config.max_position_embeddings);
    batches::truncate_to(&mut tokenizer, max_len)?;
    Ok(Model {
        classifier,
        vars,
        tokenizer: Arc::new(tokenizer),
        source_dir,
    })
}

fn stepper(job: &JobFile, vars: &ModelVars, total_steps: u64, me: Rank) -> Result<Stepper> {
    let t = &job.job.spec.training;
    let warmup = t
        .warmup_steps
        .unwrap_or_else(|| (t.warmup_ratio.unwrap_or(0.0) * total_steps as f64).round() as u64);
    let schedule = match t.schedule {
        SpecSchedule::Constant => Schedule::Constant,
        SpecSchedule::Linear => Schedule::WarmupLinear {
            warmup,
            total: total_steps,
        },
        SpecSchedule::Cosine => Schedule::WarmupCosine {
            warmup,
            total: total_steps,
        },
    };
    let config = StepConfig {
        lr: t.learning_rate,
        schedule,
        accumulation: t.gradient_accumulation_steps as usize,
        clip_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
        non_finite: match t.non_finite {
            NonFinitePolicy::Fail => StepNonFinite::Error,
            NonFinitePolicy::Skip => StepNonFinite::Skip,
        },
    };
    let optimizer = match t.optimizer {
        Optimizer::Adamw => OptimizerConfig::adamw(t.weight_decay),
        Optimizer::Sgd => OptimizerConfig::sgd(t.momentum, false, t.weight_decay),
    };
    let ddp = if me.world > 1 {
        let ring = connect_tcp(&RendezvousConfig::from_env()?)?;
        Some(Ddp::new(Box::new(ring), vars, DdpConfig::default())?)
    } else {
        None
    };
    Stepper::new(config, vars, optimizer, ddp)
}

/// Every rank evaluates its share of the validation set (no padding, so each example
/// counts once); the confusion matrices and loss sums are summed across ranks.
fn evaluate(
    model: &Model,
    validation: &Arc<Vec<Example>>,
    labels: &[String],
    me: Rank,
    stepper: &mut Stepper,
) -> Result<EvalReport> {
    let mine: Vec<usize> = (me.rank..validation.len()).step_by(me.world).collect();
    let mut confusion = Confusion::new(labels.len());
    for batch in batches::stream(model.tokenizer.clone(), validation.clone(), mine, 64) {
        let TextBatch {
            input,
            labels: truth,
            size,
            ..
        } = batch?;
        let logits = model.classifier.forward_t(&input, false)?.logits;
        let loss = candle_nn::loss::cross_entropy(&logits, &truth)?;
        let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let loss_sum = f64::from(loss.to_scalar::<f32>()?) * size as f64;
        confusion.add(&predicted, &truth.to_vec1::<u32>()?, loss_sum);
    }
    if let Some(ddp) = stepper.ddp_mut() {
        let mut flat = confusion.to_flat();
        ddp.communicator()
            .all_reduce_f32(&mut flat, ReduceOp::Sum)?;
        confusion = Confusion::from_flat(labels.len(), &flat);
    }
    Ok(confusion.report(labels))
}

/// Writes a checkpoint (between optimizer steps only: micro-batches of an unfinished
/// step would be lost) and returns the event announcing it.
fn save_checkpoint(
    run: &RunDir,
    model: &Model,
    stepper: &Stepper,
    position: &Position,
    job: &JobFile,
) -> Result<Event> {
    let keep = job.job.spec.output.keep_checkpoints as usize;
    let rng = TrainRng::new(job.job.spec.training.seed);
    let dir = run.save_checkpoint(stepper.step(), position, keep, |dir| {
        checkpoint::save(dir, &model.vars, stepper, position.epoch, &rng)
    })?;
    Ok(Event::Checkpoint {
        step: stepper.step(),
        path: dir.display().to_string(),
    })
}

/// A directory `transformers.AutoModelForSequenceClassification.from_pretrained` loads:
/// the source's config with the label maps, the weights under Hugging Face names, the
/// tokenizer files, and a model card.
fn export_best(
    dir: &Path,
    model: &Model,
    labels: &[String],
    job: &JobFile,
    report: &EvalReport,
) -> Result<()> {
    let source_config = model.source_dir.join("config.json");
    let raw = std::fs::read(&source_config).map_err(|source| Error::Io {
        what: "reading",
        path: source_config.clone(),
        source,
    })?;
    let mut config: serde_json::Value = serde_json::from_slice(&raw)
        .map_err(|e| Error::Config(format!("{}: {e}", source_config.display())))?;
    let id2label: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), i.into()))
        .collect();
    config["architectures"] = serde_json::json!(["BertForSequenceClassification"]);
    config["id2label"] = id2label.into();
    config["label2id"] = label2id.into();
    config["num_labels"] = labels.len().into();
    config["problem_type"] = "single_label_classification".into();
    write_json(&dir.join("config.json"), &config)?;
    write_json(&dir.join("labels.json"), &serde_json::json!(labels))?;
    let tensors: HashMap<String, Tensor> = model
        .vars
        .all()
        .into_iter()
        .map(|v| (v.name, v.var.as_tensor().clone()))
        .collect();
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).map_err(|e| Error::Checkpoint {
        path: weights.clone(),
        detail: e.to_string(),
    })?;
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ] {
        let from = model.source_dir.join(file);
        if from.is_file() {
            std::fs::copy(&from, dir.join(file)).map_err(|source| Error::Io {
                what: "copying",
                path: from.clone(),
                source,
            })?;
        }
    }
    let card = model_card::render(&job.job, labels, report);
    std::fs::write(dir.join("README.md"), card).map_err(|source| Error::Io {
        what: "writing",
        path: dir.join("README.md"),
        source,
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serialises");
    std::fs::write(path, text).map_err(|source| Error::Io {
        what: "writing",
        path: path.to_path_buf(),
        source,
    })
}
