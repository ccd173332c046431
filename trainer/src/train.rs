//! One rank of a TrainingJob (`ringmaster train`): fine-tunes a BERT text classifier or
//! a ResNet image classifier, data-parallel over the TCP ring when WORLD_SIZE > 1, with
//! optional distillation from a teacher and class balancing. Evaluates every epoch (and
//! every `evalIntervalSteps`) across all ranks, keeps the best model servable in `best/`,
//! checkpoints every `checkpointIntervalSteps` and every epoch, and resumes from the
//! newest intact checkpoint in the output directory (so a whole-gang restart loses at
//! most one interval). Rank 0 writes the output directory and reports on stdout
//! (`events`).

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{D, Device, Tensor};
use ringmaster_collective::{ReduceOp, RendezvousConfig, connect_tcp};
use ringmaster_crds::{
    Architecture, BestMetric, ClassBalance, NonFinitePolicy, Optimizer, Schedule as SpecSchedule,
};
use tracing::info;

use crate::checkpoint;
use crate::data::augment::Transform;
use crate::data::batches::{self, Batch, Examples};
use crate::data::images::{self, ImageExamples};
use crate::data::sampler;
use crate::data::text::{self, TextExamples};
use crate::ddp::{Ddp, DdpConfig};
use crate::error::{Error, Result};
use crate::evaluate::{Confusion, EvalReport};
use crate::events::{Event, Sink};
use crate::loss;
use crate::model::{Model, Purpose};
use crate::model_card;
use crate::optim::{OptimizerConfig, Schedule};
use crate::params::ModelVars;
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

/// The model to train and the data it trains on.
struct Task {
    model: Model,
    /// Distillation's teacher, frozen.
    teacher: Option<Model>,
    train: Arc<dyn Examples>,
    validation: Arc<dyn Examples>,
    labels: Vec<String>,
    /// Per-class loss weights (`classBalance: lossWeights`).
    class_weights: Option<Tensor>,
}

/// One rank's run: what it trains, where it writes, and whom it tells.
struct Run<'a> {
    task: Task,
    dir: RunDir,
    job: &'a JobFile,
    me: Rank,
    /// Rank 0 reports; the others stay quiet.
    sink: Option<Sink>,
}

impl Run<'_> {
    fn tell(&self, event: Event) {
        if let Some(sink) = &self.sink {
            sink.send(event);
        }
    }
}

/// Reads the data and loads the model (and teacher): every input error surfaces here,
/// before training starts.
fn prepare(job: &JobFile) -> Result<Task> {
    let spec = &job.job.spec;
    let t = &spec.training;
    let seed = t.seed;
    let (model, train, validation, labels): (Model, Arc<dyn Examples>, Arc<dyn Examples>, _) =
        match spec.model.architecture {
            Architecture::Bert => {
                let data = text::load(&spec.data, &spec.model.labels, seed)?;
                check_class_count(job, &data.labels)?;
                let model = Model::load(spec, &spec.model.source, &data.labels, Purpose::Train)?;
                let tokenizer = model.tokenizer.clone().expect("BERT has a tokenizer");
                (
                    model,
                    Arc::new(TextExamples::new(data.train, tokenizer.clone())),
                    Arc::new(TextExamples::new(data.validation, tokenizer)),
                    data.labels,
                )
            }
            Architecture::Resnet => {
                let data = images::load(&spec.data, &spec.model.labels, seed)?;
                check_class_count(job, &data.labels)?;
                let model = Model::load(spec, &spec.model.source, &data.labels, Purpose::Train)?;
                let size = spec.data.image_size as usize;
                let transform = |augmentation| Transform { size, augmentation };
                (
                    model,
                    Arc::new(ImageExamples::new(
                        data.train,
                        transform(spec.data.augmentation.clone()),
                    )),
                    Arc::new(ImageExamples::new(data.validation, transform(None))),
                    data.labels,
                )
            }
        };
    let teacher = t
        .distillation
        .as_ref()
        .map(|d| Model::load(spec, &d.teacher, &labels, Purpose::Teach))
        .transpose()?;
    let class_weights = match t.class_balance {
        ClassBalance::LossWeights => {
            let weights = loss::balanced_class_weights(
                (0..train.len()).map(|i| train.label(i)),
                labels.len(),
            );
            info!(?weights, "class weights in the loss");
            Some(Tensor::new(weights, &Device::Cpu)?)
        }
        ClassBalance::None | ClassBalance::Oversample => None,
    };
    Ok(Task {
        model,
        teacher,
        train,
        validation,
        labels,
        class_weights,
    })
}

