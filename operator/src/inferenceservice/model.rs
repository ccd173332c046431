//! Pure: which model an InferenceService serves, under which version string, and the
//! volumes it is read from. A `trainingJobRef` resolves only once its job has succeeded;
//! until then the reason says what it waits for.

use std::path::Path;

use k8s_openapi::api::core::v1::{Volume, VolumeMount};
use ringmaster_crds::{JobPhase, ServedModel, TrainingJob, find_condition};

/// A model the replicas can load.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The `--model` argument: an `hf://` source or a directory.
    pub uri: String,
    /// What is served, as `status.modelVersion` and the pod-template annotation: a new
    /// version rolls the replicas.
    pub version: String,
    /// The training job's volumes holding the checkpoint, and their mounts (read-only).
    pub volumes: Vec<Volume>,
    pub volume_mounts: Vec<VolumeMount>,
}

/// Why there is no model to serve yet.
#[derive(Debug, Clone, PartialEq)]
pub struct Unresolved {
    pub reason: &'static str,
    pub message: String,
}

pub mod reason {
    pub const WAITING: &str = "WaitingForTrainingJob";
    pub const NOT_FOUND: &str = "TrainingJobNotFound";
    pub const FAILED: &str = "TrainingJobFailed";
    pub const NOT_ON_VOLUME: &str = "CheckpointNotOnVolume";
}

/// Resolves `model`; `job` is the referenced TrainingJob when it exists (None for a
/// `source`, or a job that is not there).
pub fn resolve(model: &ServedModel, job: Option<&TrainingJob>) -> Result<Resolved, Unresolved> {
    // The schema admits exactly one of `source` and `trainingJobRef`.
    let Some(job_ref) = &model.training_job_ref else {
        let source = model.source.clone().unwrap_or_default();
        return Ok(Resolved {
            uri: source.clone(),
            version: source,
            volumes: Vec::new(),
            volume_mounts: Vec::new(),
        });
    };
    let name = &job_ref.name;
    let unresolved = |reason, message| Err(Unresolved { reason, message });
    let Some(job) = job else {
        return unresolved(
            reason::NOT_FOUND,
            format!("TrainingJob {name} does not exist in this namespace"),
        );
    };
    let status = job.status.clone().unwrap_or_default();
    match status.phase {
        Some(JobPhase::Succeeded) => {}
        Some(JobPhase::Failed) => {
            let why = find_condition(&status.conditions, "Failed")
                .map(|c| format!(": {}: {}", c.reason, c.message))
                .unwrap_or_default();
            return unresolved(reason::FAILED, format!("TrainingJob {name} failed{why}"));
        }
        phase => {
            let phase = phase.map_or("Pending".to_string(), |p| format!("{p:?}"));
            let epoch = status
                .progress
                .as_ref()
                .and_then(|p| p.epoch_display.as_deref())
                .map(|e| format!(", epoch {e}"))
                .unwrap_or_default();
            return unresolved(
                reason::WAITING,
                format!("waiting for TrainingJob {name} to succeed (phase {phase}{epoch})"),
            );
        }
    }

    // The trainer reports where it wrote the best model; an older trainer that did not
    // still wrote it to `<output>/best` (the output directory contract).
    let checkpoint = status
        .progress
        .as_ref()
        .and_then(|p| p.best_checkpoint.clone())
        .unwrap_or_else(|| format!("{}/best", job.spec.output.path.trim_end_matches('/')));
    let (volumes, volume_mounts) = checkpoint_volumes(job, &checkpoint);
    if volumes.is_empty() {
        return unresolved(
            reason::NOT_ON_VOLUME,
            format!(
                "TrainingJob {name}'s best model {checkpoint} is on no volume that outlives its \
                 pods: mount a PersistentVolumeClaim (or another shared volume) over \
                 spec.output.path in the job"
            ),
        );
    }
    // The path alone stays the same when the job is run again (deleted and re-created);
    // the completion time tells the runs apart.
    let completed = status
        .completion_time
        .map(|t| format!("#{}", t.0))
        .unwrap_or_default();
    Ok(Resolved {
        version: format!("{name}@{checkpoint}{completed}"),
        uri: checkpoint,
        volumes,
        volume_mounts,
    })
}

