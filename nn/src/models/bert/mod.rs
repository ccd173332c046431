//! BERT that trains: Hugging Face weight names, fused LayerNorm/softmax/GELU with
//! hand-written backward passes, dropout only when training, a dtype-safe attention mask.

mod config;
mod layers;
mod load;
mod model;

pub use config::{BertConfig, HiddenAct};
pub use layers::attention_bias;
pub use load::{check_vocabulary, load_sequence_classifier, load_tokenizer, load_weights};
pub use model::{
    BertForSequenceClassification, BertInput, BertModel, ClassifierOutput, Pooling, Sequence,
};
