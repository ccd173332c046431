//! Differentiable ops candle lacks (custom ops with hand-written backward passes).
mod float;
pub mod gelu;
pub mod layer_norm;
pub mod softmax;
