//! Training-capable models on candle. Stock candle-transformers BERT and ResNet do not
//! train (see docs in `ops`): this crate holds differentiable fused ops with hand-written
//! backward passes and models built from a `VarBuilder` with the weight names of the
//! checkpoints users have (Hugging Face, torchvision).

pub mod models;
pub mod ops;
