//! 8-bit matrix products (ggml's Q8_0 by Q8_0) on CPUs with AVX-512 VNNI, AVX-VNNI or AVX2.
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
//! panel load. In 256-bit registers (AVX-VNNI: Intel's client CPUs) the same panel is done as
//! two halves of eight rows, each register load shared by four columns; with AVX2 alone, each
//! `vpdpbusd` becomes `vpsignb`, `vpmaddubsw` and `vpmaddwd` on the signed bytes (as ggml's own
//! 8-bit dot products do: exact for activations in ±127, which is what ggml's Q8_0 holds).
//!
//! The blocks' integer dot products are exact and the same as tinyBLAS's: the weights are made
//! unsigned (`q + 128`) for `vpdpbusd`, and the `128 × Σ column bytes` that adds is taken off
//! before the block's sum is scaled (AVX2 multiplies the weights' magnitudes by the column's
//! bytes with the weights' signs instead). Each block's sum is then converted and scaled once for
//! sixteen rows (tinyBLAS converts and scales eight partial sums per block), so the float
//! roundings differ, by no more than f32's.
//!
//! [`gemm`]: C\[j·ldc + i\] = Σ over blocks b of dA(i,b)·dB(j,b)·Σ qA(i,b,·)·qB(j,b,·), for
//! weight rows i < m and columns j < n, the rows split among whisper.cpp's threads.

use super::{GGML_TYPE_F32, GGML_TYPE_Q8_0, Isa, Product, ROWS};

/// Values per Q8_0 block, and its size in bytes (an f16 scale, then 32 signed bytes).
pub const QK8_0: usize = 32;
pub const BLOCK_BYTES: usize = 2 + QK8_0;

/// Whether this CPU runs the kernel with these instructions.
pub fn runs_on(isa: Isa) -> bool {
    isa.on_cpu() && {
        #[cfg(target_arch = "x86_64")]
        {
            isa != Isa::Avx512 || std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }
}

/// The instructions the kernel runs on in this process (`None`: tinyBLAS does its products).
pub fn isa() -> Option<Isa> {
    static ISA: std::sync::LazyLock<Option<Isa>> =
        std::sync::LazyLock::new(|| super::choose(super::allowed(), runs_on));
    *ISA
}

/// The kernel's name with these instructions.
pub fn name(isa: Isa) -> &'static str {
    match isa {
        Isa::Avx512 => "AVX-512 VNNI",
        Isa::AvxVnni => "AVX-VNNI (256-bit)",
        Isa::Avx2 => "AVX2 (256-bit, no VNNI)",
    }
}

/// What the plugin logs the first time the kernel takes a product with these instructions.
pub fn line(isa: Isa) -> String {
    format!(
        "whisper.cpp's 8-bit matrix products run on our {} kernel",
        name(isa)
    )
}

/// Whether [`gemm`] takes a product of these shapes and types, and with which instructions
/// (else tinyBLAS does it).
pub fn takes(m: i64, n: i64, a_type: i32, b_type: i32, c_type: i32) -> Option<Isa> {
    let fits = a_type == GGML_TYPE_Q8_0
        && b_type == GGML_TYPE_Q8_0
        && c_type == GGML_TYPE_F32
        && super::fits(m, n);
    isa().filter(|_| fits)
}

/// Thread `ith` of `nth`'s share of the product `p` (see the module): rows `m` (a multiple of
/// [`ROWS`]) by columns `n`, `k` blocks deep.
///
/// # Safety
/// `p.a` holds `m` rows of `lda` blocks, `p.b` holds `n` rows of `ldb` blocks (`k` ≤ both),
/// `p.c` holds `n` columns of `ldc` ≥ `m` floats, and [`runs_on`] `isa`.
pub unsafe fn gemm(isa: Isa, ith: usize, nth: usize, p: &Product<u8>) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        x86::gemm(isa, ith, nth, p)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{isa:?} {ith} {nth} {p:?}")
}

