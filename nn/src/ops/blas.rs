//! f32 products through OpenBLAS when the system has it: its AVX-512 kernels run about
//! 2.7x the `gemm` crate's GFLOP/s on the MiniLM and ResNet shapes (145 against 55 per
//! core here). Loaded at run time, so builds and images without it still work (the `gemm`
//! crate does the products then). OpenBLAS runs single-threaded in the calling thread;
//! the threaded product splits the output across rayon's threads itself, so OpenBLAS never
//! starts a pool that spins against rayon's. `RINGMASTER_GEMM=gemm` turns it off,
//! `RINGMASTER_GEMM=openblas` uses it whatever kernel it picked.

use std::ffi::{CStr, c_char, c_int};
use std::sync::OnceLock;

use libloading::Library;
use rayon::prelude::*;

use super::matmul::Matrix;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

/// OpenBLAS kernels at least as wide as AVX2; older ones are slower than the gemm crate.
const VECTOR_CORES: [&str; 6] = [
    "haswell",
    "zen",
    "skylakex",
    "cooperlake",
    "sapphirerapids",
    "skylake",
];

pub(crate) struct OpenBlas {
    sgemm: Sgemm,
    /// Keeps `sgemm` loaded.
    _library: Library,
}

/// The loaded library, or None (not installed, turned off, or an old kernel).
pub(crate) fn openblas() -> Option<&'static OpenBlas> {
    static OPENBLAS: OnceLock<Option<OpenBlas>> = OnceLock::new();
    OPENBLAS.get_or_init(load).as_ref()
}

fn load() -> Option<OpenBlas> {
    let choice = std::env::var("RINGMASTER_GEMM").unwrap_or_default();
    if choice == "gemm" {
        return None;
    }
    let (blas, core) = match open() {
        Ok(opened) => opened,
        Err(e) => {
            tracing::debug!(error = %e, "no OpenBLAS: f32 products through the gemm crate");
            return None;
        }
    };
    if choice != "openblas" && !VECTOR_CORES.iter().any(|c| core.contains(c)) {
        tracing::info!(
            core,
            "OpenBLAS picked a kernel older than AVX2 (an unknown CPU model?): f32 products \
             through the gemm crate; OPENBLAS_CORETYPE=SkylakeX (or Haswell) picks a fast one"
        );
        return None;
    }
    tracing::debug!(core, "f32 products through OpenBLAS");
    Some(blas)
}

/// The library, single-threaded, and the name of the kernel it picked.
fn open() -> Result<(OpenBlas, String), libloading::Error> {
    // SAFETY: OpenBLAS's initialisers only read the CPU and the environment; the symbols
    // have these C signatures in every OpenBLAS release.
    unsafe {
        let library = Library::new("libopenblas.so.0")?;
        let sgemm = *library.get::<Sgemm>(b"cblas_sgemm\0")?;
        let set_threads =
            *library.get::<unsafe extern "C" fn(c_int)>(b"openblas_set_num_threads\0")?;
        let corename =
            *library.get::<unsafe extern "C" fn() -> *const c_char>(b"openblas_get_corename\0")?;
        set_threads(1);
        let core = CStr::from_ptr(corename()).to_string_lossy().to_lowercase();
        Ok((
            OpenBlas {
                sgemm,
                _library: library,
            },
            core,
        ))
    }
}

/// Points OpenBLAS at its AVX-512 kernels on CPUs that have them, unless the user chose a
/// kernel: OpenBLAS 0.3.21 (Debian 12) does not know recent Xeon models and falls back to
/// its slowest kernel on them. It reads the choice when it loads, so this must run first.
///
/// # Safety
/// Sets an environment variable: call it before any other thread starts (first thing in
/// `main`).
pub unsafe fn prefer_native_kernels() {
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("OPENBLAS_CORETYPE").is_none() && std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the caller guarantees no other thread runs.
        unsafe { std::env::set_var("OPENBLAS_CORETYPE", "SkylakeX") };
    }
}

