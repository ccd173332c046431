//! Does a step wait for its data? Training steps fed by the real loader (tokenising text,
//! or decoding and augmenting images, on the background thread, two batches ahead)
//! against the same steps on batches built beforehand. Goal: <= 1.03x.
//!
//! - MiniLM on SMS spam messages, batch 32, up to 128 tokens (the real tokenizer);
//! - ResNet-18 on MNIST-5k digits at 32 x 32 with random resized crop and rotation.
//!
//! cargo bench -p ringmaster-trainer --bench input_pipeline -- [--steps 8] [--rounds 2]
//! Needs examples/fetch-data.sh (MiniLM in the Hugging Face cache, the data in
//! examples/data). Run it on a quiet machine.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use ringmaster_trainer::data::augment::Transform;
use ringmaster_trainer::data::batches::{self, Batch, Examples};
use ringmaster_trainer::data::images::{self, ImageExamples};
use ringmaster_trainer::data::text::{self, TextExamples};
use ringmaster_trainer::model::{Model, Purpose};
use ringmaster_trainer::optim::{OptimizerConfig, Schedule};
use ringmaster_trainer::spec::JobFile;
use ringmaster_trainer::step::{NonFinitePolicy, StepConfig, Stepper};

#[derive(Parser)]
struct Args {
    /// Timed steps per measurement.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Alternating rounds of (loader, pre-built); the median of each side counts.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// cargo bench passes --bench.
    #[arg(long, hide = true)]
    bench: bool,
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn job(yaml: &str) -> Result<JobFile> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let path = dir.join(".input-pipeline-bench.yaml");
    std::fs::write(&path, yaml)?;
    let job = JobFile::load(&path, &[]);
    std::fs::remove_file(&path)?;
    Ok(job?)
}

fn new_stepper(model: &Model, lr: f64, optimizer: OptimizerConfig) -> Result<Stepper> {
    let config = StepConfig {
        lr,
        schedule: Schedule::Constant,
        accumulation: 1,
        clip_norm: None,
        non_finite: NonFinitePolicy::Error,
    };
    Ok(Stepper::new(config, &model.vars, optimizer, None)?)
}

fn step(model: &Model, stepper: &mut Stepper, batch: &Batch) -> Result<()> {
    let logits = model.logits(&batch.input, true)?;
    let loss = candle_nn::loss::cross_entropy(&logits, &batch.labels)?;
    stepper.backward(&loss)?;
    Ok(())
}

/// Seconds per step: from the loader, then on the same batches built beforehand.
fn measure(
    model: &Model,
    stepper: &mut Stepper,
    examples: Arc<dyn Examples>,
    batch: usize,
    steps: usize,
    seed: Option<u64>,
) -> Result<(f64, f64)> {
    let order: Vec<usize> = (0..batch * (steps + 1))
        .map(|i| i % examples.len())
        .collect();
    // One untimed step first: the stream's first batch is built while nothing else runs.
    let mut stream = batches::stream(examples.clone(), order.clone(), batch, seed, 0).into_iter();
    step(model, stepper, &stream.next().ok_or("no batch")??)?;
    let start = Instant::now();
    for b in stream {
        step(model, stepper, &b?)?;
    }
    let loader = start.elapsed().as_secs_f64() / steps as f64;

    let built: Vec<Batch> = batches::stream(examples, order, batch, seed, 0)
        .into_iter()
        .skip(1)
        .collect::<std::result::Result<_, _>>()?;
    let start = Instant::now();
    for b in &built {
        step(model, stepper, b)?;
    }
    let prebuilt = start.elapsed().as_secs_f64() / steps as f64;
    Ok((loader, prebuilt))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(name: &str, runs: Vec<(f64, f64)>) {
    let loader = median(runs.iter().map(|r| r.0).collect());
    let prebuilt = median(runs.iter().map(|r| r.1).collect());
    println!(
        "| {name} | {:.1} | {:.1} | {:.3}x |",
        loader * 1e3,
        prebuilt * 1e3,
        loader / prebuilt
    );
}

fn main() -> Result<()> {
    // SAFETY: first thing in main, before any thread starts.
    unsafe { ringmaster_nn::ops::blas::prefer_native_kernels() };
    let args = Args::parse();
    ringmaster_trainer::cpu::flush_denormals();
    println!("| workload | ms/step, loader | ms/step, pre-built | ratio |\n|---|---|---|---|");

    let spam = job(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: bench}\nspec:\n  \
         model: {architecture: bert, source: 'hf://sentence-transformers/all-MiniLM-L6-v2', labels: [ham, spam]}\n  \
         data: {train: data/spam_collection.tsv, format: tsv, header: false, labelField: '0', textField: '1', validationSplit: 0}\n  \
         training: {maxSequenceLength: 128}\n",
    )?;
    let spec = &spam.job.spec;
    let data = text::load(&spec.data, &spec.model.labels, 0)?;
    let model = Model::load(spec, &spec.model.source, &data.labels, Purpose::Train)?;
    let tokenizer = model.tokenizer.clone().ok_or("BERT has a tokenizer")?;
    let examples: Arc<dyn Examples> = Arc::new(TextExamples::new(data.train, tokenizer));
    let mut stepper = new_stepper(&model, 5e-5, OptimizerConfig::adamw(0.01))?;
    let runs = (0..args.rounds)
        .map(|_| measure(&model, &mut stepper, examples.clone(), 32, args.steps, None))
        .collect::<Result<Vec<_>>>()?;
    report("MiniLM, SMS spam, batch 32, <= 128 tokens", runs);

    let digits = job(
        "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: bench}\nspec:\n  \
         model: {architecture: resnet, source: 'random:resnet18', numClasses: 10}\n  \
         data: {train: data/mnist-5k/train-images-idx3-ubyte.gz, format: idx, validationSplit: 0, imageSize: 32, \
                augmentation: {minCropScale: 0.6, horizontalFlip: true, maxRotationDegrees: 10, colorJitter: 0.2}}\n",
    )?;
    let spec = &digits.job.spec;
    let data = images::load(&spec.data, &spec.model.labels, 0)?;
    let model = Model::load(spec, &spec.model.source, &data.labels, Purpose::Train)?;
    let transform = Transform {
        size: 32,
        augmentation: spec.data.augmentation.clone(),
    };
    let examples: Arc<dyn Examples> = Arc::new(ImageExamples::new(data.train, transform));
    let mut stepper = new_stepper(&model, 0.05, OptimizerConfig::sgd(0.9, false, 0.0))?;
    let runs = (0..args.rounds)
        .map(|r| {
            measure(
                &model,
                &mut stepper,
                examples.clone(),
                128,
                args.steps * 2,
                Some(r as u64),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    report("ResNet-18, MNIST-5k 32x32 augmented, batch 128", runs);
    Ok(())
}
