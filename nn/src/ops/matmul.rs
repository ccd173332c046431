//! `gemm` calls on strided views: single-threaded for kernels that parallelise over many
//! independent products themselves (images in a convolution, heads in attention) so that
//! threads never synchronise inside a product, threaded for one large product.

use gemm::Parallelism;

use super::float::Real;

/// A read-only `rows x cols` view: element (r, c) is at `ptr + r * row_stride + c * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct Matrix<T> {
    pub(super) ptr: *const T,
    pub(super) row_stride: isize,
    pub(super) col_stride: isize,
}

impl<T> Matrix<T> {
    /// `data` as a row-major matrix with `cols` columns.
    pub fn row_major(data: &[T], cols: usize) -> Self {
        Self::strided(data, cols, 1)
    }

    /// The transpose of `data` read as a row-major matrix with `cols` columns.
    pub fn transposed(data: &[T], cols: usize) -> Self {
        Self::strided(data, 1, cols)
    }

    /// A view starting at `data[0]`; the caller's products must stay inside `data`.
    pub fn strided(data: &[T], row_stride: usize, col_stride: usize) -> Self {
        Self {
            ptr: data.as_ptr(),
            row_stride: row_stride as isize,
            col_stride: col_stride as isize,
        }
    }

    /// The same view read as another element type of the same size.
    fn cast<U>(self) -> Matrix<U> {
        Matrix {
            ptr: self.ptr.cast(),
            row_stride: self.row_stride,
            col_stride: self.col_stride,
        }
    }
}

/// `dst (m x n, row-major) = lhs (m x k) · rhs (k x n)`, plus `dst` when `accumulate`.
pub(crate) fn matmul<T: Real>(
    dst: &mut [T],
    shape: (usize, usize, usize),
    lhs: Matrix<T>,
    rhs: Matrix<T>,
    accumulate: bool,
) {
    matmul_with(dst, shape, lhs, rhs, accumulate, Parallelism::None)
}

/// [`matmul`] on all of rayon's threads, for one large product.
pub(crate) fn matmul_threaded<T: Real>(
    dst: &mut [T],
    shape: (usize, usize, usize),
    lhs: Matrix<T>,
    rhs: Matrix<T>,
    accumulate: bool,
) {
    let parallelism = match rayon::current_num_threads() {
        1 => Parallelism::None,
        threads => Parallelism::Rayon(threads),
    };
    matmul_with(dst, shape, lhs, rhs, accumulate, parallelism)
}

fn matmul_with<T: Real>(
    dst: &mut [T],
    (m, n, k): (usize, usize, usize),
    lhs: Matrix<T>,
    rhs: Matrix<T>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    assert!(dst.len() >= m * n, "matmul: destination too small");
    // SAFETY: `dst` holds m x n row-major elements.
    unsafe {
        gemm_call(
            dst.as_mut_ptr(),
            n,
            (m, n, k),
            lhs,
            rhs,
            accumulate,
            parallelism,
        )
    }
}

/// Like [`matmul`], into rows `dst_row_stride` apart.
///
/// # Safety
/// `dst` must be valid for writes of m rows of n elements, `dst_row_stride` apart, that no
/// other thread touches meanwhile; `lhs` and `rhs` must cover m x k and k x n elements.
pub(crate) unsafe fn matmul_into<T: Real>(
    dst: *mut T,
    dst_row_stride: usize,
    shape: (usize, usize, usize),
    lhs: Matrix<T>,
    rhs: Matrix<T>,
    accumulate: bool,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm_call(
            dst,
            dst_row_stride,
            shape,
            lhs,
            rhs,
            accumulate,
            Parallelism::None,
        )
    }
}

/// # Safety
/// As [`matmul_into`].
unsafe fn gemm_call<T: Real>(
    dst: *mut T,
    dst_row_stride: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Matrix<T>,
    rhs: Matrix<T>,
    accumulate: bool,
    parallelism: Parallelism,
) {
    if T::DTYPE == candle_core::DType::F32 {
        let (lhs, rhs, dst) = (lhs.cast::<f32>(), rhs.cast::<f32>(), dst.cast::<f32>());
        let threaded = !matches!(parallelism, Parallelism::None);
        if super::few_rows::applies(m, &lhs, &rhs) {
            let shape = (m, n, k);
            // SAFETY: forwarded from the caller; T is f32.
            unsafe {
                super::few_rows::product(dst, dst_row_stride, shape, lhs, rhs, accumulate, threaded)
            };
            return;
        }
        if let Some(blas) = super::blas::openblas()
            && super::blas::supports((m, n, k), &lhs, &rhs)
        {
            let product = if threaded {
                super::blas::sgemm_threaded
            } else {
                super::blas::sgemm
            };
            // SAFETY: forwarded from the caller; T is f32.
            unsafe { product(blas, dst, dst_row_stride, (m, n, k), lhs, rhs, accumulate) };
            return;
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        )
    }
}
