//! The README.md beside a best model: what it was trained on, how, and how well it does
//! per class, so a directory found later explains itself.

use ringmaster_crds::{Architecture, TrainingJob};

use crate::evaluate::EvalReport;

pub fn render(job: &TrainingJob, labels: &[String], report: &EvalReport) -> String {
    let s = &job.spec;
    let t = &s.training;
    let (header, what, input) = match s.model.architecture {
        Architecture::Bert => (
            "library_name: transformers\npipeline_tag: text-classification",
            "A BERT sequence classifier",
            format!("max sequence length | {}", t.max_sequence_length),
        ),
        Architecture::Resnet => (
            "pipeline_tag: image-classification",
            "A ResNet image classifier (torchvision tensor names)",
            format!("image size | {0} x {0}", s.data.image_size),
        ),
    };
    let distilled = t.distillation.as_ref().map_or(String::new(), |d| {
        format!(
            "| distilled from | `{}` (temperature {}, alpha {}) |\n",
            d.teacher, d.temperature, d.alpha
        )
    });
    let mut out = format!(
        "---\n{header}\n---\n\n\
         # {name}\n\n{what} trained by ringmaster from `{source}`.\n\n\
         ## Data\n\n- training: `{train}` ({format:?})\n- validation: {validation}\n- labels: {labels:?}\n\n\
         ## Recipe\n\n| setting | value |\n|---|---|\n\
         | epochs | {epochs} |\n| batch size per rank | {batch} |\n| ranks | {ranks} |\n\
         | optimizer | {optimizer:?}, learning rate {lr}, weight decay {wd} |\n\
         | schedule | {schedule:?} |\n| {input} |\n{distilled}| seed | {seed} |\n\n\
         ## Validation ({n} examples)\n\naccuracy **{acc:.4}**, macro-F1 **{f1:.4}**, loss {loss:.4}\n\n\
         | class | precision | recall | F1 | support |\n|---|---|---|---|---|\n",
        name = job.metadata.name.as_deref().unwrap_or("model"),
        source = s.model.source,
        train = s.data.train,
        format = s.data.format,
        validation = s.data.validation.as_deref().map_or_else(
            || format!(
                "{:.0}% of the training rows, held out by seed",
                s.data.validation_split * 100.0
            ),
            |v| format!("`{v}`"),
        ),
        epochs = t.epochs,
        batch = t.batch_size,
        ranks = s.distribution.workers * s.distribution.processes_per_worker,
        optimizer = t.optimizer,
        lr = t.learning_rate,
        wd = t.weight_decay,
        schedule = t.schedule,
        seed = t.seed,
        n = report.examples,
        acc = report.accuracy,
        f1 = report.macro_f1,
        loss = report.loss,
    );
    for c in &report.per_class {
        out += &format!(
            "| {} | {:.4} | {:.4} | {:.4} | {} |\n",
            c.label, c.precision, c.recall, c.f1, c.support
        );
    }
    out += "\nConfusion matrix (rows: true label, columns: predicted):\n\n| |";
    for l in labels {
        out += &format!(" {l} |");
    }
    out += "\n|---|";
    out += &"---|".repeat(labels.len());
    out += "\n";
    for (l, row) in labels.iter().zip(&report.confusion) {
        out += &format!("| **{l}** |");
        for v in row {
            out += &format!(" {v} |");
        }
        out += "\n";
    }
    out
}
