//! Multi-head scaled dot-product attention as one op over the packed query/key/value
//! projections, with a hand-written backward that recomputes the probabilities.
//!
//! Composed from candle ops, attention is a dozen graph nodes per layer: three head
//! splits (transpose + copy), a batched product, softmax, dropout, a second product and
//! the head merge, and candle's backward allocates and accumulates a full-size gradient
//! for every one of them; the score and probability tensors (batch x heads x seq²) are the
//! largest in BERT and stay alive until backward. Here each (batch item, head) is one
//! task: its scores live in a seq² scratch buffer, products are single-threaded `gemm`s on
//! strided views of the projections, and backward recomputes the probabilities (one more
//! small product) instead of storing them. The dropout mask is [`DropMask`]'s hash of the
//! element's position in the (batch, heads, seq, seq) probabilities, so this op drops
//! exactly what `dropout(softmax(..))` would with the same seed.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::dropout::{DropMask, dropout};
use super::float::{Real, dispatch_real, output_buffer, sum_zip};
use super::matmul::{Matrix, matmul, matmul_into};
use super::softmax::{attention_softmax, softmax_row};

/// `dropout(softmax(qkᵀ / sqrt(d) + bias)) v` for every batch item and head.
///
/// `qkv`: (batch * seq, 3 * hidden), the query, key and value projections side by side,
/// heads side by side within each; `bias`: (batch, 1, 1, seq) such as
/// [`attention_bias`](crate::models::bert::attention_bias); `dropout_p`: 0 when not
/// training. Returns the context (batch * seq, hidden). Differentiable in `qkv`. Fused
/// f32/f64 kernel on CPU, candle ops elsewhere.
pub fn attention(
    qkv: &Tensor,
    batch: usize,
    heads: usize,
    bias: Option<&Tensor>,
    dropout_p: f64,
) -> Result<Tensor> {
    let shape = Geometry::new(qkv.dims(), batch, heads)?;
    if let Some(bias) = bias
        && bias.dims() != [batch, 1, 1, shape.seq]
    {
        bail!(
            "attention: bias has shape {:?}, expected [{batch}, 1, 1, {}]",
            bias.dims(),
            shape.seq
        )
    }
    if !(0.0..1.0).contains(&dropout_p) {
        bail!("attention: dropout probability must be in [0, 1), got {dropout_p}")
    }
    if !qkv.device().is_cpu() || !matches!(qkv.dtype(), DType::F32 | DType::F64) {
        return composed(qkv, shape, bias, dropout_p);
    }
    let bias = match bias {
        Some(b) => Some(Arc::new(b.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?)),
        None => None,
    };
    let dropout = (dropout_p > 0.0).then(|| DropMask::next(dropout_p));
    qkv.contiguous()?.apply_op1(Attention {
        shape,
        packed: None,
        bias,
        dropout,
    })
}

/// Inference attention over sequences of different lengths packed end to end (`lengths`
/// rows each of `qkv`, no padding, no mask): one op for the whole batch, each sequence
/// attending only to itself. Returns the context (total rows, hidden). Not
/// differentiable.
pub fn attention_packed(qkv: &Tensor, lengths: &[usize], heads: usize) -> Result<Tensor> {
    let (rows, width) = qkv.dims2()?;
    let total: usize = lengths.iter().sum();
    if lengths.is_empty() || lengths.contains(&0) || total != rows {
        bail!("attention: {rows} projection rows do not split into sequences of {lengths:?} rows")
    }
    let longest = lengths.iter().copied().max().unwrap_or(1);
    if heads == 0 || width % (3 * heads) != 0 {
        bail!("attention: projections of width {width} do not split into 3 x {heads} heads")
    }
    let shape = Geometry {
        batch: lengths.len(),
        seq: longest,
        heads,
        head_size: width / (3 * heads),
    };
    if !qkv.device().is_cpu() || !matches!(qkv.dtype(), DType::F32 | DType::F64) {
        let mut start = 0;
        let mut contexts = Vec::with_capacity(lengths.len());
        for &len in lengths {
            let one = Geometry {
                batch: 1,
                seq: len,
                ..shape
            };
            contexts.push(composed(&qkv.narrow(0, start, len)?, one, None, 0.0)?);
            start += len;
        }
        return Tensor::cat(&contexts, 0);
    }
    let starts: Vec<usize> = std::iter::once(0)
        .chain(lengths.iter().scan(0, |end, &len| {
            *end += len;
            Some(*end)
        }))
        .collect();
    qkv.contiguous()?.apply_op1_no_bwd(&Attention {
        shape,
        packed: Some(starts.into()),
        bias: None,
        dropout: None,
    })
}