/// How BLAS reads a `rows x cols` view: transposed or not, and its leading dimension.
/// None when neither stride is 1 (BLAS needs one unit stride).
fn layout(
    rows: usize,
    cols: usize,
    row_stride: isize,
    col_stride: isize,
) -> Option<(c_int, c_int)> {
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
    blas: &OpenBlas,
    dst: *mut f32,
    dst_row_stride: usize,
    (m, n, k): (usize, usize, usize),
    lhs: Matrix<f32>,
    rhs: Matrix<f32>,
    accumulate: bool,
) {
    let (trans_a, lda) = layout(m, k, lhs.row_stride, lhs.col_stride).expect("supports() checked");
    let (trans_b, ldb) = layout(k, n, rhs.row_stride, rhs.col_stride).expect("supports() checked");
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: shapes and leading dimensions describe memory the caller vouches for.
    unsafe {
        (blas.sgemm)(
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

impl<T: Copy> Shared<T> {
    /// By method, so closures capture the wrapper (Sync), not its field.
    fn get(self) -> T {
        self.0
    }
}

/// [`sgemm`] on all of rayon's threads: the larger of the output's two dimensions is cut
/// into one block per thread (each thread packs its share of the operands itself).
///
/// # Safety
/// As [`sgemm`].
pub(crate) unsafe fn sgemm_threaded(
    blas: &OpenBlas,
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
        return unsafe { sgemm(blas, dst, dst_row_stride, (m, n, k), lhs, rhs, accumulate) };
    }
    let split_rows = m >= n;
    let len = if split_rows { m } else { n };
    let block = len.div_ceil(threads);
    let (dst, lhs, rhs) = (Shared(dst), Shared(lhs), Shared(rhs));
    (0..len.div_ceil(block)).into_par_iter().for_each(|i| {
        let (start, size) = (i * block, block.min(len - i * block));
        let (mut lhs, mut rhs) = (lhs.get(), rhs.get());
        // SAFETY: the block's rows (or columns) of dst, lhs and rhs lie inside the
        // caller's m x n, m x k and k x n regions.
        unsafe {
            let (out, shape) = if split_rows {
                lhs.ptr = lhs.ptr.offset(start as isize * lhs.row_stride);
                (dst.get().add(start * dst_row_stride), (size, n, k))
            } else {
                rhs.ptr = rhs.ptr.offset(start as isize * rhs.col_stride);
                (dst.get().add(start), (m, size, k))
            };
            sgemm(blas, out, dst_row_stride, shape, lhs, rhs, accumulate);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(len: usize, seed: u64) -> Vec<f32> {
        (0..len as u64)
            .map(|i| {
                ((i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 2001) as f32 - 1000.0) / 1000.0
            })
            .collect()
    }

    fn reference(m: usize, n: usize, k: usize, a: &Matrix<f32>, b: &Matrix<f32>) -> Vec<f64> {
        let at = |mat: &Matrix<f32>, r: usize, c: usize| unsafe {
            *mat.ptr
                .offset(r as isize * mat.row_stride + c as isize * mat.col_stride)
                as f64
        };
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| at(a, i, p) * at(b, p, j)).sum();
            }
        }
        out
    }

    /// Every layout the kernels use (plain, transposed, a head's columns inside packed
    /// QKV rows), accumulating or not, on one thread and split by rows and by columns,
    /// equals a float64 reference.
    #[test]
    fn openblas_products_equal_the_reference() {
        let (blas, core) = open().expect(
            "libopenblas.so.0 must be installed (Debian: libopenblas0; .ci/run installs it)",
        );
        eprintln!("OpenBLAS kernel: {core}");
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        // The last two are large enough to be split: by rows, then by columns.
        for &(m, n, k) in &[
            (37, 29, 41),
            (300, 7, 64),
            (5, 400, 96),
            (64, 64, 1),
            (512, 96, 64),
            (40, 1024, 128),
        ] {
            let a_data = values(m * k * 3, 1);
            let b_data = values(k * n * 2, 2);
            let lhs_layouts = [
                Matrix::row_major(&a_data, k),
                Matrix::transposed(&a_data, m),
                Matrix::strided(&a_data, 3 * k, 1), // a head inside packed rows
            ];
            let rhs_layouts = [
                Matrix::row_major(&b_data, n),
                Matrix::transposed(&b_data, k),
                Matrix::strided(&b_data, 2 * n, 1),
            ];
            for lhs in lhs_layouts {
                for rhs in rhs_layouts {
                    assert!(supports((m, n, k), &lhs, &rhs));
                    let want = reference(m, n, k, &lhs, &rhs);
                    for accumulate in [false, true] {
                        for threaded in [false, true] {
                            let mut dst = vec![0.5f32; m * n];
                            unsafe {
                                if threaded {
                                    let (out, lhs, rhs) =
                                        (Shared(dst.as_mut_ptr()), Shared(lhs), Shared(rhs));
                                    pool.install(|| {
                                        sgemm_threaded(
                                            &blas,
                                            out.get(),
                                            n,
                                            (m, n, k),
                                            lhs.get(),
                                            rhs.get(),
                                            accumulate,
                                        )
                                    });
                                } else {
                                    sgemm(
                                        &blas,
                                        dst.as_mut_ptr(),
                                        n,
                                        (m, n, k),
                                        lhs,
                                        rhs,
                                        accumulate,
                                    );
                                }
                            }
                            for (got, want) in dst.iter().zip(&want) {
                                let want = want + if accumulate { 0.5 } else { 0.0 };
                                assert!(
                                    (*got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                                    "{m}x{n}x{k} accumulate={accumulate} threaded={threaded}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn operands_without_a_unit_stride_are_left_to_the_gemm_crate() {
        let data = values(64, 3);
        let every_other = Matrix::strided(&data, 8, 2);
        assert!(!supports(
            (4, 4, 4),
            &every_other,
            &Matrix::row_major(&data, 4)
        ));
    }
}
