//! 8-bit matrix products (ggml's Q8_0 by Q8_0) on CPUs with AVX-512 VNNI.
//!
//! whisper.cpp multiplies our 8-bit model (ggml's Q8_0: blocks of 32 signed bytes, each with an
//! f16 scale) by 8-bit activations through llamafile's tinyBLAS, which handles one row, one
//! column and one block at a time: a 32-byte dot product, a conversion to float and a
//! multiply-add for every 32 products. That is about a third of a transcription's time on
//! tiny.en (perf, `vox serve` under load), at a fraction of what the CPU's 8-bit dot-product
//! instructions can do. This kernel does the same products sixteen weight rows at a time: it
//! lays a panel of sixteen rows out so that one 512-bit `vpdpbusd` multiplies four bytes of
//! each of the sixteen rows by the same four bytes of a column, so a block of 32 costs eight
//! dot-product instructions and one conversion for sixteen rows, with four columns sharing each
//! panel load.
//!
//! The blocks' integer dot products are exact and the same as tinyBLAS's: the weights are made
//! unsigned (`q + 128`) for `vpdpbusd`, and the `128 × Σ column bytes` that adds is taken off
//! before the block's sum is scaled. Each block's sum is then converted and scaled once for
//! sixteen rows (tinyBLAS converts and scales eight partial sums per block), so the float
//! roundings differ, by no more than f32's.
//!
//! [`gemm`]: C\[j·ldc + i\] = Σ over blocks b of dA(i,b)·dB(j,b)·Σ qA(i,b,·)·qB(j,b,·), for
//! weight rows i < m and columns j < n, the rows split among whisper.cpp's threads.

use super::{GGML_TYPE_F32, GGML_TYPE_Q8_0, Product, ROWS};

/// Values per Q8_0 block, and its size in bytes (an f16 scale, then 32 signed bytes).
pub const QK8_0: usize = 32;
pub const BLOCK_BYTES: usize = 2 + QK8_0;