/// The same computation from candle ops, for other devices and dtypes.
fn composed(qkv: &Tensor, g: Geometry, bias: Option<&Tensor>, dropout_p: f64) -> Result<Tensor> {
    let split_heads = |part: usize| {
        qkv.narrow(1, part * g.hidden(), g.hidden())?
            .reshape((g.batch, g.seq, g.heads, g.head_size))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split_heads(0)?, split_heads(1)?, split_heads(2)?);
    let probs = attention_softmax(&q.matmul(&k.t()?)?, g.scale(), bias)?;
    let probs = if dropout_p > 0.0 {
        dropout(&probs, dropout_p)?
    } else {
        probs
    };
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((g.batch * g.seq, g.hidden()))
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    seq: usize,
    heads: usize,
    head_size: usize,
}

impl Geometry {
    fn new(dims: &[usize], batch: usize, heads: usize) -> Result<Self> {
        let &[rows, width] = dims else {
            bail!("attention: expects (batch * seq, 3 * hidden) projections, got {dims:?}")
        };
        if batch == 0 || heads == 0 || rows % batch != 0 || width % (3 * heads) != 0 {
            bail!(
                "attention: projections {dims:?} do not split into {batch} sequences and \
                 3 x {heads} heads"
            )
        }
        Ok(Self {
            batch,
            seq: rows / batch,
            heads,
            head_size: width / (3 * heads),
        })
    }

    fn hidden(&self) -> usize {
        self.heads * self.head_size
    }

    fn width(&self) -> usize {
        3 * self.hidden()
    }

    fn scale(&self) -> f64 {
        (self.head_size as f64).powf(-0.5)
    }
}

#[derive(Clone)]
struct Attention {
    /// With `packed`, `seq` is the longest sequence.
    shape: Geometry,
    /// The first row of each sequence, then the row count, when sequences of different
    /// lengths are packed end to end (inference: no bias, no dropout); None: `batch`
    /// sequences of `seq` rows.
    packed: Option<Arc<[usize]>>,
    /// (batch, seq) additive bias.
    bias: Option<Arc<Vec<f64>>>,
    dropout: Option<DropMask>,
}

/// A pointer that parallel tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut<T>(*mut T);
// SAFETY: every task writes only the rows and columns of its own (item, head).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// # Safety
    /// `offset` must stay inside the buffer.
    unsafe fn at(self, offset: usize) -> *mut T {
        // SAFETY: forwarded from the caller.
        unsafe { self.0.add(offset) }
    }
}

impl Attention {
    /// The first row and the length of sequence `item`.
    fn rows(&self, item: usize) -> (usize, usize) {
        match &self.packed {
            Some(starts) => (starts[item], starts[item + 1] - starts[item]),
            None => (item * self.shape.seq, self.shape.seq),
        }
    }

    fn total_rows(&self) -> usize {
        self.packed
            .as_ref()
            .map_or(self.shape.batch * self.shape.seq, |starts| {
                starts[self.shape.batch]
            })
    }

