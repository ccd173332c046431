//! `BertConfig`: the fields of a Hugging Face BERT `config.json` the model needs.

use crate::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// The activation between the two feed-forward layers of every encoder layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum HiddenAct {
    /// The exact GELU (`x * Phi(x)`), Hugging Face `"gelu"`.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation, Hugging Face `"gelu_new"` / `"gelu_pytorch_tanh"`.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub hidden_act: HiddenAct,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier; `None` means `hidden_dropout_prob`, as in transformers.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

fn default_dropout() -> f64 {
    0.1
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_initializer_range() -> f64 {
    0.02
}

/// The fields that say which model a config describes, checked before the rest.
#[derive(Deserialize)]
struct ModelKind {
    model_type: Option<String>,
    #[serde(default)]
    architectures: Vec<String>,
    position_embedding_type: Option<String>,
}

impl BertConfig {
    /// Reads and validates a Hugging Face `config.json`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            file: path.to_owned(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::from_json(&text).map_err(|reason| Error::Config {
            file: path.to_owned(),
            reason,
        })
    }

    /// The shape of all-MiniLM-L6-v2 (what the benchmarks build with random weights when
    /// the checkpoint is not installed: same cost).
    pub fn minilm_l6() -> Self {
        Self::from_json(
            r#"{"model_type": "bert", "architectures": ["BertModel"],
                "vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6,
                "num_attention_heads": 12, "intermediate_size": 1536, "hidden_act": "gelu",
                "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12}"#,
        )
        .expect("a valid BERT config")
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let kind: ModelKind = serde_json::from_str(text).map_err(|e| e.to_string())?;
        match kind.model_type.as_deref() {
            Some("bert") => {}
            Some(other) => {
                return Err(format!(
                    "model_type `{other}` is not supported, expected `bert`"
                ));
            }
            None => return Err("missing field `model_type` (expected `bert`)".into()),
        }
        if let Some(arch) = kind.architectures.iter().find(|a| !a.starts_with("Bert")) {
            return Err(format!(
                "architecture `{arch}` is not supported, expected a BERT architecture such as `BertModel`"
            ));
        }
        match kind.position_embedding_type.as_deref() {
            None | Some("absolute") => {}
            Some(other) => {
                return Err(format!(
                    "position_embedding_type `{other}` is not supported, expected `absolute`"
                ));
            }
        }
        let config: Self = serde_json::from_str(text).map_err(|e| e.to_string())?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
            ("classifier_dropout", self.classifier_dropout()),
        ] {
            if !(0.0..1.0).contains(&p) {
                return Err(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        Ok(())
    }

    pub fn head_size(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    pub fn classifier_dropout(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINILM: &str = r#"{
        "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 384,
        "initializer_range": 0.02, "intermediate_size": 1536, "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
        "num_hidden_layers": 6, "pad_token_id": 0, "position_embedding_type": "absolute",
        "type_vocab_size": 2, "vocab_size": 30522 }"#;

    #[test]
    fn parses_a_hugging_face_config() {
        let config = BertConfig::from_json(MINILM).unwrap();
        assert_eq!(config.hidden_act, HiddenAct::Gelu);
        assert_eq!((config.hidden_size, config.head_size()), (384, 32));
        assert_eq!(config.classifier_dropout(), 0.1);
    }

    #[test]
    fn rejects_what_the_model_cannot_run_and_names_it() {
        let cases = [
            (MINILM.replace("\"gelu\"", "\"swish\""), "swish"),
            (
                MINILM.replace("\"bert\"", "\"roberta\""),
                "model_type `roberta`",
            ),
            (
                MINILM.replace("BertModel", "GPT2LMHeadModel"),
                "architecture `GPT2LMHeadModel`",
            ),
            (
                MINILM.replace("\"absolute\"", "\"relative_key\""),
                "relative_key",
            ),
            (
                MINILM.replace("\"num_attention_heads\": 12", "\"num_attention_heads\": 7"),
                "not a multiple",
            ),
            (
                MINILM.replace("\"hidden_size\": 384,", ""),
                "missing field `hidden_size`",
            ),
        ];
        for (json, expected) in cases {
            let err = BertConfig::from_json(&json).unwrap_err();
            assert!(err.contains(expected), "{expected:?} not in {err:?}");
        }
    }

    #[test]
    fn file_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("bert-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, MINILM.replace("\"gelu\"", "\"tanh\"")).unwrap();
        let err = BertConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&path.display().to_string()) && err.contains("tanh"),
            "{err}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
