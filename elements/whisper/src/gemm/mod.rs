//! Matrix products for whisper.cpp on Linux x86-64 CPUs with AVX-512 or AVX2, in place of
//! llamafile's tinyBLAS.
//!
//! whisper.cpp's ggml, built with `GGML_LLAMAFILE=ON` (.cargo/config.toml), offers its matrix
//! products to `llamafile_sgemm` first (tinyBLAS declines single columns, and ggml then does
//! them itself). The plugin is linked with `--wrap=llamafile_sgemm` (build.rs), so those calls
//! come to `hook`'s `__wrap_llamafile_sgemm`, which does the two kinds that make up most of the
//! encoder and passes the rest on to tinyBLAS:
//!
//! - [`q8`]: 8-bit weights by 8-bit activations (the 8-bit model's linear layers): with VNNI's
//!   8-bit dot products (AVX-512 VNNI, or AVX-VNNI, which Intel's client CPUs from Alder Lake on
//!   have without AVX-512), else AVX2's;
//! - [`f16`]: f16 by f16 in f32 (attention's scores and their weighted values, and the f16
//!   model's linear layers).
//!
//! tinyBLAS computes each output as one dot product at a time (a row by a column), converting or
//! scaling at every step; both kernels here lay sixteen rows of the weights out so that one
//! 512-bit register (or two 256-bit ones) holds one step of all sixteen and each column's value
//! is broadcast against it, which is what the CPU's multiply-add units are built for. The
//! kernels choose their instructions ([`Isa`]) when first used, from what the CPU has, not from
//! the build's flags (ggml's are fixed when it is compiled: `scripts/cpu-flags`). Measured:
//! the README's `vox serve` table and its Performance section (`scripts/bench-whisper-kernels`,
//! `cargo bench --bench whisper_gemm`).
//!
//! Whisper on the GPU (`cuda`) does its products there and seldom comes here.
//! `VOX_WHISPER_GEMM=tinyblas` in the environment leaves every product to tinyBLAS;
//! `VOX_WHISPER_GEMM=avx2` keeps the kernels to 256 bits, and `avx2-no-vnni` to AVX2 without
//! VNNI (for A/B runs of those kernels on a CPU that has more).

#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

pub mod f16;
pub mod q8;

/// ggml's type numbers.
pub const GGML_TYPE_F32: i32 = 0;
pub const GGML_TYPE_F16: i32 = 1;
pub const GGML_TYPE_Q8_0: i32 = 8;

/// Weight rows per panel: one 512-bit register (or two 256-bit ones) holds one step of each.
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

/// The vector instructions a kernel runs on, fastest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// 512-bit registers: AVX-512 F and BW, with AVX2, FMA and F16C (and VNNI for the 8-bit
    /// kernel).
    Avx512,
    /// 256-bit registers with AVX-VNNI's 8-bit dot products (Intel's client CPUs from Alder
    /// Lake on): only the 8-bit kernel has a form for it; the f16 kernel runs as [`Isa::Avx2`].
    AvxVnni,
    /// 256-bit registers: AVX2 with FMA and F16C.
    Avx2,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Avx512, Isa::AvxVnni, Isa::Avx2];

    /// Whether this CPU has these instructions (the 8-bit kernel needs VNNI besides with
    /// [`Isa::Avx512`]: [`q8::runs_on`]).
    pub fn on_cpu(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            let avx2 = has!("avx2") && has!("fma") && has!("f16c");
            match self {
                // (Our AVX-512 kernels use some AVX2 too: conversions, column sums.)
                Isa::Avx512 => avx2 && has!("avx512f") && has!("avx512bw"),
                Isa::AvxVnni => avx2 && has!("avxvnni"),
                Isa::Avx2 => avx2,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// The kernels `VOX_WHISPER_GEMM` allows (see the module); another value is warned about once
/// and allows all.
fn allowed() -> &'static [Isa] {
    static ALLOWED: std::sync::LazyLock<&'static [Isa]> = std::sync::LazyLock::new(|| {
        let setting = std::env::var("VOX_WHISPER_GEMM")
            .unwrap_or_default()
            .to_lowercase();
        allowed_by(&setting).unwrap_or_else(|| {
            log::warn!(
                "VOX_WHISPER_GEMM={setting:?} is not tinyblas, avx2 or avx2-no-vnni: using \
                 the fastest kernels this CPU runs"
            );
            &Isa::ALL
        })
    });
    *ALLOWED
}

/// The kernels a `VOX_WHISPER_GEMM` setting (lower case) allows, fastest first (`None`: no
/// such setting).
pub fn allowed_by(setting: &str) -> Option<&'static [Isa]> {
    match setting {
        "" => Some(&Isa::ALL),
        "tinyblas" => Some(&[]),
        "avx2" => Some(&[Isa::AvxVnni, Isa::Avx2]),
        "avx2-no-vnni" => Some(&[Isa::Avx2]),
        _ => None,
    }
}

/// The first of `allowed` that `runs_on` says this CPU runs.
pub fn choose(allowed: &[Isa], runs_on: fn(Isa) -> bool) -> Option<Isa> {
    allowed.iter().copied().find(|&isa| runs_on(isa))
}

/// Which kernels do whisper.cpp's CPU matrix products in this process, in a line (whisperstt's
/// `matrix-kernels` property, which `vox doctor` prints).
pub fn describe() -> String {
    if !HOOKED {
        return "tinyBLAS and ggml's own (this build does not send them to our kernels)".into();
    }
    match (q8::isa(), f16::isa()) {
        (None, None) if allowed().is_empty() => "tinyBLAS (VOX_WHISPER_GEMM=tinyblas)".into(),
        (None, None) => "tinyBLAS (this CPU has no AVX2)".into(),
        (q, h) => {
            let ours = |isa: Option<Isa>, name: fn(Isa) -> &'static str| {
                isa.map_or("tinyBLAS".to_string(), |isa| {
                    format!("our {} kernel", name(isa))
                })
            };
            format!(
                "8-bit on {}, f16 on {}, from {MIN_COLUMNS} columns (fewer: tinyBLAS)",
                ours(q, q8::name),
                ours(h, f16::name)
            )
        }
    }
}

/// Whether each kernel has logged (to the `whisper-cpp` debug category, at info: its `line`)
/// that it took a product, which it does once, so that a build whose link options did not send
/// the products here, or a CPU without the instructions, shows it.
#[cfg_attr(not(vox_sgemm_hook), allow(dead_code))]
static Q8_TAKEN: std::sync::Once = std::sync::Once::new();
#[cfg_attr(not(vox_sgemm_hook), allow(dead_code))]
static F16_TAKEN: std::sync::Once = std::sync::Once::new();

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
        let (ith, nth) = unsafe { crate::threads::of(params) };
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
        if let Some(isa) = super::f16::takes(m, n, k, a_type, b_type, c_type) {
            super::F16_TAKEN.call_once(|| log::info!("{}", super::f16::line(isa)));
            unsafe { super::f16::gemm(isa, ith, nth, &product.cast()) };
            return true;
        }
        if let Some(isa) = super::q8::takes(m, n, a_type, b_type, c_type) {
            super::Q8_TAKEN.call_once(|| log::info!("{}", super::q8::line(isa)));
            unsafe { super::q8::gemm(isa, ith, nth, &product.cast()) };
            return true;
        }
        unsafe {
            __real_llamafile_sgemm(
                params, m, n, k, a, lda, b, ldb, c, ldc, a_type, b_type, c_type,
            )
        }
    }
}
