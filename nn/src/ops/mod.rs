//! Differentiable ops candle lacks (custom ops with hand-written backward passes).

pub mod attention;
pub mod batch_norm;
pub mod blas;
pub mod conv2d;
pub mod dropout;
mod few_rows;
mod float;
pub mod gelu;
pub mod layer_norm;
pub mod linear;
mod matmul;
pub mod max_pool;
pub mod residual;
pub mod residual_norm;
pub mod softmax;
