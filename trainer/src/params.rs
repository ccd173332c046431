//! The model's variables by name: which are trained, which are frozen, which are buffers
//! (BatchNorm running statistics), and a `VarBuilder` that serves frozen weights and
//! buffers detached so backward never computes gradients for them.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use regex::Regex;

use crate::error::{Error, Result};

/// A list of name patterns: globs (`*` any run of characters, `?` one character, matched
/// against the whole name) or regular expressions written `re:<regex>` (searched).
#[derive(Debug, Clone, Default)]
pub struct NamePatterns(Vec<Pattern>);

#[derive(Debug, Clone)]
enum Pattern {
    Glob(String),
    Regex(Regex),
}

impl NamePatterns {
    pub fn parse<S: AsRef<str>>(patterns: &[S]) -> Result<Self> {
        patterns
            .iter()
            .map(|p| {
                let p = p.as_ref();
                match p.strip_prefix("re:") {
                    Some(re) => Regex::new(re).map(Pattern::Regex).map_err(|e| {
                        Error::Config(format!("name pattern {p:?} is not a valid regex: {e}"))
                    }),
                    None => Ok(Pattern::Glob(p.to_string())),
                }
            })
            .collect::<Result<_>>()
            .map(NamePatterns)
    }

    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| match p {
            Pattern::Glob(g) => glob_match(g.as_bytes(), name.as_bytes()),
            Pattern::Regex(r) => r.is_match(name),
        })
    }
}

fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| glob_match(rest, &name[i..])),
        Some((&c, rest)) => match name.split_first() {
            Some((&n, name_rest)) if c == b'?' || c == n => glob_match(rest, name_rest),
            _ => false,
        },
    }
}

/// Names that are buffers rather than parameters (torch's `register_buffer` in BatchNorm).
pub fn default_buffer_patterns() -> NamePatterns {
    NamePatterns::parse(&["*running_mean", "*running_var", "*num_batches_tracked"])
        .expect("valid globs")
}

