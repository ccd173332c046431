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
}

impl ModelVars {
    pub fn new(frozen: NamePatterns, buffers: NamePatterns) -> Self {
        ModelVars {
            varmap: VarMap::new(),
            frozen,
            buffers,
        }
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
