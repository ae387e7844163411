//! What our wrappers of ggml's functions ([`crate::gemm`], [`crate::ops`]) know of ggml's
//! threads: each call is made by each of ggml's `nth` threads with its index `ith`, and the
//! threads share the work among themselves.

/// Thread `ith` of `nth`'s share of `total` items, in whole multiples of `unit`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) fn share(total: usize, unit: usize, ith: usize, nth: usize) -> (usize, usize) {
    let units = total.div_ceil(unit);
    let (u0, u1) = (units * ith / nth, units * (ith + 1) / nth);
    ((u0 * unit).min(total), (u1 * unit).min(total))
}

/// The calling thread's index and the thread count from ggml's `struct ggml_compute_params`,
/// which begins with them.
///
/// # Safety
/// `params` points at ggml's compute params.
#[cfg(any(vox_sgemm_hook, vox_ops_hook))]
pub(crate) unsafe fn of(params: *const std::ffi::c_void) -> (usize, usize) {
    #[repr(C)]
    struct ComputeParams {
        ith: std::ffi::c_int,
        nth: std::ffi::c_int,
    }
    let p = unsafe { &*(params as *const ComputeParams) };
    (p.ith.max(0) as usize, p.nth.max(1) as usize)
}
