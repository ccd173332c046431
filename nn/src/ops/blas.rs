//! f32 products through OpenBLAS (feature `openblas`): its AVX-512 kernels run about twice
//! the `gemm` crate's GFLOP/s on the MiniLM and ResNet shapes. OpenBLAS runs
//! single-threaded in the calling thread; the threaded product splits the output across
//! rayon's threads itself, so OpenBLAS never starts a pool that spins against rayon's.

use std::ffi::c_int;
use std::sync::Once;

use rayon::prelude::*;

use super::matmul::Matrix;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

#[link(name = "openblas")]
unsafe extern "C" {
    fn cblas_sgemm(
        order: c_int,
        trans_a: c_int,
        trans_b: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: f32,
        a: *const f32,
        lda: c_int,
        b: *const f32,
        ldb: c_int,
        beta: f32,
        c: *mut f32,
        ldc: c_int,
    );
    fn openblas_set_num_threads(threads: c_int);
}

/// How BLAS reads a `rows x cols` view: transposed or not, and its leading dimension.
/// None when neither stride is 1 (BLAS needs one unit stride).
fn layout(rows: usize, cols: usize, row_stride: isize, col_stride: isize) -> Option<(c_int, c_int)> {
    if col_stride == 1 && (rows <= 1 || row_stride >= cols.max(1) as isize) {
        Some((NO_TRANS, row_stride.max(cols.max(1) as isize) as c_int))
    } else if row_stride == 1 && (cols <= 1 || col_stride >= rows.max(1) as isize) {
        Some((TRANS, col_stride.max(rows.max(1) as isize) as c_int))
    } else {
        None
    }
}

/// Both operands in a form BLAS reads; the product's shape fits in `c_int`.
pub(crate) fn supports(
    (m, n, k): (usize, usize, usize),
    lhs: &Matrix<f32>,
    rhs: &Matrix<f32>,
) -> bool {
    [m, n, k].iter().all(|&d| d > 0 && d < c_int::MAX as usize)
        && layout(m, k, lhs.row_stride, lhs.col_stride).is_some()
        && layout(k, n, rhs.row_stride, rhs.col_stride).is_some()
}

/// `dst = lhs · rhs (+ dst)` in the calling thread.
///
/// # Safety
/// As `matmul_into`: `dst` valid for m rows of n elements `dst_row_stride` apart, `lhs`
/// and `rhs` covering m x k and k x n elements; [`supports`] holds.
pub(crate) unsafe fn sgemm(
    dst: *mut f32,
    dst_row_stride: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Matrix<f32>,
    rhs: Matrix<f32>,
    accumulate: bool,
) {
    static SINGLE_THREADED: Once = Once::new();
    // SAFETY: a plain setter, called once before any product.
    SINGLE_THREADED.call_once(|| unsafe { openblas_set_num_threads(1) });
    let (trans_a, lda) = layout(m, k, lhs.row_stride, lhs.col_stride).expect("supports() checked");
    let (trans_b, ldb) = layout(k, n, rhs.row_stride, rhs.col_stride).expect("supports() checked");
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: shapes and leading dimensions describe memory the caller vouches for.
    unsafe {
        cblas_sgemm(
            ROW_MAJOR,
            trans_a,
            trans_b,
            m as c_int,
            n as c_int,
            k as c_int,
            1.0,
            lhs.ptr,
            lda,
            rhs.ptr,
            ldb,
            beta,
            dst,
            dst_row_stride.max(n) as c_int,
        )
    }
}

/// A raw pointer the chunks of one product share; each chunk writes its own rows/columns.
#[derive(Clone, Copy)]
struct Shared<T>(T);
// SAFETY: the chunks below touch disjoint parts of `dst` and only read the operands.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

/// [`sgemm`] on all of rayon's threads: the larger of the output's two dimensions is cut
/// into one block per thread (each thread packs its share of the operands itself).
///
/// # Safety
/// As [`sgemm`].
pub(crate) unsafe fn sgemm_threaded(
    dst: *mut f32,
    dst_row_stride: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Matrix<f32>,
    rhs: Matrix<f32>,
    accumulate: bool,
) {
    let threads = rayon::current_num_threads();
    // Below ~1 MFLOP per thread, splitting costs more than it saves.
    if threads == 1 || m * n * k < threads * (1 << 20) {
        // SAFETY: forwarded from the caller.
        return unsafe { sgemm(dst, dst_row_stride, (m, n, k), lhs, rhs, accumulate) };
    }
    let split_rows = m >= n;
    let len = if split_rows { m } else { n };
    let block = len.div_ceil(threads);
    let (dst, lhs, rhs) = (Shared(dst), Shared(lhs), Shared(rhs));
    (0..len.div_ceil(block)).into_par_iter().for_each(|i| {
        let (start, size) = (i * block, block.min(len - i * block));
        let (dst, mut lhs, mut rhs) = (dst, lhs.0, rhs.0);
        // SAFETY: the block's rows (or columns) of dst, lhs and rhs lie inside the
        // caller's m x n, m x k and k x n regions.
        unsafe {
            if split_rows {
                lhs.ptr = lhs.ptr.offset(start as isize * lhs.row_stride);
                let out = dst.0.add(start * dst_row_stride);
                sgemm(out, dst_row_stride, (size, n, k), lhs, rhs, accumulate);
            } else {
                rhs.ptr = rhs.ptr.offset(start as isize * rhs.col_stride);
                let out = dst.0.add(start);
                sgemm(out, dst_row_stride, (m, size, k), lhs, rhs, accumulate);
            }
        }
    });
}