/// The job's mounts whose mount path contains `path` (read-only), and their volumes.
/// An emptyDir ends with the trainer's pod, so it can hold no model to serve.
fn checkpoint_volumes(job: &TrainingJob, path: &str) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes: Vec<Volume> = Vec::new();
    let mut mounts = Vec::new();
    for mount in &job.spec.volume_mounts {
        if !Path::new(path).starts_with(&mount.mount_path) {
            continue;
        }
        let Some(volume) = job.spec.volumes.iter().find(|v| v.name == mount.name) else {
            continue;
        };
        if volume.empty_dir.is_some() {
            continue;
        }
        if !volumes.iter().any(|v| v.name == volume.name) {
            volumes.push(volume.clone());
        }
        mounts.push(VolumeMount {
            read_only: Some(true),
            ..mount.clone()
        });
    }
    (volumes, mounts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn served(yaml: &str) -> ServedModel {
        serde_yaml::from_str(yaml).unwrap()
    }

    fn job(status: &str) -> TrainingJob {
        serde_yaml::from_str(&format!(
            r#"
apiVersion: ringmaster.dev/v1alpha1
kind: TrainingJob
metadata: {{name: spam}}
spec:
  model: {{architecture: bert, source: /models/minilm, numClasses: 2}}
  data: {{train: /data/train.csv, format: csv}}
  volumes:
  - {{name: data, persistentVolumeClaim: {{claimName: data}}}}
  - {{name: out, persistentVolumeClaim: {{claimName: out}}}}
  - {{name: scratch, emptyDir: {{}}}}
  volumeMounts:
  - {{name: data, mountPath: /data}}
  - {{name: out, mountPath: /output}}
  - {{name: scratch, mountPath: /output/tmp}}
{status}"#
        ))
        .unwrap()
    }

    const BY_REF: &str = "{architecture: bert, trainingJobRef: {name: spam}}";

    #[test]
    fn a_source_is_served_as_is() {
        let model = served("{architecture: bert, source: 'hf://org/bert@v2'}");
        let resolved = resolve(&model, None).unwrap();
        assert_eq!(resolved.uri, "hf://org/bert@v2");
        assert_eq!(resolved.version, "hf://org/bert@v2");
        assert!(resolved.volumes.is_empty());
    }

    #[test]
    fn a_job_reference_waits_for_success_and_names_the_phase() {
        let model = served(BY_REF);
        let missing = resolve(&model, None).unwrap_err();
        assert_eq!(missing.reason, reason::NOT_FOUND);
        let running = job(
            "status: {phase: Running, progress: {epoch: 2, totalEpochs: 3, epochDisplay: 2/3}}",
        );
        let waiting = resolve(&model, Some(&running)).unwrap_err();
        assert_eq!(waiting.reason, reason::WAITING);
        assert!(
            waiting.message.contains("spam") && waiting.message.contains("phase Running"),
            "{}",
            waiting.message
        );
        let failed = job(
            "status: {phase: Failed, conditions: [{type: Failed, status: 'True', reason: BackoffLimitExceeded, message: 'worker 1 exited 1', lastTransitionTime: '2025-01-01T00:00:00Z'}]}",
        );
        let failed = resolve(&model, Some(&failed)).unwrap_err();
        assert_eq!(failed.reason, reason::FAILED);
        assert!(failed.message.contains("BackoffLimitExceeded"));
    }

    #[test]
    fn a_succeeded_job_serves_its_best_model_from_the_covering_volume() {
        let model = served(BY_REF);
        let done = job(
            "status: {phase: Succeeded, completionTime: '2025-01-01T10:00:00Z', progress: {bestCheckpoint: /output/run1/best}}",
        );
        let resolved = resolve(&model, Some(&done)).unwrap();
        assert_eq!(resolved.uri, "/output/run1/best");
        assert_eq!(
            resolved.version,
            "spam@/output/run1/best#2025-01-01T10:00:00Z"
        );
        let names: Vec<&str> = resolved.volumes.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["out"], "only the volume holding the model");
        assert_eq!(resolved.volume_mounts.len(), 1);
        assert_eq!(resolved.volume_mounts[0].mount_path, "/output");
        assert_eq!(resolved.volume_mounts[0].read_only, Some(true));

        // Without a reported path: `<output>/best`; a prefix that is not a path
        // component (`/output-old`) covers nothing.
        let mut bare = job("status: {phase: Succeeded}");
        assert_eq!(resolve(&model, Some(&bare)).unwrap().uri, "/output/best");
        bare.spec.output.path = "/output-old".into();
        assert_eq!(
            resolve(&model, Some(&bare)).unwrap_err().reason,
            reason::NOT_ON_VOLUME
        );
    }
}
