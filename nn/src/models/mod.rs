//! Models built from a `VarBuilder`.

pub mod batch_norm;
pub mod bert;
pub mod resnet;