    /// Offsets in `qkv` of the first query, key and value element of (item, head).
    fn offsets(&self, item: usize, head: usize) -> [usize; 3] {
        let g = self.shape;
        let q = self.rows(item).0 * g.width() + head * g.head_size;
        [q, q + g.hidden(), q + 2 * g.hidden()]
    }

    /// Offset of the first element of (item, head) in the (rows, hidden) context.
    fn context_offset(&self, item: usize, head: usize) -> usize {
        self.rows(item).0 * self.shape.hidden() + head * self.shape.head_size
    }

    /// The softmax probabilities of (item, head) into `probs` (seq x seq of this item's
    /// length), using `scores` as scratch.
    fn probabilities<T: Real>(
        &self,
        qkv: &[T],
        bias: Option<&[T]>,
        (item, head): (usize, usize),
        scores: &mut [T],
        probs: &mut [T],
    ) {
        let g = self.shape;
        let [q, k, _] = self.offsets(item, head);
        let seq = self.rows(item).1;
        matmul(
            scores,
            (seq, seq, g.head_size),
            Matrix::strided(&qkv[q..], g.width(), 1),
            Matrix::strided(&qkv[k..], 1, g.width()),
            false,
        );
        let bias = bias.map(|b| &b[item * g.seq..(item + 1) * g.seq]);
        let scale = T::lit(g.scale());
        for (p, s) in probs.chunks_exact_mut(seq).zip(scores.chunks_exact(seq)) {
            softmax_row(p, s, scale, bias);
        }
    }

    /// Applies the dropout mask of (item, head) to `m` (seq x seq) in place, scaling kept
    /// elements by 1 / (1 - p): the forward on probabilities and the backward on their
    /// gradient are the same map.
    fn drop<T: Real>(&self, (item, head): (usize, usize), m: &mut [T]) {
        let Some(mask) = self.dropout else {
            return;
        };
        let scale = mask.scale();
        let base = ((item * self.shape.heads + head) * m.len()) as u32;
        for (i, v) in m.iter_mut().enumerate() {
            *v = mask.dropped(base + i as u32, *v, scale);
        }
    }

    fn bias_as<T: Real>(&self) -> Option<Vec<T>> {
        self.bias
            .as_ref()
            .map(|b| b.iter().map(|&v| T::lit(v)).collect())
    }

    fn tasks(&self) -> impl IndexedParallelIterator<Item = (usize, usize)> + use<> {
        let heads = self.shape.heads;
        (0..self.shape.batch * heads)
            .into_par_iter()
            .map(move |t| (t / heads, t % heads))
    }

    fn check_indexable(&self) -> Result<()> {
        let g = self.shape;
        if g.batch * g.heads * g.seq * g.seq > u32::MAX as usize {
            bail!("attention: more than 2^32 probabilities, the dropout mask cannot index them")
        }
        Ok(())
    }

    fn forward<T: Real>(&self, qkv: &[T]) -> Vec<T> {
        let g = self.shape;
        let bias = self.bias_as::<T>();
        let mut context = output_buffer(self.total_rows() * g.hidden());
        let out = SharedMut(context.as_mut_ptr());
        let scratch = || {
            (
                vec![T::zero(); g.seq * g.seq],
                vec![T::zero(); g.seq * g.seq],
            )
        };
        self.tasks()
            .for_each_init(scratch, |(scores, probs), task| {
                let seq = self.rows(task.0).1;
                let (scores, probs) = (&mut scores[..seq * seq], &mut probs[..seq * seq]);
                self.probabilities(qkv, bias.as_deref(), task, scores, probs);
                self.drop(task, probs);
                let [_, _, v] = self.offsets(task.0, task.1);
                // SAFETY: the (item, head) block of the context: seq rows of head_size
                // elements, `hidden` apart, written by this task only.
                unsafe {
                    matmul_into(
                        out.at(self.context_offset(task.0, task.1)),
                        g.hidden(),
                        (seq, g.head_size, seq),
                        Matrix::row_major(probs, seq),
                        Matrix::strided(&qkv[v..], g.width(), 1),
                        false,
                    )
                }
            });
        context
    }

