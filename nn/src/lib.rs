//! Training-capable models on candle. Stock candle-transformers BERT and ResNet do not
//! train (LayerNorm and 3x3/2 max-pool have no backward, BatchNorm is eval-only): this
//! crate holds differentiable fused ops with hand-written backward passes and models
//! built from a `VarBuilder` with the weight names of the checkpoints users have
//! (Hugging Face, torchvision).

mod error;
pub mod gradcheck;
pub mod models;
pub mod ops;

pub use error::{Error, Result};
