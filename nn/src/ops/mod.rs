//! Differentiable ops candle lacks (custom ops with hand-written backward passes).

pub mod batch_norm;
pub mod conv2d;
mod cpu;
pub mod max_pool;
mod float;
pub mod dropout;
pub mod gelu;
pub mod layer_norm;
pub mod softmax;
