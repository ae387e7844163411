//! whisper.cpp's GELU (the activation of its MLPs), eight values at a time.
//!
//! ggml (built with `GGML_GELU_FP16`, as whisper.cpp's is) computes GELU by rounding each value
//! to f16 and looking it up in a table of 65,536 (`ggml_table_gelu_f16`), one value after another
//! (~5% of a transcription: `perf` on `vox transcribe`). This does the same eight at a time: the
//! values rounded to f16 together (`vcvtps2ph`), looked up together (a gather of the table's
//! 32-bit pairs, which stays inside the table), widened together; values ≤ −10 give 0 and ≥ 10
//! themselves, as in ggml. The same table, the same roundings: ggml's results to the bit.

/// GELU of `x` into `y` as ggml's `ggml_vec_gelu_f32` does it with `table` (ggml's
/// `ggml_table_gelu_f16`: the f16 GELU of every f16).
pub fn row(y: &mut [f32], x: &[f32], table: &[u16; 1 << 16]) {
    assert_eq!(y.len(), x.len());
    // SAFETY: two slices of x.len() values.
    unsafe { row_in_place(y.as_mut_ptr(), x.as_ptr(), x.len(), table) }
}

/// [`row`] on `n` values at `x` into `y`, which may be the same (ggml runs GELU in place): each
/// value is read before it is written.
///
/// # Safety
/// `x` and `y` point at `n` f32s each.
pub unsafe fn row_in_place(y: *mut f32, x: *const f32, n: usize, table: &[u16; 1 << 16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has the instructions.
        return unsafe { x86::row(y, x, n, table) };
    }
    for i in 0..n {
        unsafe { *y.add(i) = one(*x.add(i), table) };
    }
}

/// One value, as ggml does it.
fn one(x: f32, table: &[u16; 1 << 16]) -> f32 {
    if x <= -10.0 {
        0.0
    } else if x >= 10.0 {
        x
    } else {
        let h = half::f16::from_f32(x).to_bits();
        half::f16::from_bits(table[h as usize]).to_f32()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn row(y: *mut f32, x: *const f32, n: usize, table: &[u16; 1 << 16]) {
        let done = n / 8 * 8;
        for i in (0..done).step_by(8) {
            unsafe { eight(y.add(i), x.add(i), table) };
        }
        // The tail through the same eight lanes (the same roundings as the rest).
        let rest = n - done;
        if rest > 0 {
            let mut xs = [0f32; 8];
            let mut ys = [0f32; 8];
            unsafe {
                std::ptr::copy_nonoverlapping(x.add(done), xs.as_mut_ptr(), rest);
                eight(ys.as_mut_ptr(), xs.as_ptr(), table);
                std::ptr::copy_nonoverlapping(ys.as_ptr(), y.add(done), rest);
            }
        }
    }

    /// Eight values at `x` into `y`.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn eight(y: *mut f32, x: *const f32, table: &[u16; 1 << 16]) {
        let v = unsafe { _mm256_loadu_ps(x) };
        // Rounded to f16 to the nearest, ties to even (ggml's _cvtss_sh(x, 0)).
        let index = _mm256_cvtepu16_epi32(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v));
        // The 32-bit pair holding entry `index` starts at the even entry below it, so the
        // gather reads inside the table; odd entries are its upper half.
        let one = _mm256_set1_epi32(1);
        let even = _mm256_andnot_si256(one, index);
        let pairs = unsafe { _mm256_i32gather_epi32::<2>(table.as_ptr() as *const i32, even) };
        let shift = _mm256_slli_epi32::<4>(_mm256_and_si256(index, one));
        let entries = _mm256_and_si256(_mm256_srlv_epi32(pairs, shift), _mm256_set1_epi32(0xffff));
        // Eight 16-bit entries in order, widened to f32.
        let packed = _mm256_permute4x64_epi64::<0b1000>(_mm256_packus_epi32(entries, entries));
        let g = _mm256_cvtph_ps(_mm256_castsi256_si128(packed));
        // ≥ 10: the value itself; ≤ −10: 0 (comparisons false for NaN, as in ggml).
        let high = _mm256_cmp_ps::<_CMP_GE_OQ>(v, _mm256_set1_ps(10.0));
        let low = _mm256_cmp_ps::<_CMP_LE_OQ>(v, _mm256_set1_ps(-10.0));
        let out = _mm256_andnot_ps(low, _mm256_blendv_ps(g, v, high));
        unsafe { _mm256_storeu_ps(y, out) };
    }
}

