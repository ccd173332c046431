//! f32 products with few rows against a weight matrix (`x · Wᵀ` with W stored (out, in),
//! as in a linear layer at inference on a short batch): dot products straight from the
//! weights, with no packing.
//!
//! A BLAS packs the whole weight matrix into its panel layout on every call; with 10 rows
//! (one short sentence) that copy costs more than the arithmetic (perf: 37% of a MiniLM
//! forward in OpenBLAS's `sgemm_incopy`, 25% in its kernel). Here each block of 4 weight
//! rows is read once from cache for every pair of input rows, 8 dot products in 8 vector
//! accumulators.

use rayon::prelude::*;

use super::matmul::Matrix;

/// Up to this many rows the dot products beat a packing BLAS on the benchmark machine
/// (a served sentence of 10 tokens: 1.4x the requests/s; at 40 rows BLAS wins).
pub(crate) const FEW_ROWS: usize = 16;

/// Whether `lhs` (m x k) · `rhs` (k x n) is a few-row product this module computes:
/// rows of `lhs` and columns of `rhs` contiguous, and a CPU with FMA.
pub(crate) fn applies(m: usize, lhs: &Matrix<f32>, rhs: &Matrix<f32>) -> bool {
    m <= FEW_ROWS && lhs.col_stride == 1 && rhs.row_stride == 1 && kernel().is_some()
}

type Kernel = unsafe fn(&Operands, usize, usize);

/// The widest kernel this CPU runs.
fn kernel() -> Option<Kernel> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Some(columns_avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Some(columns_avx2);
        }
    }
    None
}

/// The product's operands, shared by the threads that each write their own columns.
#[derive(Clone, Copy)]
struct Operands {
    dst: *mut f32,
    dst_row_stride: usize,
    m: usize,
    k: usize,
    lhs: Matrix<f32>,
    rhs: Matrix<f32>,
    accumulate: bool,
}
// SAFETY: each thread writes only its own columns of `dst` and reads the operands.
unsafe impl Send for Operands {}
unsafe impl Sync for Operands {}

/// `dst (m x n) = lhs · rhs (+ dst)`, the columns split over rayon's threads when
/// `threaded`.
///
/// # Safety
/// As `matmul_into`; [`applies`] holds.
pub(crate) unsafe fn product(
    dst: *mut f32,
    dst_row_stride: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Matrix<f32>,
    rhs: Matrix<f32>,
    accumulate: bool,
    threaded: bool,
) {
    let kernel = kernel().expect("applies() checked");
    let operands = Operands {
        dst,
        dst_row_stride,
        m,
        k,
        lhs,
        rhs,
        accumulate,
    };
    let threads = if threaded {
        rayon::current_num_threads()
    } else {
        1
    };
    // Below ~1 MFLOP per thread, splitting costs more than it saves.
    if threads == 1 || m * n * k < threads * (1 << 19) {
        // SAFETY: forwarded from the caller; the kernel's features were detected.
        return unsafe { kernel(&operands, 0, n) };
    }
    let block = n.div_ceil(threads).next_multiple_of(4);
    (0..n.div_ceil(block)).into_par_iter().for_each(|i| {
        let start = i * block;
        // SAFETY: as above; the blocks' columns are disjoint.
        unsafe { kernel(&operands, start, block.min(n - start)) }
    });
}

