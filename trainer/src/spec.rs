//! The TrainingJob file as the trainer reads it: the same YAML `kubectl apply` takes (the
//! operator mounts it into the pods), with `--set` overrides, relative paths resolved
//! against the file's directory, and the rules the API server's schema enforces checked
//! again here, because `ringmaster launch` has no API server in front of it.

use std::path::{Path, PathBuf};

use ringmaster_crds::{Architecture, DataFormat, TrainingJob};
use serde_yaml::Value;

use crate::error::{Error, Result};

/// A job ready to run: the parsed spec, paths made absolute.
#[derive(Debug, Clone)]
pub struct JobFile {
    pub job: TrainingJob,
    /// Where the YAML was read from (relative paths were resolved against its directory).
    pub path: PathBuf,
}

impl JobFile {
    /// Reads `path`, applies `overrides` (`training.epochs=1`: a dotted path under
    /// `spec`, then a YAML value), resolves relative paths and checks the trainer's rules.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: "reading the TrainingJob file",
            path: path.to_path_buf(),
            source,
        })?;
        let mut doc: Value = serde_yaml::from_str(&text)
            .map_err(|e| Error::Config(format!("{}: not valid YAML: {e}", path.display())))?;
        for o in overrides {
            apply_override(&mut doc, o)?;
        }
        let mut job: TrainingJob = serde_path_to_error::deserialize(doc).map_err(|e| {
            Error::Config(format!(
                "{}: not a TrainingJob the trainer can read: {}: {}",
                path.display(),
                e.path(),
                e.inner()
            ))
        })?;
        // Absolute, so that the resolved file `launch` hands its ranks means the same.
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let base = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
        resolve_paths(&mut job, &base);
        check(&job).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(Self {
            job,
            path: path.to_path_buf(),
        })
    }

    /// Ranks in the whole job: workers x processes per worker.
    pub fn world_size(&self) -> usize {
        let d = &self.job.spec.distribution;
        (d.workers.max(1) * d.processes_per_worker.max(1)) as usize
    }

    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(&self.job.spec.output.path)
    }

    /// The resolved job as YAML (what `launch` hands its ranks).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(&self.job).expect("a TrainingJob serialises")
    }
}

/// `a.b.c=value` sets `spec.a.b.c` (a leading `spec.` is accepted too).
fn apply_override(doc: &mut Value, assignment: &str) -> Result<()> {
    let (key, raw) = assignment.split_once('=').ok_or_else(|| {
        Error::Config(format!(
            "--set {assignment:?}: expected FIELD=VALUE, e.g. training.epochs=1"
        ))
    })?;
    let value: Value = serde_yaml::from_str(raw).unwrap_or_else(|_| Value::String(raw.into()));
    let key = key.trim();
    let key = key.strip_prefix("spec.").unwrap_or(key);
    let mut node = doc
        .as_mapping_mut()
        .ok_or_else(|| Error::Config("the TrainingJob file is not a YAML mapping".into()))?
        .entry(Value::String("spec".into()))
        .or_insert_with(|| Value::Mapping(Default::default()));
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if part.is_empty() {
            return Err(Error::Config(format!(
                "--set {assignment:?}: empty field name"
            )));
        }
        let map = node.as_mapping_mut().ok_or_else(|| {
            Error::Config(format!(
                "--set {assignment:?}: spec.{} is not a mapping",
                parts[..i].join(".")
            ))
        })?;
        let entry = map
            .entry(Value::String((*part).into()))
            .or_insert_with(|| Value::Mapping(Default::default()));
        if i + 1 == parts.len() {
            *entry = value;
            return Ok(());
        }
        node = entry;
    }
    Ok(())
}

fn resolve_paths(job: &mut TrainingJob, base: &Path) {
    let resolve = |p: &mut String| {
        let named = p.starts_with("hf://") || p.starts_with("random:");
        if !p.is_empty() && !named && Path::new(p.as_str()).is_relative() {
            *p = base.join(p.as_str()).to_string_lossy().into_owned();
        }
    };
    let spec = &mut job.spec;
    resolve(&mut spec.model.source);
    resolve(&mut spec.data.train);
    if let Some(v) = spec.data.validation.as_mut() {
        resolve(v);
    }
    resolve(&mut spec.output.path);
    if let Some(d) = spec.training.distillation.as_mut() {
        resolve(&mut d.teacher);
    }
}