    /// The gradient of `qkv` from the gradient of the context.
    fn backward<T: Real>(&self, qkv: &[T], d_context: &[T]) -> Vec<T> {
        let g = self.shape;
        let bias = self.bias_as::<T>();
        let mut d_qkv = output_buffer(qkv.len());
        let out = SharedMut(d_qkv.as_mut_ptr());
        let n = g.seq * g.seq;
        let scratch = || (vec![T::zero(); n], vec![T::zero(); n], vec![T::zero(); n]);
        let scale = T::lit(g.scale());
        self.tasks()
            .for_each_init(scratch, |(scores, probs, d_probs), task| {
                let [q, k, v] = self.offsets(task.0, task.1);
                let d_ctx = Matrix::strided(
                    &d_context[self.context_offset(task.0, task.1)..],
                    g.hidden(),
                    1,
                );
                self.probabilities(qkv, bias.as_deref(), task, scores, probs);
                // `scores` now holds the dropped probabilities the forward multiplied by v.
                scores.copy_from_slice(probs);
                self.drop(task, scores);
                let (seq, d) = (g.seq, g.head_size);
                // SAFETY: the query, key and value columns of this (item, head): seq rows
                // of head_size elements, `width` apart, written by this task only.
                let write = |offset: usize, lhs: Matrix<T>, rhs: Matrix<T>, k_dim: usize| unsafe {
                    matmul_into(out.at(offset), g.width(), (seq, d, k_dim), lhs, rhs, false)
                };
                write(v, Matrix::transposed(scores, seq), d_ctx, seq);
                matmul(
                    d_probs,
                    (seq, seq, d),
                    d_ctx,
                    Matrix::strided(&qkv[v..], 1, g.width()),
                    false,
                );
                self.drop(task, d_probs);
                // Softmax backward with the scale folded in: dS = scale * P * (dP - <P, dP>).
                for (dp, p) in d_probs.chunks_exact_mut(seq).zip(probs.chunks_exact(seq)) {
                    let dot = sum_zip(dp, p, |a, b| a * b);
                    dp.iter_mut()
                        .zip(p)
                        .for_each(|(dp, &p)| *dp = scale * p * (*dp - dot));
                }
                write(
                    q,
                    Matrix::row_major(d_probs, seq),
                    Matrix::strided(&qkv[k..], g.width(), 1),
                    seq,
                );
                write(
                    k,
                    Matrix::transposed(d_probs, seq),
                    Matrix::strided(&qkv[q..], g.width(), 1),
                    seq,
                );
            });
        d_qkv
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, qkv: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check_indexable()?;
        let g = self.shape;
        let out = dispatch_real!(qkv, self.name(), |T| T::storage(self.forward(T::elements(
            qkv,
            layout,
            self.name()
        )?)));
        Ok((out, Shape::from((self.total_rows(), g.hidden()))))
    }

    fn bwd(&self, qkv: &Tensor, _context: &Tensor, d_context: &Tensor) -> Result<Option<Tensor>> {
        if self.packed.is_some() {
            bail!("attention: packed sequences are for inference and have no backward")
        }
        Ok(Some(qkv.apply_op2_no_bwd(
            &d_context.contiguous()?,
            &AttentionBackward(self.clone()),
        )?))
    }
}

/// `(qkv, d_context) -> d_qkv` for [`Attention`].
struct AttentionBackward(Attention);