fn check_class_count(job: &JobFile, labels: &[String]) -> Result<()> {
    match job.job.spec.model.num_classes {
        Some(n) if n as usize != labels.len() => Err(Error::Config(format!(
            "spec.model.numClasses is {n} but the training data has {} labels: {labels:?}",
            labels.len()
        ))),
        _ => Ok(()),
    }
}

pub fn run(job: &JobFile, me: Rank) -> Result<()> {
    let started = Instant::now();
    let spec = &job.job.spec;
    let t = &spec.training;
    let dir = RunDir::create(&job.output_dir())?;
    let task = prepare(job)?;
    let train = task.train.clone();

    let micro_per_epoch = (train.len().div_ceil(me.world) as u64).div_ceil(u64::from(t.batch_size));
    let accumulation = u64::from(t.gradient_accumulation_steps);
    let steps_per_epoch = micro_per_epoch.div_ceil(accumulation);
    let total_steps = steps_per_epoch * u64::from(t.epochs);
    let mut stepper = stepper(job, &task.model.vars, total_steps, me)?;

    let mut position = Position {
        epoch: 0,
        batch: 0,
        best_metric: None,
    };
    let mut resumed_at_step = None;
    if let Some((checkpoint_dir, saved)) = dir.newest_valid_checkpoint() {
        checkpoint::load(&checkpoint_dir, &task.model.vars, &mut stepper)?;
        info!(checkpoint = %checkpoint_dir.display(), step = stepper.step(), "resumed");
        position = saved;
        resumed_at_step = Some(stepper.step());
    }
    // Dropout masks follow the seed, differ between ranks (as each rank's data does), and
    // a resumed run continues with fresh masks rather than replaying the first steps'.
    ringmaster_nn::ops::dropout::seed_dropout(
        TrainRng::new(
            t.seed ^ (me.rank as u64).wrapping_mul(0x9E37_79B9) ^ stepper.step().rotate_left(32),
        )
        .next_u64(),
    );
    let run = Run {
        task,
        dir,
        job,
        me,
        sink: (me.rank == 0).then(Sink::new),
    };
    let task = &run.task;
    run.tell(Event::Start {
        epochs: u64::from(t.epochs),
        steps_per_epoch,
        total_steps,
        train_examples: train.len(),
        validation_examples: task.validation.len(),
        world_size: me.world,
        labels: task.labels.clone(),
        resumed_at_step,
    });
    if let Some(order) = stepper
        .ddp_mut()
        .and_then(|ddp| ddp.communicator().ring_description())
    {
        info!(%order, "all-reduce ring");
        run.tell(Event::Ring { order });
    }

    let batch_size = t.batch_size as usize;
    let global_batch = (batch_size * me.world) as f64;
    let augments = spec.data.augmentation.is_some();
    let mut evaluated_at = None;
    for epoch in position.epoch..u64::from(t.epochs) {
        let whole = match t.class_balance {
            ClassBalance::Oversample => {
                let labels: Vec<usize> = (0..train.len()).map(|i| train.label(i)).collect();
                sampler::balanced_order(&labels, task.labels.len(), t.seed, epoch)
            }
            ClassBalance::None | ClassBalance::LossWeights => {
                sampler::epoch_order(train.len(), t.seed, epoch, true)
            }
        };
        let order = sampler::shard(&whole, me.world, me.rank);
        let first_batch = if epoch == position.epoch {
            position.batch
        } else {
            0
        };
        let skip = (first_batch as usize * batch_size).min(order.len());
        // Augmentation differs per rank and epoch, and follows the seed.
        let augment_seed = augments.then(|| {
            TrainRng::new(t.seed ^ (epoch << 32) ^ (me.rank as u64).wrapping_mul(0x9E37_79B9))
                .next_u64()
        });
        let batches = batches::stream(
            train.clone(),
            order[skip..].to_vec(),
            batch_size,
            augment_seed,
            first_batch,
        );
        let mut batch_index = first_batch;
        let mut last_update = Instant::now();
        for batch in batches {
            let batch = batch?;
            let loss = training_loss(task, &batch, job)?;
            let loss_value = f64::from(loss.to_scalar::<f32>()?);
            batch_index += 1;
            if let StepOutcome::Updated { step, lr, .. } = stepper.backward(&loss)? {
                let took = last_update.elapsed().as_secs_f64();
                last_update = Instant::now();
                run.tell(Event::Step {
                    epoch,
                    step,
                    loss: loss_value,
                    lr,
                    samples_per_s: global_batch * accumulation as f64 / took.max(1e-9),
                    allreduce_gbps: stepper.ddp_mut().and_then(Ddp::take_bus_bandwidth),
                });
                position.epoch = epoch;
                position.batch = batch_index;
                let checkpoint_every = t.checkpoint_interval_steps;
                if checkpoint_every > 0 && step.is_multiple_of(checkpoint_every) {
                    run.save_checkpoint(&mut stepper, &position)?;
                }
                let eval_every = t.eval_interval_steps;
                if eval_every > 0 && step.is_multiple_of(eval_every) {
                    run.evaluate_and_keep(epoch, &mut stepper, &mut position)?;
                    evaluated_at = Some(step);
                    last_update = Instant::now();
                }
            }
        }
        position.epoch = epoch + 1;
        position.batch = 0;
        if evaluated_at != Some(stepper.step()) {
            run.evaluate_and_keep(epoch, &mut stepper, &mut position)?;
            evaluated_at = Some(stepper.step());
        }
        if !stepper.mid_step() {
            run.save_checkpoint(&mut stepper, &position)?;
        }
    }
    run.tell(Event::Done {
        steps: stepper.step(),
        best: position.best_metric,
        output: run.dir.root().display().to_string(),
        seconds: started.elapsed().as_secs_f64(),
    });
    Ok(())
}