/// Parameters excluded from weight decay: by the Hugging Face convention biases and
/// normalisation weights (LayerNorm / BatchNorm by name, including the old `gamma`/`beta`
/// names and torchvision's `bn1`), and by timm's every tensor of rank 0 or 1, which also
/// catches norms whose names say nothing (torchvision's `downsample.1.weight`).
pub fn no_decay(name: &str, rank: usize) -> bool {
    let lower = name.to_ascii_lowercase();
    let leaf = lower.rsplit('.').next().unwrap_or(&lower);
    rank <= 1
        || leaf == "bias"
        || leaf == "gamma"
        || leaf == "beta"
        || lower.contains("norm")
        || lower.split('.').any(|seg| seg.starts_with("bn"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Trainable,
    /// Served detached: no gradient, no optimizer state, not all-reduced.
    Frozen,
    /// Not a parameter: broadcast at start, averaged on demand, never optimized.
    Buffer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Trainable => "trainable",
            Role::Frozen => "frozen",
            Role::Buffer => "buffer",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
    pub role: Role,
}

/// A `VarMap` plus the rules that give each variable its role.
#[derive(Clone)]
pub struct ModelVars {
    varmap: VarMap,
    frozen: NamePatterns,
    buffers: NamePatterns,
    /// Random initialisation drawn from (seed, variable name) instead of candle's
    /// unseeded generator, so the same seed starts the same model.
    seed: Option<u64>,
}

impl ModelVars {
    pub fn new(frozen: NamePatterns, buffers: NamePatterns) -> Self {
        ModelVars {
            varmap: VarMap::new(),
            frozen,
            buffers,
            seed: None,
        }
    }

    /// Draws every random initialisation from `seed` and the variable's name.
    pub fn seeded(mut self, seed: u64) -> Self {
        self.seed = Some(seed);
        self
    }

    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    pub fn contains(&self, name: &str) -> bool {
        self.contains_tensor(name)
    }

    pub fn role(&self, name: &str) -> Role {
        if self.buffers.matches(name) {
            Role::Buffer
        } else if self.frozen.matches(name) {
            Role::Frozen
        } else {
            Role::Trainable
        }
    }

    /// Builds models over this map: variables are created on first use, frozen ones and
    /// buffers come back detached.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    /// Every variable, sorted by name so that all ranks agree on the order.
    pub fn all(&self) -> Vec<NamedVar> {
        let data = self.varmap.data().lock().expect("VarMap lock poisoned");
        let mut vars: Vec<NamedVar> = data
            .iter()
            .map(|(name, var)| NamedVar {
                name: name.clone(),
                var: var.clone(),
                role: self.role(name),
            })
            .collect();
        vars.sort_by(|a, b| a.name.cmp(&b.name));
        vars
    }

    pub fn with_role(&self, role: Role) -> Vec<NamedVar> {
        self.all().into_iter().filter(|v| v.role == role).collect()
    }

    pub fn trainable(&self) -> Vec<NamedVar> {
        self.with_role(Role::Trainable)
    }
}

impl SimpleBackend for ModelVars {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Some(seed) = self.seed
            && !self.contains_tensor(name)
            && let Some(values) = seeded_init(&shape, init, seed, name)
        {
            let var = Var::from_tensor(
                &Tensor::from_vec(values, shape.clone(), device)?.to_dtype(dtype)?,
            )?;
            self.varmap
                .data()
                .lock()
                .map_err(|_| candle_core::Error::Msg("VarMap lock poisoned".into()))?
                .insert(name.to_string(), var);
        }
        let t = self.varmap.get(shape, name, init, dtype, device)?;
        Ok(match self.role(name) {
            Role::Trainable => t,
            Role::Frozen | Role::Buffer => t.detach(),
        })
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("variable {name}: model variables are created with a shape (`get`)")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

/// candle's random initialisations (`Init::var`), drawn from a stream seeded by `seed`
/// and the variable's name; None for constants, which need no randomness.
fn seeded_init(shape: &Shape, init: Init, seed: u64, name: &str) -> Option<Vec<f32>> {
    use candle_nn::init::NormalOrUniform;
    let (uniform, a, b) = match init {
        Init::Const(_) => return None,
        Init::Uniform { lo, up } => (true, lo, up),
        Init::Randn { mean, stdev } => (false, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => (true, -(3f64.sqrt()) * std, 3f64.sqrt() * std),
                NormalOrUniform::Normal => (false, 0.0, std),
            }
        }
    };
    let name_hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut rng = crate::rng::TrainRng::new(seed ^ name_hash);
    let mut unit = || ((rng.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    Some(
        (0..shape.elem_count())
            .map(|_| {
                let v = if uniform {
                    a + (b - a) * unit()
                } else {
                    // Box-Muller: one normal from two uniforms.
                    a + b * (-2.0 * unit().ln()).sqrt() * (std::f64::consts::TAU * unit()).cos()
                };
                v as f32
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_and_regexes_match_whole_names() {
        let p =
            NamePatterns::parse(&["bert.embeddings.*", "re:layer\\.[01]\\.", "fc?.bias"]).unwrap();
        assert!(p.matches("bert.embeddings.word_embeddings.weight"));
        assert!(p.matches("bert.encoder.layer.1.attention.self.query.weight"));
        assert!(!p.matches("bert.encoder.layer.2.attention.self.query.weight"));
        assert!(p.matches("fc1.bias"));
        assert!(!p.matches("fc1.weight"));
        assert!(!p.matches("xbert.embeddings"));
        let err = NamePatterns::parse(&["re:("]).unwrap_err().to_string();
        assert!(err.contains("re:("), "{err}");
    }

    #[test]
    fn decay_exclusion_follows_the_hugging_face_convention() {
        for name in [
            "classifier.bias",
            "bert.embeddings.LayerNorm.weight",
            "bert.encoder.layer.0.output.LayerNorm.gamma",
            "layer1.0.bn1.weight",
            "encoder.norm.weight",
            "x.beta",
        ] {
            assert!(no_decay(name, 2), "{name} should not decay");
        }
        assert!(no_decay("layer1.0.downsample.1.weight", 1));
        for name in [
            "classifier.weight",
            "layer1.0.conv1.weight",
            "bert.pooler.dense.weight",
        ] {
            assert!(!no_decay(name, 2), "{name} should decay");
        }
    }

    #[test]
    fn seeded_initialisation_repeats_and_keeps_the_distribution() -> Result<()> {
        let draw = |seed| -> Result<Vec<f32>> {
            let vars =
                ModelVars::new(NamePatterns::default(), default_buffer_patterns()).seeded(seed);
            let vb = vars.var_builder(DType::F32, &Device::Cpu);
            let w = vb.get_with_hints(
                (64, 64),
                "w",
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?;
            Ok(w.flatten_all()?.to_vec1()?)
        };
        let first = draw(7)?;
        assert_eq!(first, draw(7)?, "same seed, same weights");
        assert_ne!(first, draw(8)?);
        let n = first.len() as f32;
        let mean = first.iter().sum::<f32>() / n;
        let std = (first.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / n).sqrt();
        assert!(
            mean.abs() < 0.002 && (std - 0.02).abs() < 0.001,
            "{mean} {std}"
        );
        Ok(())
    }

    #[test]
    fn frozen_weights_get_no_gradient() -> Result<()> {
        let vars = ModelVars::new(NamePatterns::parse(&["a"])?, default_buffer_patterns());
        let vb = vars.var_builder(DType::F32, &Device::Cpu);
        let a = vb.get_with_hints(3, "a", Init::Const(2.0))?;
        let b = vb.get_with_hints(3, "b", Init::Const(3.0))?;
        let grads = (a * &b)?.sum_all()?.backward()?;
        let all = vars.all();
        assert_eq!(all[0].role, Role::Frozen);
        assert!(grads.get(all[0].var.as_tensor()).is_none());
        assert!(grads.get(all[1].var.as_tensor()).is_some());
        Ok(())
    }
}
