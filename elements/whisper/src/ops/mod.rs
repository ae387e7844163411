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

/// Our wrappers against ggml's own functions (`__real_…`, linked in this test binary too) on
/// tensors made here: the same bits, threads split three ways, masks of f32 and f16 broadcast
/// over heads and batches, in place and not.
#[cfg(all(test, vox_ops_hook))]
mod against_ggml {
    use std::ffi::{c_int, c_void};
    use whisper_rs::whisper_rs_sys::{
        ggml_op_GGML_OP_UNARY as UNARY, ggml_tensor, ggml_type, ggml_type_GGML_TYPE_F16 as F16,
        ggml_type_GGML_TYPE_F32 as F32, ggml_unary_op_GGML_UNARY_OP_GELU as GELU,
    };

    /// ggml's `struct ggml_compute_params` in full (ggml-cpu-impl.h): its softmax takes each
    /// thread's scratch from `wdata`.
    #[repr(C)]
    struct Params {
        ith: c_int,
        nth: c_int,
        wsize: usize,
        wdata: *mut c_void,
        threadpool: *mut c_void,
    }

    unsafe extern "C" {
        fn ggml_cpu_init();
        fn __real_ggml_compute_forward_soft_max(params: *const c_void, dst: *mut ggml_tensor);
        fn __wrap_ggml_compute_forward_soft_max(params: *const c_void, dst: *mut ggml_tensor);
        fn __real_ggml_compute_forward_unary(params: *const c_void, dst: *mut ggml_tensor);
        fn __wrap_ggml_compute_forward_unary(params: *const c_void, dst: *mut ggml_tensor);
    }

    type Op = unsafe extern "C" fn(*const c_void, *mut ggml_tensor);
    const THREADS: c_int = 3;

    /// A tensor of `ne` values of type `t` at `data`, rows of consecutive values.
    fn tensor(t: ggml_type, ne: [i64; 4], data: *mut c_void) -> ggml_tensor {
        // SAFETY: ggml_tensor is plain data; all-zero is a valid (empty) tensor.
        let mut x: ggml_tensor = unsafe { std::mem::zeroed() };
        let size = if t == F32 { 4 } else { 2 };
        x.type_ = t;
        x.ne = ne;
        x.nb = [
            size,
            size * ne[0] as usize,
            size * (ne[0] * ne[1]) as usize,
            size * (ne[0] * ne[1] * ne[2]) as usize,
        ];
        x.data = data;
        x
    }

    /// `op` on `dst` with each of [`THREADS`] threads in turn (ggml's threads write disjoint
    /// rows), each with its scratch.
    fn run(op: Op, dst: &mut ggml_tensor) {
        let mut scratch = vec![0f32; (dst.ne[0] as usize + 16) * THREADS as usize];
        for ith in 0..THREADS {
            let params = Params {
                ith,
                nth: THREADS,
                wsize: scratch.len() * 4,
                wdata: scratch.as_mut_ptr().cast(),
                threadpool: std::ptr::null_mut(),
            };
            unsafe { op((&params as *const Params).cast(), dst) };
        }
    }

    /// Pseudo-random values in ±`range`, some −∞ if `masked`.
    fn values(n: usize, seed: u64, range: f32, masked: bool) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                let s = crate::xorshift(&mut s);
                if masked && s.is_multiple_of(11) {
                    f32::NEG_INFINITY
                } else {
                    (s % 1_000_000) as f32 / 1_000_000.0 * 2.0 * range - range
                }
            })
            .collect()
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|v| v.to_bits()).collect()
    }

    #[test]
    fn the_softmax_is_ggml_s_to_the_bit() {
        unsafe { ggml_cpu_init() };
        // Rows of n, r rows, h heads, b batches; the mask's rows are wider and more (ggml pads
        // them), broadcast over heads and batches.
        for (n, r, h, b) in [(704, 5, 2, 1), (13, 7, 3, 2), (1500, 2, 1, 1)] {
            let scores = values(n * r * h * b, n as u64, 8.0, false);
            let (mn, mr) = (n + 3, r + 2);
            let mask32 = values(mn * mr, 5, 2.0, true);
            let mask16: Vec<u16> = mask32
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            for (mask_type, in_place) in [(None, false), (Some(F32), false), (Some(F16), true)] {
                let results: Vec<Vec<u32>> = [
                    __real_ggml_compute_forward_soft_max as Op,
                    __wrap_ggml_compute_forward_soft_max as Op,
                ]
                .into_iter()
                .map(|op| {
                    let mut x = scores.clone();
                    let mut out = vec![f32::NAN; x.len()];
                    let (mut m32, mut m16) = (mask32.clone(), mask16.clone());
                    let ne = [n as i64, r as i64, h as i64, b as i64];
                    let src = tensor(F32, ne, x.as_mut_ptr().cast());
                    let mask = match mask_type {
                        Some(t) if t == F32 => Some(tensor(
                            F32,
                            [mn as i64, mr as i64, 1, 1],
                            m32.as_mut_ptr().cast(),
                        )),
                        Some(_) => Some(tensor(
                            F16,
                            [mn as i64, mr as i64, 1, 1],
                            m16.as_mut_ptr().cast(),
                        )),
                        None => None,
                    };
                    let target = if in_place {
                        x.as_mut_ptr()
                    } else {
                        out.as_mut_ptr()
                    };
                    let mut dst = tensor(F32, ne, target.cast());
                    dst.src[0] = &src as *const _ as *mut _;
                    if let Some(mask) = &mask {
                        dst.src[1] = mask as *const _ as *mut _;
                    }
                    dst.op_params[0] = 0.125f32.to_bits() as i32;
                    dst.op_params[1] = 0f32.to_bits() as i32;
                    run(op, &mut dst);
                    bits(if in_place { &x } else { &out })
                })
                .collect();
                assert_eq!(
                    results[0], results[1],
                    "{n}×{r}×{h}×{b}, mask {mask_type:?}"
                );
            }
        }
    }

    #[test]
    fn gelu_is_ggml_s_to_the_bit() {
        unsafe { ggml_cpu_init() };
        for (n, rows, in_place) in [(1536, 7, false), (13, 5, true), (384, 4, true)] {
            let input = values(n * rows, n as u64 + 1, 12.0, false);
            let results: Vec<Vec<u32>> = [
                __real_ggml_compute_forward_unary as Op,
                __wrap_ggml_compute_forward_unary as Op,
            ]
            .into_iter()
            .map(|op| {
                let mut x = input.clone();
                let mut out = vec![f32::NAN; x.len()];
                let ne = [n as i64, (rows / 2).max(1) as i64, 2.min(rows) as i64, 1];
                let ne = if ne[1] * ne[2] == rows as i64 {
                    ne
                } else {
                    [n as i64, rows as i64, 1, 1]
                };
                let src = tensor(F32, ne, x.as_mut_ptr().cast());
                let target = if in_place {
                    x.as_mut_ptr()
                } else {
                    out.as_mut_ptr()
                };
                let mut dst = tensor(F32, ne, target.cast());
                dst.src[0] = &src as *const _ as *mut _;
                dst.op = UNARY;
                dst.op_params[0] = GELU as i32;
                run(op, &mut dst);
                bits(if in_place { &x } else { &out })
            })
            .collect();
            assert_eq!(results[0], results[1], "{n}×{rows}, in place: {in_place}");
        }
    }
}
