//! Matrix products for whisper.cpp on Linux x86-64 CPUs with AVX-512, in place of llamafile's
//! tinyBLAS.
//!
//! whisper.cpp's ggml, built with `GGML_LLAMAFILE=ON` (.cargo/config.toml), offers its matrix
//! products to `llamafile_sgemm` first (tinyBLAS declines single columns, and ggml then does
//! them itself). The plugin is linked with `--wrap=llamafile_sgemm` (build.rs), so those calls
//! come to `hook`'s `__wrap_llamafile_sgemm`, which does the two kinds that make up most of the
//! encoder and passes the rest on to tinyBLAS:
//!
//! - [`q8`]: 8-bit weights by 8-bit activations (the 8-bit model's linear layers), with VNNI;
//! - [`f16`]: f16 by f16 in f32 (attention's scores and their weighted values, and the f16
//!   model's linear layers).
//!
//! tinyBLAS computes each output as one dot product at a time (a row by a column), converting or
//! scaling at every step; both kernels here lay sixteen rows of the weights out so that one
//! register holds one step of all sixteen and each column's value is broadcast against it,
//! which is what the CPU's multiply-add units are built for. Measured on tiny.en under load:
//! see the README's `vox serve` table.
//!
//! Whisper on the GPU (`cuda`) does its products there and seldom comes here.
//! `VOX_WHISPER_GEMM=tinyblas` in the environment leaves every product to tinyBLAS.

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

pub mod f16;
pub mod q8;

/// ggml's type numbers.
pub const GGML_TYPE_F32: i32 = 0;
pub const GGML_TYPE_F16: i32 = 1;
pub const GGML_TYPE_Q8_0: i32 = 8;

/// Weight rows per panel: one 512-bit register holds one step of each.
pub const ROWS: usize = 16;

/// Fewer columns than this stay with tinyBLAS: the kernels lay the weights out anew for each
/// product, which pays only over enough columns (the encoder has hundreds; a decoder step has
/// one, a prompt a few).
pub const MIN_COLUMNS: i64 = 16;

/// Whether a product of `m` rows by `n` columns has the shape both kernels take: whole
/// panels, and enough columns.
fn fits(m: i64, n: i64) -> bool {
    m > 0 && m % ROWS as i64 == 0 && n >= MIN_COLUMNS
}

/// Whether this build sends whisper.cpp's products here at all (Linux x86-64, with ggml's
/// llamafile kernels: build.rs).
pub const HOOKED: bool = cfg!(vox_sgemm_hook);

/// Logged (to the `whisper-cpp` debug category, at info) the first time a kernel takes a
/// product, so that a build whose link options did not send the products here shows it.
pub const Q8_LINE: &str = "whisper.cpp's 8-bit matrix products run on our AVX-512 VNNI kernel";
pub const F16_LINE: &str = "whisper.cpp's f16 matrix products run on our AVX-512 kernel";
#[cfg_attr(not(vox_sgemm_hook), allow(dead_code))]
static Q8_TAKEN: std::sync::Once = std::sync::Once::new();
#[cfg_attr(not(vox_sgemm_hook), allow(dead_code))]
static F16_TAKEN: std::sync::Once = std::sync::Once::new();

/// Whether this CPU has the AVX-512 both kernels need, and `VOX_WHISPER_GEMM` is not
/// `tinyblas` (which leaves all products to tinyBLAS: for A/B runs, or to rule the kernels out).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static OK: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
            std::env::var("VOX_WHISPER_GEMM").as_deref() != Ok("tinyblas")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("f16c")
        });
        *OK
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One product as `llamafile_sgemm` is asked for it: C\[j·ldc + i\] = Σ over l < k of
/// A\[i·lda + l\]·B\[j·ldb + l\], for rows i < m of A (the weights) and columns j < n (the rows
/// of B); `k`, `lda` and `ldb` count elements (Q8_0 blocks for [`q8`], f16 values for [`f16`]),
/// `ldc` floats. `T` is what `a` and `b` point at: bytes, or f16 bits.
#[derive(Clone, Copy, Debug)]
pub struct Product<T> {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: *const T,
    pub lda: usize,
    pub b: *const T,
    pub ldb: usize,
    pub c: *mut f32,
    pub ldc: usize,
}

impl<T> Product<T> {
    /// The same product with `a` and `b` pointing at `U`s.
    pub fn cast<U>(self) -> Product<U> {
        Product {
            m: self.m,
            n: self.n,
            k: self.k,
            a: self.a.cast(),
            lda: self.lda,
            b: self.b.cast(),
            ldb: self.ldb,
            c: self.c,
            ldc: self.ldc,
        }
    }
}

/// Thread `ith` of `nth`'s share of `total` items, in whole multiples of `unit`.
fn share(total: usize, unit: usize, ith: usize, nth: usize) -> (usize, usize) {
    let units = total.div_ceil(unit);
    let (u0, u1) = (units * ith / nth, units * (ith + 1) / nth);
    ((u0 * unit).min(total), (u1 * unit).min(total))
}

/// The wrapper (see the module).
#[cfg(vox_sgemm_hook)]
mod hook {
    use std::ffi::{c_int, c_void};

    unsafe extern "C" {
        fn __real_llamafile_sgemm(
            params: *const c_void,
            m: i64,
            n: i64,
            k: i64,
            a: *const c_void,
            lda: i64,
            b: *const c_void,
            ldb: i64,
            c: *mut c_void,
            ldc: i64,
            a_type: c_int,
            b_type: c_int,
            c_type: c_int,
        ) -> bool;
    }

    /// ggml's `struct ggml_compute_params` begins with the thread's index and the thread count.
    #[repr(C)]
    struct ComputeParams {
        ith: c_int,
        nth: c_int,
    }

    #[unsafe(no_mangle)]
    #[allow(clippy::too_many_arguments)]
    pub unsafe extern "C" fn __wrap_llamafile_sgemm(
        params: *const c_void,
        m: i64,
        n: i64,
        k: i64,
        a: *const c_void,
        lda: i64,
        b: *const c_void,
        ldb: i64,
        c: *mut c_void,
        ldc: i64,
        a_type: c_int,
        b_type: c_int,
        c_type: c_int,
    ) -> bool {
        let p = unsafe { &*(params as *const ComputeParams) };
        let (ith, nth) = (p.ith as usize, p.nth.max(1) as usize);
        let product = super::Product::<c_void> {
            m: m as usize,
            n: n as usize,
            k: k as usize,
            a,
            lda: lda as usize,
            b,
            ldb: ldb as usize,
            c: c.cast(),
            ldc: ldc as usize,
        };
        if super::f16::takes(m, n, k, a_type, b_type, c_type) {
            super::F16_TAKEN.call_once(|| log::info!("{}", super::F16_LINE));
            unsafe { super::f16::gemm(ith, nth, &product.cast()) };
            return true;
        }
        if super::q8::takes(m, n, a_type, b_type, c_type) {
            super::Q8_TAKEN.call_once(|| log::info!("{}", super::Q8_LINE));
            unsafe { super::q8::gemm(ith, nth, &product.cast()) };
            return true;
        }
        unsafe {
            __real_llamafile_sgemm(
                params, m, n, k, a, lda, b, ldb, c, ldc, a_type, b_type, c_type,
            )
        }
    }
}
