//! Differentiable ops candle lacks (custom ops with hand-written backward passes).