/// Cross-entropy (class-weighted when asked), mixed with the teacher's soft targets when
/// distilling (the teacher runs in eval mode, without gradients, on the same batch).
fn training_loss(task: &Task, batch: &Batch, job: &JobFile) -> Result<Tensor> {
    let logits = task.model.logits(&batch.input, true)?;
    let hard = loss::cross_entropy(&logits, &batch.labels, task.class_weights.as_ref())?;
    match (&task.teacher, &job.job.spec.training.distillation) {
        (Some(teacher), Some(d)) => {
            let teacher_logits = teacher.logits(&batch.input, false)?;
            loss::distillation(&logits, &teacher_logits, &hard, d.temperature, d.alpha)
        }
        _ => Ok(hard),
    }
}

/// Whether `report` beats the best so far on the spec's metric; updates it when it does.
fn improves(report: &EvalReport, metric: BestMetric, best: &mut Option<f64>) -> bool {
    let (value, higher_is_better) = match metric {
        BestMetric::Accuracy => (report.accuracy, true),
        BestMetric::MacroF1 => (report.macro_f1, true),
        BestMetric::Loss => (report.loss, false),
    };
    let better = best.is_none_or(|b| {
        if higher_is_better {
            value > b
        } else {
            value < b
        }
    });
    if better {
        *best = Some(value);
    }
    better
}

