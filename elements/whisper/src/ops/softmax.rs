//! whisper.cpp's softmax (attention's weights), with each row's maximum found sixteen values at
//! a time.
//!
//! ggml's softmax finds a row's maximum one value after another (`ggml_vec_max_f32`: a chain of
//! dependent `vmaxss`, four cycles per value), which was three quarters of its time and ~9% of
//! a transcription's (`perf` on `vox transcribe`, tiny.en: the encoder's attention has rows of
//! one value per audio frame, 704 for a 14 s window). The plugin is linked with
//! `--wrap=ggml_compute_forward_soft_max` (build.rs), so ggml's softmax comes to `hook`'s
//! `__wrap_ggml_compute_forward_soft_max`, which does the rows ggml does in the cases whisper.cpp
//! uses (f32 scores, a mask or none, no ALiBi, no sinks) and passes the rest on to ggml, as it
//! does everything with `VOX_WHISPER_OPS=ggml` ([`super::enabled`]).
//!
//! Everything but the maximum is ggml's, step for step: the scaled copy, the mask added, ggml's
//! own exponentials and sum (`ggml_vec_soft_max_f32`, called), the scaling by the sum's inverse.
//! The maximum of a row is the same whatever the order it is found in, so the weights are the
//! same to the bit, and so are the transcripts.

/// Row `x`'s maximum, as `ggml_vec_max_f32` finds it (−∞ for an empty row) but sixteen values
/// at a time: each lane keeps `if lane > v { lane } else { v }`, which is x86's `maxps` and
/// vectorises.
pub fn max(x: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = if *lane > v { *lane } else { v };
        }
    }
    let tail = chunks.remainder().iter();
    lanes
        .iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, |m, &v| if m > v { m } else { v })
}