impl CustomOp2 for AttentionBackward {
    fn name(&self) -> &'static str {
        "attention-backward"
    }

    fn cpu_fwd(
        &self,
        qkv: &CpuStorage,
        qkv_l: &Layout,
        d_context: &CpuStorage,
        d_context_l: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0.shape;
        if d_context_l.shape().dims() != [g.batch * g.seq, g.hidden()] {
            bail!(
                "attention-backward: gradient shape {:?} does not match the context",
                d_context_l.shape()
            )
        }
        let out = dispatch_real!(qkv, self.name(), |T| T::storage(self.0.backward(
            T::elements(qkv, qkv_l, self.name())?,
            T::elements(d_context, d_context_l, self.name())?
        )));
        Ok((out, qkv_l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::check_gradient;
    use crate::models::bert::attention_bias;
    use crate::ops::dropout::seed_dropout;
    use candle_core::Device;

    const BATCH: usize = 2;
    const SEQ: usize = 5;
    const HEADS: usize = 3;
    const HEAD_SIZE: usize = 4;

    fn inputs(dtype: DType) -> Result<(Tensor, Tensor)> {
        let dev = Device::Cpu;
        let qkv =
            Tensor::randn(0f64, 1., (BATCH * SEQ, 3 * HEADS * HEAD_SIZE), &dev)?.to_dtype(dtype)?;
        // The second sequence has two padding positions.
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev)?;
        Ok((qkv, attention_bias(&mask, dtype)?))
    }

    #[test]
    fn matches_the_composed_ops_with_and_without_dropout() -> Result<()> {
        let (qkv, bias) = inputs(DType::F32)?;
        let g = Geometry::new(qkv.dims(), BATCH, HEADS)?;
        for p in [0.0, 0.3] {
            seed_dropout(5);
            let fused = attention(&qkv, BATCH, HEADS, Some(&bias), p)?;
            seed_dropout(5);
            let reference = composed(&qkv, g, Some(&bias), p)?;
            let diff = (fused - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "dropout {p}: max difference {diff}");
        }
        Ok(())
    }

    #[test]
    fn backward_agrees_with_finite_differences() -> Result<()> {
        let (qkv, bias) = inputs(DType::F64)?;
        let weights = Tensor::randn(0f64, 1., (BATCH * SEQ, HEADS * HEAD_SIZE), &Device::Cpu)?;
        for p in [0.0, 0.3] {
            let check = check_gradient(&qkv, 1e-5, |x| {
                seed_dropout(9);
                (attention(x, BATCH, HEADS, Some(&bias), p)? * &weights)?.sum_all()
            })?;
            assert!(check.max_rel_diff < 1e-6, "dropout {p}: {check:?}");
        }
        Ok(())
    }

    #[test]
    fn packed_sequences_attend_each_to_itself() -> Result<()> {
        let lengths = [3, 1, 5];
        let qkv = Tensor::randn(0f32, 1., (9, 3 * HEADS * HEAD_SIZE), &Device::Cpu)?;
        let packed = attention_packed(&qkv, &lengths, HEADS)?;
        let mut start = 0;
        for len in lengths {
            let alone = attention(&qkv.narrow(0, start, len)?, 1, HEADS, None, 0.0)?;
            let diff = (packed.narrow(0, start, len)? - alone)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(
                diff < 1e-6,
                "sequence at row {start}: max difference {diff}"
            );
            start += len;
        }
        let err = attention_packed(&qkv, &[3, 5], HEADS)
            .unwrap_err()
            .to_string();
        assert!(err.contains("do not split into sequences"), "{err}");
        Ok(())
    }

    #[test]
    fn rejects_shapes_that_do_not_split_into_heads() -> Result<()> {
        let qkv = Tensor::zeros((10, 35), DType::F32, &Device::Cpu)?;
        let err = attention(&qkv, 2, 3, None, 0.0).unwrap_err().to_string();
        assert!(err.contains("3 x 3 heads"), "{err}");
        let qkv = Tensor::zeros((10, 36), DType::F32, &Device::Cpu)?;
        let bias = Tensor::zeros((2, 1, 1, 4), DType::F32, &Device::Cpu)?;
        let err = attention(&qkv, 2, 3, Some(&bias), 0.0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bias has shape"), "{err}");
        Ok(())
    }
}