impl Run<'_> {
    /// Evaluates on every rank; rank 0 records the result and keeps the model in `best/`
    /// when it improves on the spec's metric (without validation data, the latest is
    /// kept).
    fn evaluate_and_keep(
        &self,
        epoch: u64,
        stepper: &mut Stepper,
        position: &mut Position,
    ) -> Result<()> {
        let (task, job) = (&self.task, self.job);
        let report = evaluate(task, self.me, stepper)?;
        let step = stepper.step();
        let best = if task.validation.is_empty() {
            true
        } else {
            improves(
                &report,
                job.job.spec.output.best_metric,
                &mut position.best_metric,
            )
        };
        if self.me.rank == 0 {
            let line = serde_json::json!({"epoch": epoch + 1, "step": step, "validation": &report});
            self.dir.append_metrics(&line)?;
            if best {
                self.dir
                    .replace_best(|dir| export_best(dir, task, job, &report))?;
            }
            self.tell(Event::Eval {
                epoch,
                step,
                best,
                report,
            });
        }
        Ok(())
    }

    /// Writes a checkpoint (between optimizer steps only: micro-batches of an unfinished
    /// step would be lost). Every rank calls it: BatchNorm statistics are averaged
    /// across ranks first; rank 0 writes and announces it.
    fn save_checkpoint(&self, stepper: &mut Stepper, position: &Position) -> Result<()> {
        if let Some(ddp) = stepper.ddp_mut() {
            ddp.average_buffers(&self.task.model.vars)?;
        }
        if self.me.rank != 0 {
            return Ok(());
        }
        let spec = &self.job.job.spec;
        let keep = spec.output.keep_checkpoints as usize;
        let rng = TrainRng::new(spec.training.seed);
        let dir = self
            .dir
            .save_checkpoint(stepper.step(), position, keep, |dir| {
                checkpoint::save(dir, &self.task.model.vars, stepper, position.epoch, &rng)
            })?;
        self.tell(Event::Checkpoint {
            step: stepper.step(),
            path: dir.display().to_string(),
        });
        Ok(())
    }
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
fn evaluate(task: &Task, me: Rank, stepper: &mut Stepper) -> Result<EvalReport> {
    // Every rank evaluates with the same BatchNorm statistics.
    if let Some(ddp) = stepper.ddp_mut() {
        ddp.average_buffers(&task.model.vars)?;
    }
    let mine: Vec<usize> = (me.rank..task.validation.len()).step_by(me.world).collect();
    let classes = task.labels.len();
    let mut confusion = Confusion::new(classes);
    for batch in batches::stream(task.validation.clone(), mine, 64, None, 0) {
        let Batch {
            input,
            labels: truth,
            size,
        } = batch?;
        let logits = task.model.logits(&input, false)?;
        let loss = candle_nn::loss::cross_entropy(&logits, &truth)?;
        let predicted = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let loss_sum = f64::from(loss.to_scalar::<f32>()?) * size as f64;
        confusion.add(&predicted, &truth.to_vec1::<u32>()?, loss_sum);
    }
    if let Some(ddp) = stepper.ddp_mut() {
        let mut flat = confusion.to_flat();
        ddp.communicator()
            .all_reduce_f32(&mut flat, ReduceOp::Sum)?;
        confusion = Confusion::from_flat(classes, &flat);
    }
    Ok(confusion.report(&task.labels))
}

/// The model as a servable directory (`Model::export`) with its model card.
fn export_best(dir: &Path, task: &Task, job: &JobFile, report: &EvalReport) -> Result<()> {
    task.model.export(dir, &task.labels, &job.job.spec)?;
    let card = model_card::render(&job.job, &task.labels, report);
    std::fs::write(dir.join("README.md"), card).map_err(|source| Error::Io {
        what: "writing",
        path: dir.join("README.md"),
        source,
    })
}