/// The schema's ranges and rules for every field the trainer reads.
pub fn check(job: &TrainingJob) -> std::result::Result<(), String> {
    let s = &job.spec;
    let t = &s.training;
    let positive = |v: f64, field: &str| {
        if v > 0.0 && v.is_finite() {
            Ok(())
        } else {
            Err(format!("spec.{field} must be a positive number, got {v}"))
        }
    };
    positive(t.learning_rate, "training.learningRate")?;
    if t.epochs == 0 {
        return Err("spec.training.epochs must be at least 1".into());
    }
    if t.batch_size == 0 {
        return Err("spec.training.batchSize must be at least 1".into());
    }
    if t.gradient_accumulation_steps == 0 {
        return Err("spec.training.gradientAccumulationSteps must be at least 1".into());
    }
    if t.max_sequence_length < 2 {
        return Err("spec.training.maxSequenceLength must be at least 2 ([CLS] and [SEP])".into());
    }
    if !(0.0..1.0).contains(&t.warmup_ratio.unwrap_or(0.0)) {
        return Err("spec.training.warmupRatio must be in [0, 1)".into());
    }
    if t.max_grad_norm < 0.0 || t.weight_decay < 0.0 {
        return Err("spec.training.maxGradNorm and weightDecay cannot be negative".into());
    }
    if let Some(d) = &t.distillation {
        positive(d.temperature, "training.distillation.temperature")?;
        if !(0.0..=1.0).contains(&d.alpha) {
            return Err(format!(
                "spec.training.distillation.alpha must be in [0, 1], got {}",
                d.alpha
            ));
        }
    }
    if !(0.0..=0.5).contains(&s.data.validation_split) {
        return Err(format!(
            "spec.data.validationSplit must be in [0, 0.5], got {}",
            s.data.validation_split
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = s.model.labels.iter().find(|l| !seen.insert(l.as_str())) {
        return Err(format!("spec.model.labels names {dup:?} twice"));
    }
    if let (Some(n), false) = (s.model.num_classes, s.model.labels.is_empty())
        && n as usize != s.model.labels.len()
    {
        return Err(format!(
            "spec.model.labels has {} entries but spec.model.numClasses is {n}",
            s.model.labels.len()
        ));
    }
    if s.model.num_classes.is_none() && s.model.labels.is_empty() {
        return Err("set spec.model.numClasses or spec.model.labels".into());
    }
    if s.distribution.workers < 1 || s.distribution.processes_per_worker < 1 {
        return Err("spec.distribution.workers and processesPerWorker must be at least 1".into());
    }
    if let Some(a) = &s.data.augmentation {
        if !(0.05..=1.0).contains(&a.min_crop_scale) {
            return Err(format!(
                "spec.data.augmentation.minCropScale must be in [0.05, 1], got {}",
                a.min_crop_scale
            ));
        }
        if !(0.0..=1.0).contains(&a.color_jitter) {
            return Err(format!(
                "spec.data.augmentation.colorJitter must be in [0, 1], got {}",
                a.color_jitter
            ));
        }
        if !(0.0..=45.0).contains(&a.max_rotation_degrees) {
            return Err(format!(
                "spec.data.augmentation.maxRotationDegrees must be in [0, 45], got {}",
                a.max_rotation_degrees
            ));
        }
    }
    if !(8..=1024).contains(&s.data.image_size) {
        return Err(format!(
            "spec.data.imageSize must be in [8, 1024], got {}",
            s.data.image_size
        ));
    }
    if s.model.layers == Some(0) {
        return Err("spec.model.layers must be at least 1".into());
    }
    if s.model.layers.is_some() && s.model.architecture != Architecture::Bert {
        return Err("spec.model.layers (a BERT student's layer count) applies only to bert".into());
    }
    if s.model.source.starts_with("random:") && s.model.architecture != Architecture::Resnet {
        return Err(
            "spec.model.source random:resnetN initialises a resnet from scratch; bert starts \
             from pretrained weights"
                .into(),
        );
    }
    let text = matches!(
        s.data.format,
        DataFormat::Csv | DataFormat::Tsv | DataFormat::Jsonl
    );
    match (s.model.architecture, text) {
        (Architecture::Bert, true) | (Architecture::Resnet, false) => Ok(()),
        (Architecture::Bert, false) => Err(format!(
            "spec.data.format {:?} holds images; a bert model reads csv, tsv or jsonl",
            s.data.format
        )),
        (Architecture::Resnet, true) => Err(format!(
            "spec.data.format {:?} holds text; a resnet model reads imagefolder or idx",
            s.data.format
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "apiVersion: ringmaster.dev/v1alpha1\nkind: TrainingJob\nmetadata: {name: t}\n\
        spec:\n  model: {architecture: bert, source: models/m, labels: [ham, spam]}\n  \
        data: {train: data/train.tsv, format: tsv}\n  output: {path: runs/t}\n";

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("job.yaml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn overrides_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), JOB);
        let sets = [
            "training.epochs=1".to_string(),
            "spec.training.learningRate=1e-4".into(),
        ];
        let job = JobFile::load(&path, &sets).unwrap();
        let spec = &job.job.spec;
        assert_eq!(spec.training.epochs, 1);
        assert_eq!(spec.training.learning_rate, 1e-4);
        assert_eq!(
            PathBuf::from(&spec.data.train),
            dir.path().join("data/train.tsv")
        );
        assert_eq!(job.output_dir(), dir.path().join("runs/t"));
        assert_eq!(
            PathBuf::from(&spec.model.source),
            dir.path().join("models/m")
        );
        assert_eq!(job.world_size(), 1);
    }

    #[test]
    fn bad_values_name_the_field_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), JOB);
        for (set, field) in [
            ("training.learningRate=0", "spec.training.learningRate"),
            ("model.labels=[a, a]", "spec.model.labels"),
            (
                "training.distillation={teacher: x, temperature: 0}",
                "temperature",
            ),
            ("data.format=idx", "spec.data.format"),
            ("model.layers=0", "spec.model.layers"),
            ("model.source=random:resnet18", "spec.model.source random:"),
            (
                "data.augmentation={maxRotationDegrees: 90}",
                "maxRotationDegrees",
            ),
            ("training.epochs=oops", "epochs"),
            ("training", "FIELD=VALUE"),
        ] {
            let err = JobFile::load(&path, &[set.to_string()])
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{set}: {err}");
        }
        let broken = write(dir.path(), "spec: [unclosed");
        let err = JobFile::load(&broken, &[]).unwrap_err().to_string();
        assert!(
            err.contains("job.yaml") && err.contains("not valid YAML"),
            "{err}"
        );
    }
}
