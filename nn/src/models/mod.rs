//! Models built from a `VarBuilder`.
