//! Checkpoints that resume bit-for-bit: the model's variables, the optimizer's moments
//! (safetensors) and the step, epoch, random stream and optimizer metadata (JSON).
//!
//! With DDP, average the buffers on every rank first (`Ddp::average_buffers`); rank 0
//! then writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::error::{Error, Result};
use crate::optim::OptimizerMeta;
use crate::params::ModelVars;
use crate::rng::TrainRng;
use crate::step::Stepper;

pub const MODEL_FILE: &str = "model.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "trainer_state.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: u64,
    pub epoch: u64,
    pub rng: TrainRng,
    pub optimizer: OptimizerMeta,
}

/// Where training stands besides the variables: what the caller's loop needs back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resumed {
    pub step: u64,
    pub epoch: u64,
    pub rng: TrainRng,
}

pub fn save(
    dir: &Path,
    vars: &ModelVars,
    stepper: &Stepper,
    epoch: u64,
    rng: &TrainRng,
) -> Result<()> {
    if stepper.mid_step() {
        return Err(Error::Config(
            "a checkpoint must be taken between optimizer steps, not between micro-batches".into(),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        what: "creating checkpoint directory",
        path: dir.to_path_buf(),
        source,
    })?;
    // f32 master weights replace their low-precision copies: the checkpoint keeps full
    // precision.
    let model: HashMap<String, Tensor> = vars
        .all()
        .into_iter()
        .chain(stepper.master_params().iter().cloned())
        .map(|v| (v.name, v.var.as_tensor().clone()))
        .collect();
    let (meta, moments) = stepper.optimizer().state();
    let state = TrainerState {
        step: stepper.step(),
        epoch,
        rng: *rng,
        optimizer: meta,
    };
    write_atomically(&dir.join(MODEL_FILE), |tmp| {
        Ok(candle_core::safetensors::save(&model, tmp)?)
    })?;
    write_atomically(&dir.join(OPTIMIZER_FILE), |tmp| {
        Ok(candle_core::safetensors::save(
            &moments.into_iter().collect(),
            tmp,
        )?)
    })?;
    let json = serde_json::to_vec_pretty(&state).expect("trainer state serialises");
    write_atomically(&dir.join(STATE_FILE), |tmp| {
        std::fs::write(tmp, &json).map_err(|source| Error::Io {
            what: "writing",
            path: tmp.to_path_buf(),
            source,
        })
    })
}

/// Restores a checkpoint written by [`save`] into a freshly built model and stepper.
pub fn load(dir: &Path, vars: &ModelVars, stepper: &mut Stepper) -> Result<Resumed> {
    let state_path = dir.join(STATE_FILE);
    let raw = std::fs::read(&state_path).map_err(|source| Error::Io {
        what: "reading",
        path: state_path.clone(),
        source,
    })?;
    let state: TrainerState = serde_json::from_slice(&raw).map_err(|e| Error::Checkpoint {
        path: state_path.clone(),
        detail: format!("not a ringmaster trainer state: {e}"),
    })?;

    let model_path = dir.join(MODEL_FILE);
    let model = read_tensors(&model_path)?;
    let masters = stepper.master_params().to_vec();
    for v in vars.all().iter().chain(&masters) {
        let t = model.get(&v.name).ok_or_else(|| Error::Checkpoint {
            path: model_path.clone(),
            detail: format!("tensor {} is missing", v.name),
        })?;
        if t.shape() != v.var.shape() {
            return Err(Error::Checkpoint {
                path: model_path.clone(),
                detail: format!(
                    "tensor {} has shape {:?}, the model expects {:?}",
                    v.name,
                    t.dims(),
                    v.var.dims()
                ),
            });
        }
        v.var
            .set(&t.to_device(v.var.device())?.to_dtype(v.var.dtype())?)?;
    }
    let mut extra: Vec<_> = model.keys().filter(|k| !vars.contains(k)).collect();
    if !extra.is_empty() {
        extra.sort();
        warn!(path = %model_path.display(), ?extra, "checkpoint tensors the model does not use");
    }

    let optimizer_path = dir.join(OPTIMIZER_FILE);
    let moments = read_tensors(&optimizer_path)?;
    stepper.optimizer_mut().load_state(
        &masters,
        &state.optimizer,
        &moments,
        &optimizer_path.display().to_string(),
    )?;
    stepper.set_step(state.step);
    Ok(Resumed {
        step: state.step,
        epoch: state.epoch,
        rng: state.rng,
    })
}

fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        detail: format!("unreadable safetensors: {e}"),
    })
}

/// Writes through a temporary file and renames, so a crash leaves the old file or the new
/// one, never half of one.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    write(&tmp)?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        what: "renaming into place",
        path: path.to_path_buf(),
        source,
    })
}