/// The wrapper: ggml's unary operations come here; GELU on f32 rows is done here, the rest goes
/// on to ggml.
#[cfg(vox_ops_hook)]
mod hook {
    use std::ffi::c_void;
    use whisper_rs::whisper_rs_sys::{
        ggml_op_GGML_OP_UNARY as UNARY, ggml_tensor, ggml_type_GGML_TYPE_F32 as F32,
        ggml_unary_op_GGML_UNARY_OP_GELU as GELU,
    };

    unsafe extern "C" {
        fn __real_ggml_compute_forward_unary(params: *const c_void, dst: *mut ggml_tensor);
        static ggml_table_gelu_f16: [u16; 1 << 16];
    }

    /// Whether `t` holds f32 rows of consecutive values whose row r of all its higher
    /// dimensions is at `r·nb[1]`, which is how ggml's GELU addresses them (after asserting
    /// `ggml_is_contiguous_1`).
    fn rows(t: &ggml_tensor) -> bool {
        t.type_ == F32
            && t.nb[0] == 4
            && (t.ne[2] == 1 || t.nb[2] == t.nb[1] * t.ne[1] as usize)
            && (t.ne[3] == 1 || t.nb[3] == t.nb[1] * (t.ne[1] * t.ne[2]) as usize)
    }

    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn __wrap_ggml_compute_forward_unary(
        params: *const c_void,
        dst: *mut ggml_tensor,
    ) {
        let d = unsafe { &*dst };
        let src = d.src[0];
        let ours = super::super::enabled()
            && d.op == UNARY
            && d.op_params[0] as u32 == GELU
            && !src.is_null()
            && rows(d)
            && rows(unsafe { &*src })
            && unsafe { (*src).ne } == d.ne;
        if !ours {
            return unsafe { __real_ggml_compute_forward_unary(params, dst) };
        }
        super::TAKEN.call_once(|| log::info!("{}", super::LINE));
        let src = unsafe { &*src };
        let (ith, nth) = unsafe { crate::threads::of(params) };
        // Consecutive rows for each thread.
        let (n, count) = (d.ne[0] as usize, (d.ne[1] * d.ne[2] * d.ne[3]) as usize);
        let (r0, r1) = crate::threads::share(count, 1, ith, nth);
        let table = unsafe { &*std::ptr::addr_of!(ggml_table_gelu_f16) };
        for r in r0..r1 {
            // SAFETY: rows of n f32s inside the tensors (checked above), the same ones when
            // ggml runs GELU in place.
            unsafe {
                let x = (src.data as *const u8).add(r * src.nb[1]) as *const f32;
                let y = (d.data as *mut u8).add(r * d.nb[1]) as *mut f32;
                super::row_in_place(y, x, n, table);
            }
        }
    }
}

/// Logged (to the `whisper-cpp` debug category, at info) the first time the wrapper does a GELU.
pub const LINE: &str = "whisper.cpp's GELU runs on ours (eight values at a time)";
#[cfg_attr(not(vox_ops_hook), allow(dead_code))]
static TAKEN: std::sync::Once = std::sync::Once::new();

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of pseudo-random f16 values in ±16 (any table does: the lookups are checked).
    fn table() -> Box<[u16; 1 << 16]> {
        let mut s = 7u64;
        let mut t = Box::new([0u16; 1 << 16]);
        for v in t.iter_mut() {
            let s = crate::xorshift(&mut s);
            *v = half::f16::from_f32((s % 32_000) as f32 / 1000.0 - 16.0).to_bits();
        }
        t
    }

    #[test]
    fn rows_are_ggml_s_to_the_bit() {
        let t = table();
        let mut s = 3u64;
        let mut x: Vec<f32> = (0..1541)
            .map(|_| {
                let s = crate::xorshift(&mut s);
                (s % 2_600_000) as f32 / 100_000.0 - 13.0
            })
            .collect();
        // The edges, ties between f16 values, zeros, and f16's largest and smallest.
        x[..12].copy_from_slice(&[
            -10.0,
            10.0,
            -9.999,
            9.999,
            0.0,
            -0.0,
            1.0 + 1.0 / 2048.0,
            65504.0,
            -65504.0,
            6e-8,
            -1e-9,
            2.5,
        ]);
        for n in [0, 1, 7, 8, 9, 1541] {
            let mut y = vec![f32::NAN; n];
            row(&mut y, &x[..n], &t);
            for (i, (&y, &x)) in y.iter().zip(&x[..n]).enumerate() {
                assert_eq!(y.to_bits(), one(x, &t).to_bits(), "GELU({x}) at {i} of {n}");
            }
        }
    }
}