/// A row's mask, added to the scaled scores.
#[derive(Clone, Copy)]
pub enum Mask<'a> {
    None,
    F32(&'a [f32]),
    /// f16 bits.
    F16(&'a [u16]),
}

/// One row of ggml's softmax (no ALiBi, no sinks) into `out`: `exp(x·scale + mask − max)`
/// divided by its sum, where `exp_sum` is ggml's `ggml_vec_soft_max_f32` (writes the
/// exponentials of `x − max` to its first argument and returns their sum). `scratch` holds
/// `x.len()` values.
pub fn row(
    x: &[f32],
    scale: f32,
    mask: Mask,
    scratch: &mut [f32],
    out: &mut [f32],
    exp_sum: impl FnOnce(&mut [f32], &[f32], f32) -> f64,
) {
    let w = &mut scratch[..x.len()];
    scale_and_mask(w, x, scale, mask);
    normalise(out, w, exp_sum);
}

/// The first half of [`row`]: `x·scale + mask` into `w` (ggml runs the softmax in place, so
/// the hook reads the row whole before it writes it).
pub fn scale_and_mask(w: &mut [f32], x: &[f32], scale: f32, mask: Mask) {
    for (w, &v) in w.iter_mut().zip(x) {
        *w = v * scale;
    }
    match mask {
        Mask::None => {}
        Mask::F32(m) => w.iter_mut().zip(m).for_each(|(w, &m)| *w += m),
        Mask::F16(m) => w
            .iter_mut()
            .zip(m)
            .for_each(|(w, &m)| *w += half::f16::from_bits(m).to_f32()),
    }
}

/// The second half of [`row`]: `exp(w − max(w))` over its sum into `out`.
pub fn normalise(out: &mut [f32], w: &[f32], exp_sum: impl FnOnce(&mut [f32], &[f32], f32) -> f64) {
    let max = max(w);
    let sum = exp_sum(out, w, max);
    let inverse = (1.0 / sum) as f32;
    out.iter_mut().for_each(|y| *y *= inverse);
}

/// The wrapper (see the module).
#[cfg(vox_ops_hook)]
mod hook {
    use super::Mask;
    use std::cell::RefCell;
    use std::ffi::{c_int, c_void};
    use whisper_rs::whisper_rs_sys::{
        ggml_tensor, ggml_type_GGML_TYPE_F16 as F16, ggml_type_GGML_TYPE_F32 as F32,
    };

    unsafe extern "C" {
        fn __real_ggml_compute_forward_soft_max(params: *const c_void, dst: *mut ggml_tensor);
        fn ggml_vec_soft_max_f32(n: c_int, y: *mut f32, x: *const f32, max: f32) -> f64;
    }

    thread_local! {
        static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }

    /// Whether the softmax `dst` is one we do: f32 scores and output with rows of consecutive
    /// values, a mask of f32 or f16 rows or none, no ALiBi (`max_bias` 0), no sinks.
    fn takes(dst: &ggml_tensor) -> bool {
        if !super::super::enabled() {
            return false;
        }
        let (src0, mask) = (dst.src[0], dst.src[1]);
        let max_bias = f32::from_bits(dst.op_params[1] as u32);
        if src0.is_null() || !dst.src[2].is_null() || max_bias != 0.0 {
            return false;
        }
        let src0 = unsafe { &*src0 };
        let mask_ok = mask.is_null() || {
            let mask = unsafe { &*mask };
            (mask.type_ == F32 && mask.nb[0] == 4) || (mask.type_ == F16 && mask.nb[0] == 2)
        };
        mask_ok
            && src0.type_ == F32
            && dst.type_ == F32
            && src0.nb[0] == 4
            && dst.nb[0] == 4
            && src0.ne == dst.ne
            && dst.ne[0] <= c_int::MAX as i64
    }

    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn __wrap_ggml_compute_forward_soft_max(
        params: *const c_void,
        dst: *mut ggml_tensor,
    ) {
        let d = unsafe { &*dst };
        if !takes(d) {
            return unsafe { __real_ggml_compute_forward_soft_max(params, dst) };
        }
        super::TAKEN.call_once(|| log::info!("{}", super::LINE));
        let (ith, nth) = unsafe { crate::threads::of(params) };
        let src0 = unsafe { &*d.src[0] };
        let mask = d.src[1];
        let scale = f32::from_bits(d.op_params[0] as u32);
        let n = d.ne[0] as usize;
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.resize(n, 0.0);
            // ggml's order: rows i01 taken by the threads in turn, in each head and batch.
            let at = |t: &ggml_tensor, i1: usize, i2: usize, i3: usize| unsafe {
                (t.data as *mut u8).add(i1 * t.nb[1] + i2 * t.nb[2] + i3 * t.nb[3])
            };
            for i03 in 0..d.ne[3] as usize {
                for i02 in 0..d.ne[2] as usize {
                    for i01 in (ith..d.ne[1] as usize).step_by(nth) {
                        // SAFETY: the rows are n consecutive f32s (takes), inside the tensors.
                        let mask = if mask.is_null() {
                            Mask::None
                        } else {
                            // The mask is broadcast over heads and batches, as in ggml.
                            let m = unsafe { &*mask };
                            let row = at(m, i01, i02 % m.ne[2] as usize, i03 % m.ne[3] as usize);
                            if m.type_ == F16 {
                                Mask::F16(unsafe {
                                    std::slice::from_raw_parts(row as *const u16, n)
                                })
                            } else {
                                Mask::F32(unsafe {
                                    std::slice::from_raw_parts(row as *const f32, n)
                                })
                            }
                        };
                        // The row is read whole before it is written: ggml runs the softmax in
                        // place, the output over the scores.
                        let x = unsafe {
                            std::slice::from_raw_parts(at(src0, i01, i02, i03) as *const f32, n)
                        };
                        super::scale_and_mask(scratch, x, scale, mask);
                        let out = unsafe {
                            std::slice::from_raw_parts_mut(at(d, i01, i02, i03) as *mut f32, n)
                        };
                        super::normalise(out, scratch, |y, x, max| unsafe {
                            ggml_vec_soft_max_f32(n as c_int, y.as_mut_ptr(), x.as_ptr(), max)
                        });
                    }
                }
            }
        })
    }
}

