//! ggml operations of whisper.cpp's that we do ourselves, on Linux x86-64: the ones where ggml
//! goes one value after another (`perf` on `vox transcribe`), done here with the same arithmetic,
//! so that the results are ggml's to the bit and the transcripts the same:
//!
//! - [`softmax`]: attention's weights (ggml finds each row's maximum one value at a time);
//! - [`gelu`]: the MLPs' activation (ggml looks each value up in its table one at a time).
//!
//! The plugin is linked with `--wrap` for the function ggml calls for each (build.rs), so those
//! calls come here first; what we do not do goes on to ggml, as everything does with
//! `VOX_WHISPER_OPS=ggml` in the environment (for A/B runs). Matrix products are [`crate::gemm`]'s.

pub mod gelu;
pub mod softmax;

/// Whether this build sends ggml's softmax and unary operations here (Linux x86-64: build.rs).
pub const HOOKED: bool = cfg!(vox_ops_hook);

/// Whether the wrappers do their operations: not with `VOX_WHISPER_OPS=ggml`.
pub fn enabled() -> bool {
    static ON: std::sync::LazyLock<bool> = std::sync::LazyLock::new(|| {
        !std::env::var("VOX_WHISPER_OPS").is_ok_and(|v| v.eq_ignore_ascii_case("ggml"))
    });
    *ON
}

/// ggml's `struct ggml_compute_params` begins with the thread's index and the thread count.
#[cfg(vox_ops_hook)]
#[repr(C)]
struct ComputeParams {
    ith: std::ffi::c_int,
    nth: std::ffi::c_int,
}