/// Whether this CPU runs the kernel.
pub fn supported() -> bool {
    super::avx512() && {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// Whether [`gemm`] takes a product of these shapes and types (else tinyBLAS does).
pub fn takes(m: i64, n: i64, a_type: i32, b_type: i32, c_type: i32) -> bool {
    a_type == GGML_TYPE_Q8_0
        && b_type == GGML_TYPE_Q8_0
        && c_type == GGML_TYPE_F32
        && super::fits(m, n)
        && supported()
}

/// Thread `ith` of `nth`'s share of the product `p` (see the module): rows `m` (a multiple of
/// [`ROWS`]) by columns `n`, `k` blocks deep.
///
/// # Safety
/// `p.a` holds `m` rows of `lda` blocks, `p.b` holds `n` rows of `ldb` blocks (`k` ≤ both),
/// `p.c` holds `n` columns of `ldc` ≥ `m` floats, and [`supported`] is true.
pub unsafe fn gemm(ith: usize, nth: usize, p: &Product<u8>) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        vnni::gemm(ith, nth, p)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{ith} {nth} {p:?}")
}

/// The f16 scale at `bytes`.
///
/// # Safety
/// `bytes` points at two readable bytes (a block's scale).
unsafe fn f16(bytes: *const u8) -> f32 {
    half::f16::from_le_bytes(unsafe { [*bytes, *bytes.add(1)] }).to_f32()
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::{BLOCK_BYTES, Product, ROWS, f16};
    use std::arch::x86_64::*;
    use std::cell::RefCell;

    /// A panel's bytes per block: eight registers of four bytes from each of sixteen rows.
    const PANEL_BLOCK: usize = 8 * 64;

    #[derive(Default)]
    struct Scratch {
        /// The rows of one panel, unsigned, in register order.
        panel: Vec<u8>,
        /// The panel rows' scales, sixteen per block.
        row_scales: Vec<f32>,
        /// Per column and block: the column's scale, and −128 × the sum of its bytes.
        col_scales: Vec<f32>,
        col_offsets: Vec<i32>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }

    pub unsafe fn gemm(ith: usize, nth: usize, p: &Product<u8>) {
        let Product {
            m,
            n,
            k: kb,
            a,
            lda,
            b,
            ldb,
            c,
            ldc,
        } = *p;
        let panels = m / ROWS;
        let (p0, p1) = super::super::share(panels, 1, ith, nth);
        if p0 == p1 {
            return;
        }
        SCRATCH.with_borrow_mut(|s| {
            s.panel.resize(kb * PANEL_BLOCK, 0);
            s.row_scales.resize(kb * ROWS, 0.0);
            s.col_scales.resize(n * kb, 0.0);
            s.col_offsets.resize(n * kb, 0);
            for j in 0..n {
                for blk in 0..kb {
                    let block = unsafe { b.add((j * ldb + blk) * BLOCK_BYTES) };
                    s.col_scales[j * kb + blk] = unsafe { f16(block) };
                    let sum: i32 = (0..32)
                        .map(|t| unsafe { *block.add(2 + t) } as i8 as i32)
                        .sum();
                    s.col_offsets[j * kb + blk] = -128 * sum;
                }
            }
            for p in p0..p1 {
                unsafe {
                    pack(s, p * ROWS, kb, a, lda);
                    panel(s, p * ROWS, n, kb, b, ldb, c, ldc);
                }
            }
        })
    }

    /// Lays rows `i0..i0 + 16` out for [`panel`]: block by block, eight 64-byte registers, the
    /// r-th four bytes of register t being row r's bytes 4t..4t + 4, made unsigned.
    unsafe fn pack(s: &mut Scratch, i0: usize, kb: usize, a: *const u8, lda: usize) {
        for r in 0..ROWS {
            for blk in 0..kb {
                let block = unsafe { a.add(((i0 + r) * lda + blk) * BLOCK_BYTES) };
                s.row_scales[blk * ROWS + r] = unsafe { f16(block) };
                let out = &mut s.panel[blk * PANEL_BLOCK..];
                for t in 0..8 {
                    for q in 0..4 {
                        out[t * 64 + r * 4 + q] = unsafe { *block.add(2 + 4 * t + q) } ^ 0x80;
                    }
                }
            }
        }
    }

    /// One block of one column against the panel's eight registers `w`: sixteen rows' integer
    /// dot products, from −128 × the column's byte sum (`offset`) up.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn block_dot(w: &[__m512i; 8], col: *const u8, offset: i32) -> __m512i {
        let mut acc = _mm512_set1_epi32(offset);
        for (t, wt) in w.iter().enumerate() {
            let x = unsafe { (col.add(2 + 4 * t) as *const i32).read_unaligned() };
            acc = _mm512_dpbusd_epi32(acc, *wt, _mm512_set1_epi32(x));
        }
        acc
    }

    /// Block `blk`'s eight registers of the panel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn registers(s: &Scratch, blk: usize) -> [__m512i; 8] {
        let base = s.panel[blk * PANEL_BLOCK..][..PANEL_BLOCK].as_ptr() as *const __m512i;
        let mut w = [_mm512_setzero_si512(); 8];
        for (t, wt) in w.iter_mut().enumerate() {
            *wt = unsafe { _mm512_loadu_si512(base.add(t)) };
        }
        w
    }

    /// The panel of rows `i0..i0 + 16` times every column: four columns at a time, then the
    /// rest one by one.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn panel(
        s: &Scratch,
        i0: usize,
        n: usize,
        kb: usize,
        b: *const u8,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let mut j = 0;
        while j + 4 <= n {
            let mut acc = [_mm512_setzero_ps(); 4];
            for blk in 0..kb {
                let w = unsafe { registers(s, blk) };
                let da = unsafe { _mm512_loadu_ps(s.row_scales.as_ptr().add(blk * ROWS)) };
                for (q, acc) in acc.iter_mut().enumerate() {
                    let at = (j + q) * kb + blk;
                    let col = unsafe { b.add(((j + q) * ldb + blk) * BLOCK_BYTES) };
                    let dot = unsafe { block_dot(&w, col, s.col_offsets[at]) };
                    let scale = _mm512_mul_ps(da, _mm512_set1_ps(s.col_scales[at]));
                    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *acc);
                }
            }
            for (q, acc) in acc.iter().enumerate() {
                unsafe { _mm512_storeu_ps(c.add((j + q) * ldc + i0), *acc) };
            }
            j += 4;
        }
        while j < n {
            let mut acc = _mm512_setzero_ps();
            for blk in 0..kb {
                let w = unsafe { registers(s, blk) };
                let da = unsafe { _mm512_loadu_ps(s.row_scales.as_ptr().add(blk * ROWS)) };
                let at = j * kb + blk;
                let col = unsafe { b.add((j * ldb + blk) * BLOCK_BYTES) };
                let dot = unsafe { block_dot(&w, col, s.col_offsets[at]) };
                let scale = _mm512_mul_ps(da, _mm512_set1_ps(s.col_scales[at]));
                acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc);
            }
            unsafe { _mm512_storeu_ps(c.add(j * ldc + i0), acc) };
            j += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::GGML_TYPE_F32;
    use super::*;

    /// Q8_0 blocks of pseudo-random bytes and scales, `rows` × `blocks`.
    fn blocks(rows: usize, blocks: usize, seed: u64) -> Vec<u8> {
        let mut x = seed;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut out = Vec::with_capacity(rows * blocks * BLOCK_BYTES);
        for _ in 0..rows * blocks {
            let scale = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            out.extend_from_slice(&scale.to_le_bytes());
            // Every byte value, −128 and 127 included.
            out.extend((0..QK8_0).map(|_| next() as u8));
        }
        out
    }

    /// The product by definition, in f64.
    fn reference(m: usize, n: usize, kb: usize, a: &[u8], b: &[u8]) -> Vec<f64> {
        let mut c = vec![0.0; n * m];
        for j in 0..n {
            for i in 0..m {
                let mut sum = 0.0;
                for blk in 0..kb {
                    let x = &a[(i * kb + blk) * BLOCK_BYTES..][..BLOCK_BYTES];
                    let y = &b[(j * kb + blk) * BLOCK_BYTES..][..BLOCK_BYTES];
                    let dot: i32 = (0..QK8_0)
                        .map(|t| x[2 + t] as i8 as i32 * y[2 + t] as i8 as i32)
                        .sum();
                    sum += unsafe { f16(x.as_ptr()) as f64 * f16(y.as_ptr()) as f64 } * dot as f64;
                }
                c[j * m + i] = sum;
            }
        }
        c
    }

    #[test]
    fn products_match_the_definition() {
        if !supported() {
            eprintln!("this CPU has no AVX-512 VNNI: the kernel is not used here");
            return;
        }
        // Whisper's shapes (384 and 1536 deep), an odd column count, and one or three threads.
        for (m, n, kb, threads) in [
            (16, 2, 1, 1),
            (32, 7, 12, 3),
            (48, 5, 48, 2),
            (64, 33, 12, 1),
        ] {
            let a = blocks(m, kb, 1 + m as u64);
            let b = blocks(n, kb, 7 + n as u64);
            let want = reference(m, n, kb, &a, &b);
            let ldc = m + 3;
            let mut c = vec![f32::NAN; n * ldc];
            for ith in 0..threads {
                let p = Product {
                    m,
                    n,
                    k: kb,
                    a: a.as_ptr(),
                    lda: kb,
                    b: b.as_ptr(),
                    ldb: kb,
                    c: c.as_mut_ptr(),
                    ldc,
                };
                unsafe { gemm(ith, threads, &p) };
            }
            for j in 0..n {
                for i in 0..m {
                    let (got, want) = (c[j * ldc + i] as f64, want[j * m + i]);
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "{m}×{n}×{kb}: C[{j}][{i}] = {got}, by definition {want}"
                    );
                }
                // The padding after each column is not written.
                assert!(c[j * ldc + m..(j + 1) * ldc].iter().all(|v| v.is_nan()));
            }
        }
    }

    #[test]
    fn only_8_bit_products_of_whole_panels_are_taken() {
        let q = GGML_TYPE_Q8_0;
        assert!(!takes(384, 704, q, GGML_TYPE_F32, GGML_TYPE_F32));
        assert!(!takes(384, 1, q, q, GGML_TYPE_F32));
        assert!(!takes(384, 8, q, q, GGML_TYPE_F32));
        assert!(!takes(51865, 704, q, q, GGML_TYPE_F32));
        assert_eq!(takes(384, 704, q, q, GGML_TYPE_F32), supported());
    }
}