/// Logged (to the `whisper-cpp` debug category, at info) the first time the wrapper does a
/// softmax, so that a build whose link options did not send it here shows it.
pub const LINE: &str = "whisper.cpp's softmax runs on ours (its maximum sixteen values at a time)";
#[cfg_attr(not(vox_ops_hook), allow(dead_code))]
static TAKEN: std::sync::Once = std::sync::Once::new();

#[cfg(test)]
mod tests {
    use super::*;

    /// ggml's `ggml_vec_max_f32`: one value after another.
    fn ggml_max(x: &[f32]) -> f32 {
        x.iter()
            .fold(f32::NEG_INFINITY, |m, &v| if m > v { m } else { v })
    }

    /// Pseudo-random scores in about ±20, some −∞ (masked).
    fn scores(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n)
            .map(|_| {
                let s = crate::xorshift(&mut s);
                if s.is_multiple_of(17) {
                    f32::NEG_INFINITY
                } else {
                    (s % 40_000) as f32 / 1000.0 - 20.0
                }
            })
            .collect()
    }

    #[test]
    fn the_maximum_is_ggml_s_for_every_length() {
        for n in [0, 1, 15, 16, 17, 64, 703, 704, 1500] {
            let x = scores(n, n as u64 + 3);
            assert_eq!(max(&x).to_bits(), ggml_max(&x).to_bits(), "{n} values");
        }
        assert_eq!(max(&[f32::NEG_INFINITY; 20]), f32::NEG_INFINITY);
        // The largest value anywhere, the tail included.
        let mut x = vec![1.0f32; 37];
        x[36] = 2.0;
        assert_eq!(max(&x), 2.0);
    }

    /// A row as ggml's C code does it, step by step, with an exponential of our own standing in
    /// for `ggml_vec_soft_max_f32`.
    #[test]
    fn a_row_is_ggml_s_to_the_bit() {
        let exp_sum = |y: &mut [f32], x: &[f32], max: f32| {
            let mut sum = 0.0f64;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum += *y as f64;
            }
            sum
        };
        for (n, masked) in [(704, false), (13, true), (1500, true)] {
            let x = scores(n, 11);
            let m32: Vec<f32> = scores(n, 5).iter().map(|v| v.min(0.0)).collect();
            let m16: Vec<u16> = m32
                .iter()
                .map(|&v| half::f16::from_f32(v).to_bits())
                .collect();
            let scale = 0.125f32;
            for mask in [Mask::None, Mask::F32(&m32), Mask::F16(&m16)] {
                if !masked && !matches!(mask, Mask::None) {
                    continue;
                }
                // ggml: copy, scale, add the mask, maximum one by one, exponentials, 1/sum.
                let mut w: Vec<f32> = x.iter().map(|v| v * scale).collect();
                match mask {
                    Mask::None => {}
                    Mask::F32(m) => w.iter_mut().zip(m).for_each(|(w, m)| *w += 1.0 * m),
                    Mask::F16(m) => w
                        .iter_mut()
                        .zip(m)
                        .for_each(|(w, &m)| *w += 1.0 * half::f16::from_bits(m).to_f32()),
                }
                let mut want = vec![0.0; n];
                let sum = exp_sum(&mut want, &w, ggml_max(&w));
                let inverse = 1.0 / sum;
                want.iter_mut().for_each(|y| *y *= inverse as f32);

                let (mut scratch, mut got) = (vec![f32::NAN; n], vec![f32::NAN; n]);
                row(&x, scale, mask, &mut scratch, &mut got, exp_sum);
                let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{n} values");
                let total: f32 = got.iter().sum();
                assert!((total - 1.0).abs() < 1e-4, "{n} values sum to {total}");
            }
        }
    }
}