/// A kernel for one vector width: `$name(ops, start, count)` computes columns
/// `start..start + count`, 2 x 4 dot products at a time in vector accumulators.
macro_rules! columns_kernel {
    ($name:ident, $feature:literal, $lanes:literal, $zero:expr, $load:path, $fma:path, $sum:expr) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feature)]
        unsafe fn $name(ops: &Operands, start: usize, count: usize) {
            use std::arch::x86_64::*;
            let k = ops.k;
            let full = k - k % $lanes;
            // SAFETY (all pointer reads below): the caller vouches that lhs covers m x k
            // and rhs k x n elements, rows of lhs and columns of rhs (rows of the weight)
            // contiguous, and that (r, c) < (m, n) lies inside dst.
            let row = |r: usize| unsafe { ops.lhs.ptr.offset(r as isize * ops.lhs.row_stride) };
            let weight = |c: usize| unsafe { ops.rhs.ptr.offset(c as isize * ops.rhs.col_stride) };
            let dot_tail = |x: *const f32, w: *const f32| {
                (full..k).fold(0f32, |s, p| unsafe { (*x.add(p)).mul_add(*w.add(p), s) })
            };
            let store = |r: usize, c: usize, value: f32| unsafe {
                let at = ops.dst.add(r * ops.dst_row_stride + c);
                *at = if ops.accumulate { *at + value } else { value };
            };
            let end = start + count;
            let mut c = start;
            while c < end {
                let width = (end - c).min(4);
                let mut r = 0;
                while r < ops.m {
                    let height = (ops.m - r).min(2);
                    if width == 4 && height == 2 {
                        let xs = [row(r), row(r + 1)];
                        let ws = [weight(c), weight(c + 1), weight(c + 2), weight(c + 3)];
                        let mut acc = [[$zero; 4]; 2];
                        let mut p = 0;
                        while p < full {
                            let wv = ws.map(|w| unsafe { $load(w.add(p)) });
                            for i in 0..2 {
                                let xv = unsafe { $load(xs[i].add(p)) };
                                for j in 0..4 {
                                    acc[i][j] = $fma(xv, wv[j], acc[i][j]);
                                }
                            }
                            p += $lanes;
                        }
                        for i in 0..2 {
                            for j in 0..4 {
                                store(r + i, c + j, $sum(acc[i][j]) + dot_tail(xs[i], ws[j]));
                            }
                        }
                    } else {
                        for i in 0..height {
                            for j in 0..width {
                                let (x, w) = (row(r + i), weight(c + j));
                                let mut acc = $zero;
                                let mut p = 0;
                                while p < full {
                                    acc = $fma(
                                        unsafe { $load(x.add(p)) },
                                        unsafe { $load(w.add(p)) },
                                        acc,
                                    );
                                    p += $lanes;
                                }
                                store(r + i, c + j, $sum(acc) + dot_tail(x, w));
                            }
                        }
                    }
                    r += height;
                }
                c += width;
            }
        }
    };
}

columns_kernel!(
    columns_avx512,
    "avx512f",
    16,
    _mm512_setzero_ps(),
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    _mm512_reduce_add_ps
);

columns_kernel!(
    columns_avx2,
    "avx2,fma",
    8,
    _mm256_setzero_ps(),
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    |v: __m256| {
        let mut lanes = [0f32; 8];
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes.iter().sum::<f32>()
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shape class (full blocks, row and column tails, a k tail, accumulation,
    /// threads) against f64 dot products.
    #[test]
    fn few_row_products_equal_the_reference() {
        for (m, n, k) in [
            (1, 1, 1),
            (2, 4, 16),
            (3, 7, 19),
            (10, 1536, 384),
            (16, 37, 100),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 31) as f32 / 15.0 - 1.0)
                .collect();
            let (lhs, rhs) = (Matrix::row_major(&x, k), Matrix::transposed(&w, k));
            if kernel().is_none() {
                return; // a CPU without FMA: every product goes to BLAS
            }
            assert!(applies(m, &lhs, &rhs));
            for (accumulate, threaded) in [(false, false), (true, true)] {
                let mut dst = vec![0.5f32; m * n];
                // SAFETY: dst, x and w hold m x n, m x k and n x k elements.
                unsafe {
                    product(
                        dst.as_mut_ptr(),
                        n,
                        (m, n, k),
                        lhs,
                        rhs,
                        accumulate,
                        threaded,
                    )
                };
                for r in 0..m {
                    for c in 0..n {
                        let dot: f64 = (0..k)
                            .map(|p| f64::from(x[r * k + p]) * f64::from(w[c * k + p]))
                            .sum();
                        let expected = dot + if accumulate { 0.5 } else { 0.0 };
                        let got = f64::from(dst[r * n + c]);
                        assert!(
                            (got - expected).abs() <= 1e-4 * (1.0 + expected.abs()),
                            "({m}, {n}, {k}) at ({r}, {c}): {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }
}
