//! Models built from a `VarBuilder`.

pub mod batch_norm;
pub mod resnet;
pub mod bert;