/// The f16 scale at `bytes`.
///
/// # Safety
/// `bytes` points at two readable bytes (a block's scale).
unsafe fn f16(bytes: *const u8) -> f32 {
    half::f16::from_le_bytes(unsafe { [*bytes, *bytes.add(1)] }).to_f32()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{BLOCK_BYTES, Isa, Product, ROWS, f16};
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
        /// Per column and block: the column's scale, and −128 × the sum of its bytes (VNNI's
        /// offset).
        col_scales: Vec<f32>,
        col_offsets: Vec<i32>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }

    pub unsafe fn gemm(isa: Isa, ith: usize, nth: usize, p: &Product<u8>) {
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
        let (p0, p1) = crate::threads::share(panels, 1, ith, nth);
        if p0 == p1 {
            return;
        }
        SCRATCH.with_borrow_mut(|s| {
            s.panel.resize(kb * PANEL_BLOCK, 0);
            s.row_scales.resize(kb * ROWS, 0.0);
            s.col_scales.resize(n * kb, 0.0);
            s.col_offsets.resize(n * kb, 0);
            // VNNI multiplies unsigned weights (and takes their 128s off again); AVX2 takes
            // signed ones.
            let vnni = isa != Isa::Avx2;
            unsafe { columns(s, n, kb, b, ldb, vnni) };
            let flip = if vnni { 0x80 } else { 0 };
            for p in p0..p1 {
                unsafe {
                    pack(s, p * ROWS, kb, a, lda, flip);
                    let out = c.add(p * ROWS);
                    match isa {
                        Isa::Avx512 => panel512(s, n, kb, b, ldb, out, ldc),
                        Isa::AvxVnni => panel256::<true>(s, n, kb, b, ldb, out, ldc),
                        Isa::Avx2 => panel256::<false>(s, n, kb, b, ldb, out, ldc),
                    }
                }
            }
        })
    }

    /// Lays rows `i0..i0 + 16` out for [`panel512`]: block by block, eight 64-byte registers,
    /// the r-th four bytes of register t being row r's bytes 4t..4t + 4, each XORed with
    /// `flip` (0x80 makes them unsigned for VNNI; [`panel256`] loads each register's halves,
    /// rows 0–7 and 8–15).
    unsafe fn pack(s: &mut Scratch, i0: usize, kb: usize, a: *const u8, lda: usize, flip: u8) {
        let flip = u32::from_ne_bytes([flip; 4]);
        let panel = s.panel[..kb * PANEL_BLOCK].as_mut_ptr();
        for r in 0..ROWS {
            for blk in 0..kb {
                let block = unsafe { a.add(((i0 + r) * lda + blk) * BLOCK_BYTES) };
                s.row_scales[blk * ROWS + r] = unsafe { f16(block) };
                for t in 0..8 {
                    // SAFETY: t·64 + r·4 + 4 ≤ PANEL_BLOCK within block blk's part of the panel.
                    unsafe {
                        let four = (block.add(2 + 4 * t) as *const u32).read_unaligned() ^ flip;
                        let at = panel.add(blk * PANEL_BLOCK + t * 64 + r * 4) as *mut u32;
                        at.write_unaligned(four);
                    }
                }
            }
        }
    }

    /// Every column's block scales, and (`vnni`) −128 × each block's byte sum.
    #[target_feature(enable = "avx2")]
    unsafe fn columns(s: &mut Scratch, n: usize, kb: usize, b: *const u8, ldb: usize, vnni: bool) {
        let (signs, zero) = (_mm256_set1_epi8(-128), _mm256_setzero_si256());
        for j in 0..n {
            for blk in 0..kb {
                let block = unsafe { b.add((j * ldb + blk) * BLOCK_BYTES) };
                s.col_scales[j * kb + blk] = unsafe { f16(block) };
                if vnni {
                    // The bytes made unsigned (+128) and summed by fours of eight; less 32 × 128.
                    let bytes = unsafe { _mm256_loadu_si256(block.add(2) as *const __m256i) };
                    let sums = _mm256_sad_epu8(_mm256_xor_si256(bytes, signs), zero);
                    let mut lanes = [0i64; 4];
                    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, sums) };
                    let sum = lanes.iter().sum::<i64>() as i32 - 32 * 128;
                    s.col_offsets[j * kb + blk] = -128 * sum;
                }
            }
        }
    }

    /// The packed panel times every column, four columns at a time, then the rest one by one;
    /// column j's sixteen sums go to `out + j·ldc`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn panel512(
        s: &Scratch,
        n: usize,
        kb: usize,
        b: *const u8,
        ldb: usize,
        out: *mut f32,
        ldc: usize,
    ) {
        let mut j = 0;
        while j + 4 <= n {
            unsafe { columns512::<4>(s, j, kb, b, ldb, out, ldc) };
            j += 4;
        }
        while j < n {
            unsafe { columns512::<1>(s, j, kb, b, ldb, out, ldc) };
            j += 1;
        }
    }

    /// Columns `j..j + C` against the panel's sixteen rows: per block, eight 512-bit
    /// `vpdpbusd` per column from −128 × the column's byte sum up, then one conversion and
    /// scale.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    unsafe fn columns512<const C: usize>(
        s: &Scratch,
        j: usize,
        kb: usize,
        b: *const u8,
        ldb: usize,
        out: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [_mm512_setzero_ps(); C];
        for blk in 0..kb {
            let base = s.panel[blk * PANEL_BLOCK..][..PANEL_BLOCK].as_ptr() as *const __m512i;
            let mut w = [_mm512_setzero_si512(); 8];
            for (t, wt) in w.iter_mut().enumerate() {
                *wt = unsafe { _mm512_loadu_si512(base.add(t)) };
            }
            let da = unsafe { _mm512_loadu_ps(s.row_scales.as_ptr().add(blk * ROWS)) };
            for (q, acc) in acc.iter_mut().enumerate() {
                let at = (j + q) * kb + blk;
                let col = unsafe { b.add(((j + q) * ldb + blk) * BLOCK_BYTES + 2) };
                let mut dot = _mm512_set1_epi32(s.col_offsets[at]);
                for (t, wt) in w.iter().enumerate() {
                    let x = unsafe { (col.add(4 * t) as *const i32).read_unaligned() };
                    dot = _mm512_dpbusd_epi32(dot, *wt, _mm512_set1_epi32(x));
                }
                let scale = _mm512_mul_ps(da, _mm512_set1_ps(s.col_scales[at]));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, *acc);
            }
        }
        for (q, acc) in acc.iter().enumerate() {
            unsafe { _mm512_storeu_ps(out.add((j + q) * ldc), *acc) };
        }
    }

    /// [`panel512`] in 256-bit registers: the panel's two halves of eight rows one after the
    /// other (sixteen registers would not hold a block of both), four columns at a time; with
    /// AVX-VNNI (`VNNI`) or AVX2's 8-bit multiplies.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn panel256<const VNNI: bool>(
        s: &Scratch,
        n: usize,
        kb: usize,
        b: *const u8,
        ldb: usize,
        out: *mut f32,
        ldc: usize,
    ) {
        for half in 0..2 {
            let mut j = 0;
            while j < n {
                let c = if j + 4 <= n { 4 } else { 1 };
                unsafe {
                    match (VNNI, c) {
                        (true, 4) => columns_vnni::<4>(s, half, j, kb, b, ldb, out, ldc),
                        (true, _) => columns_vnni::<1>(s, half, j, kb, b, ldb, out, ldc),
                        (false, 4) => columns_avx2::<4>(s, half, j, kb, b, ldb, out, ldc),
                        (false, _) => columns_avx2::<1>(s, half, j, kb, b, ldb, out, ldc),
                    }
                }
                j += c;
            }
        }
    }

    /// Rows per 256-bit register: half a panel.
    const LANES: usize = ROWS / 2;

    /// Columns `j..j + C` against the panel's rows `8·half..8·half + 8` with AVX-VNNI: per
    /// block, eight 256-bit `vpdpbusd` per column (from −128 × the column's byte sum up), each
    /// weight register loaded once for the `C` columns.
    #[target_feature(enable = "avx2,fma,avxvnni")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns_vnni<const C: usize>(
        s: &Scratch,
        half: usize,
        j: usize,
        kb: usize,
        b: *const u8,
        ldb: usize,
        out: *mut f32,
        ldc: usize,
    ) {
        let mut acc = [_mm256_setzero_ps(); C];
        for blk in 0..kb {
            let base = s.panel[blk * PANEL_BLOCK + half * 32..].as_ptr();
            let mut dot = [_mm256_setzero_si256(); C];
            for (q, dot) in dot.iter_mut().enumerate() {
                *dot = _mm256_set1_epi32(s.col_offsets[(j + q) * kb + blk]);
            }
            let cols: [*const u8; C] =
                std::array::from_fn(|q| unsafe { b.add(((j + q) * ldb + blk) * BLOCK_BYTES + 2) });
            for t in 0..8 {
                let w = unsafe { _mm256_loadu_si256(base.add(t * 64) as *const __m256i) };
                for q in 0..C {
                    let x = unsafe { (cols[q].add(4 * t) as *const i32).read_unaligned() };
                    dot[q] = _mm256_dpbusd_avx_epi32(dot[q], w, _mm256_set1_epi32(x));
                }
            }
            unsafe { scale256(s, half, j, kb, blk, &dot, &mut acc) };
        }
        unsafe { store256(half, j, out, ldc, &acc) };
    }

    /// [`columns_vnni`] with AVX2 alone, on signed weights: `|w|` times the column's bytes
    /// with `w`'s signs (`vpsignb`), in pairs to 16 bits (`vpmaddubsw`: at most 2 × 128 × 128
    /// in magnitude, which fits), then to 32 (`vpmaddwd`). Exact while the column holds no −128,
    /// which `vpsignb` cannot negate (ggml's own 8-bit dot products have the same limit, and
    /// its activations are within ±127).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn columns_avx2<const C: usize>(
        s: &Scratch,
        half: usize,
        j: usize,
        kb: usize,
        b: *const u8,
        ldb: usize,
        out: *mut f32,
        ldc: usize,
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); C];
        for blk in 0..kb {
            let base = s.panel[blk * PANEL_BLOCK + half * 32..].as_ptr();
            let mut dot = [_mm256_setzero_si256(); C];
            let cols: [*const u8; C] =
                std::array::from_fn(|q| unsafe { b.add(((j + q) * ldb + blk) * BLOCK_BYTES + 2) });
            for t in 0..8 {
                let w = unsafe { _mm256_loadu_si256(base.add(t * 64) as *const __m256i) };
                let magnitude = _mm256_abs_epi8(w);
                for q in 0..C {
                    let x = unsafe { (cols[q].add(4 * t) as *const i32).read_unaligned() };
                    let signed = _mm256_sign_epi8(_mm256_set1_epi32(x), w);
                    let pairs = _mm256_maddubs_epi16(magnitude, signed);
                    dot[q] = _mm256_add_epi32(dot[q], _mm256_madd_epi16(pairs, ones));
                }
            }
            unsafe { scale256(s, half, j, kb, blk, &dot, &mut acc) };
        }
        unsafe { store256(half, j, out, ldc, &acc) };
    }

    /// Adds block `blk`'s integer sums `dot` of columns `j..j + C`, scaled by the rows' and
    /// the columns' scales, to `acc`.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn scale256<const C: usize>(
        s: &Scratch,
        half: usize,
        j: usize,
        kb: usize,
        blk: usize,
        dot: &[__m256i; C],
        acc: &mut [__m256; C],
    ) {
        let da = unsafe { _mm256_loadu_ps(s.row_scales.as_ptr().add(blk * ROWS + half * LANES)) };
        for q in 0..C {
            let scale = _mm256_mul_ps(da, _mm256_set1_ps(s.col_scales[(j + q) * kb + blk]));
            acc[q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[q]), scale, acc[q]);
        }
    }

    /// Columns `j..j + C` of rows `8·half..8·half + 8` to the output.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store256<const C: usize>(
        half: usize,
        j: usize,
        out: *mut f32,
        ldc: usize,
        acc: &[__m256; C],
    ) {
        for (q, acc) in acc.iter().enumerate() {
            unsafe { _mm256_storeu_ps(out.add((j + q) * ldc + half * LANES), *acc) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::GGML_TYPE_F32;
    use super::*;

    /// Q8_0 blocks of pseudo-random bytes and scales, `rows` × `blocks`: every byte value, or
    /// (`ggml`) those ggml's quantisation of activations makes, ±127; or (`seed` 0) all −128,
    /// and −127 with `ggml`.
    fn blocks(rows: usize, blocks: usize, seed: u64, ggml: bool) -> Vec<u8> {
        let mut x = seed;
        let mut next = || crate::xorshift(&mut x);
        let mut out = Vec::with_capacity(rows * blocks * BLOCK_BYTES);
        for _ in 0..rows * blocks {
            let scale = half::f16::from_f32(0.001 + (next() % 1000) as f32 * 1e-5);
            out.extend_from_slice(&scale.to_le_bytes());
            out.extend((0..QK8_0).map(|_| match (seed, next() as u8) {
                (0, _) => 0x80 + ggml as u8,
                (_, 0x80) if ggml => 0x81,
                (_, byte) => byte,
            }));
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
    fn products_match_the_definition_with_every_instruction_set_this_cpu_runs() {
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|&isa| runs_on(isa)).collect();
        if isas.is_empty() {
            eprintln!("this CPU has no AVX2: the kernel is not used here");
            return;
        }
        // Whisper's shapes (384 and 1536 deep), an odd column count, one to three threads, and
        // the largest products (−128 by −128, or by −127 for AVX2's 16-bit pairs).
        for isa in isas {
            for (m, n, kb, threads, seed) in [
                (16, 2, 1, 1, 1),
                (32, 7, 12, 3, 1),
                (48, 5, 48, 2, 1),
                (64, 33, 12, 1, 1),
                (16, 5, 48, 1, 0),
            ] {
                let a = blocks(m, kb, seed * (1 + m as u64), false);
                // AVX2's pairs of products are exact for activations as ggml makes them.
                let b = blocks(n, kb, seed * (7 + n as u64), isa == Isa::Avx2);
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
                    unsafe { gemm(isa, ith, threads, &p) };
                }
                for j in 0..n {
                    for i in 0..m {
                        let (got, want) = (c[j * ldc + i] as f64, want[j * m + i]);
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{isa:?} {m}×{n}×{kb} ({seed}): C[{j}][{i}] = {got}, by definition {want}"
                        );
                    }
                    // The padding after each column is not written.
                    assert!(c[j * ldc + m..(j + 1) * ldc].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    #[test]
    fn only_8_bit_products_of_whole_panels_are_taken() {
        let q = GGML_TYPE_Q8_0;
        assert!(takes(384, 704, q, GGML_TYPE_F32, GGML_TYPE_F32).is_none());
        assert!(takes(384, 1, q, q, GGML_TYPE_F32).is_none());
        assert!(takes(384, 8, q, q, GGML_TYPE_F32).is_none());
        assert!(takes(51865, 704, q, q, GGML_TYPE_F32).is_none());
        assert_eq!(takes(384, 704, q, q, GGML_TYPE_F32), isa());
    }
}
