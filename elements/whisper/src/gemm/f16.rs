//! f16 by f16 matrix products, summed in f32, on CPUs with AVX-512 or AVX2: attention's scores
//! (keys by queries) and their weighted values in whisper.cpp's encoder, and the f16 model's
//! linear layers.
//!
//! tinyBLAS computes these as dot products, converting both operands from f16 at every step.
//! Here a job's sixteen-row panels of A (up to four) are converted once into f32 (register
//! order: one register holds one step of sixteen rows), eight columns of B at a time are
//! converted once per job (so again for each tile of panels), and each step is a multiply-add of a panel register by a column's broadcast
//! value, two panels and eight columns (sixteen sums) at once; with AVX2, one panel's two halves
//! (eight rows each) and four columns (eight sums) at once. The arithmetic is tinyBLAS's: f16
//! values widened to f32 and summed in f32, here in sums of 64 steps added together (one running
//! sum of 704 changed a borderline word of a test sentence: "walked" became "walk").
//!
//! [`gemm`]: C\[j·ldc + i\] = Σ over l of A\[i·lda + l\]·B\[j·ldb + l\], for rows i < m and
//! columns j < n; the jobs (up to four panels by up to 64 columns) are split among
//! whisper.cpp's threads.

use super::{GGML_TYPE_F16, GGML_TYPE_F32, Isa, Product, ROWS};

/// Columns of B converted and multiplied together.
const COLS: usize = 8;

/// Whether this CPU runs the kernel with these instructions (it has no AVX-VNNI form: AVX-VNNI
/// CPUs run [`Isa::Avx2`]'s).
pub fn runs_on(isa: Isa) -> bool {
    isa != Isa::AvxVnni && isa.on_cpu()
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
        Isa::Avx512 => "AVX-512",
        Isa::AvxVnni | Isa::Avx2 => "AVX2",
    }
}

/// What the plugin logs the first time the kernel takes a product with these instructions.
pub fn line(isa: Isa) -> String {
    format!(
        "whisper.cpp's f16 matrix products run on our {} kernel",
        name(isa)
    )
}

/// Whether [`gemm`] takes a product of these shapes and types, and with which instructions
/// (else tinyBLAS does it).
pub fn takes(m: i64, n: i64, k: i64, a_type: i32, b_type: i32, c_type: i32) -> Option<Isa> {
    let fits = a_type == GGML_TYPE_F16
        && b_type == GGML_TYPE_F16
        && c_type == GGML_TYPE_F32
        && super::fits(m, n)
        // The panels' gather indexes rows k apart in 32 bits.
        && k < (i32::MAX / ROWS as i32) as i64
        // (tinyBLAS writes zeros for an empty sum; not a product Whisper asks for.)
        && k > 0;
    isa().filter(|_| fits)
}

/// Thread `ith` of `nth`'s share of the product `p` (see the module): rows `m` (a multiple of
/// [`ROWS`]) by columns `n`, `k` deep.
///
/// # Safety
/// `p.a` holds `m` rows of `lda` ≥ `k` values, `p.b` holds `n` rows of `ldb` ≥ `k` values,
/// `p.c` holds `n` columns of `ldc` ≥ `m` floats, and [`runs_on`] `isa`.
pub unsafe fn gemm(isa: Isa, ith: usize, nth: usize, p: &Product<u16>) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        match isa {
            Isa::Avx512 => x86::gemm::<x86::Avx512>(ith, nth, p),
            Isa::AvxVnni | Isa::Avx2 => x86::gemm::<x86::Avx2>(ith, nth, p),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{isa:?} {ith} {nth} {p:?}")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{COLS, Product, ROWS};
    use std::arch::x86_64::*;
    use std::cell::RefCell;
    use std::ops::Range;

    /// A job: up to this many panels of A (converted once) by up to this many columns of B.
    const TILE_PANELS: usize = 4;
    const TILE_COLS: usize = 64;
    /// Steps summed in registers before they are added to the output: sums of 64 products
    /// added together, not one running sum of all `k` (704 for Whisper's weighted values).
    const CHUNK: usize = 64;

    #[derive(Default)]
    struct Scratch {
        /// One panel's rows in f32, row by row, on the way to `panels`.
        rows: Vec<f32>,
        /// A job's panels in f32, register order: panel p's step l is
        /// `panels[(p·k + l)·16..][..16]`.
        panels: Vec<f32>,
        /// Up to [`COLS`] columns of B in f32, `k` apart.
        cols: Vec<f32>,
    }

    thread_local! {
        static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    }

    /// One register width's multiply-adds (the jobs, their order and the conversions are
    /// [`gemm`]'s).
    pub trait Width {
        /// One or two `panels` (register order) times `n` ≤ [`COLS`] columns (`k` apart in
        /// `cols`) over `steps`: stored to `out` (column q at `q·ldc`, the second panel sixteen
        /// rows on), or added to what is there (`add`).
        #[allow(clippy::too_many_arguments)]
        unsafe fn tile(
            panels: &[*const f32],
            cols: &[f32],
            n: usize,
            k: usize,
            steps: Range<usize>,
            out: *mut f32,
            ldc: usize,
            add: bool,
        );
    }

    pub unsafe fn gemm<W: Width>(ith: usize, nth: usize, p: &Product<u16>) {
        let Product {
            m,
            n,
            k,
            a,
            lda,
            b,
            ldb,
            c,
            ldc,
        } = *p;
        let panels = m / ROWS;
        let column_tiles = n.div_ceil(TILE_COLS);
        let jobs = panels.div_ceil(TILE_PANELS) * column_tiles;
        // Jobs go panel tile by panel tile, so a thread's consecutive jobs share panels.
        let (j0, j1) = crate::threads::share(jobs, 1, ith, nth);
        if j0 == j1 {
            return;
        }
        SCRATCH.with_borrow_mut(|s| unsafe {
            s.rows.resize(ROWS * k, 0.0);
            s.panels.resize(TILE_PANELS * ROWS * k, 0.0);
            s.cols.resize(COLS * k, 0.0);
            let mut converted = usize::MAX;
            for job in j0..j1 {
                let (tile, column_tile) = (job / column_tiles, job % column_tiles);
                let p0 = tile * TILE_PANELS;
                let count = (panels - p0).min(TILE_PANELS);
                if converted != tile {
                    for q in 0..count {
                        avx2::widen_rows(&mut s.rows, a.add((p0 + q) * ROWS * lda), lda, ROWS, k);
                        avx2::transpose(&s.rows, &mut s.panels[q * ROWS * k..][..ROWS * k], k);
                    }
                    converted = tile;
                }
                let (c0, c1) = (
                    column_tile * TILE_COLS,
                    ((column_tile + 1) * TILE_COLS).min(n),
                );
                let mut j = c0;
                while j < c1 {
                    let cols = (c1 - j).min(COLS);
                    avx2::widen_rows(&mut s.cols, b.add(j * ldb), ldb, cols, k);
                    let mut q = 0;
                    while q < count {
                        let two = (count - q).min(2);
                        let panel = s.panels.as_ptr().add(q * ROWS * k);
                        let pair = [panel, panel.add(ROWS * k)];
                        let out = c.add(j * ldc + (p0 + q) * ROWS);
                        for l0 in (0..k).step_by(CHUNK) {
                            let steps = l0..(l0 + CHUNK).min(k);
                            W::tile(&pair[..two], &s.cols, cols, k, steps, out, ldc, l0 > 0);
                        }
                        q += two;
                    }
                    j += cols;
                }
            }
        })
    }

    /// 512-bit registers: one holds a step of a panel; two panels by eight columns at once.
    pub struct Avx512;

    impl Width for Avx512 {
        unsafe fn tile(
            panels: &[*const f32],
            cols: &[f32],
            n: usize,
            k: usize,
            steps: Range<usize>,
            out: *mut f32,
            ldc: usize,
            add: bool,
        ) {
            use avx512::run;
            let pair = [panels[0], panels[panels.len() - 1]];
            unsafe {
                match (n, panels.len()) {
                    (COLS, 2) => run::<COLS, 2>(pair, cols, k, steps, out, ldc, add),
                    (COLS, _) => run::<COLS, 1>(pair, cols, k, steps, out, ldc, add),
                    _ => {
                        for q in 0..n {
                            let (one, out) = (&cols[q * k..][..k], out.add(q * ldc));
                            let steps = steps.clone();
                            if panels.len() == 2 {
                                run::<1, 2>(pair, one, k, steps, out, ldc, add);
                            } else {
                                run::<1, 1>(pair, one, k, steps, out, ldc, add);
                            }
                        }
                    }
                }
            }
        }
    }

    /// 256-bit registers: a step of a panel is two, for its halves of eight rows; a panel's two
    /// halves by four columns at once (eight sums of sixteen registers).
    pub struct Avx2;

    impl Width for Avx2 {
        unsafe fn tile(
            panels: &[*const f32],
            cols: &[f32],
            n: usize,
            k: usize,
            steps: Range<usize>,
            out: *mut f32,
            ldc: usize,
            add: bool,
        ) {
            use avx2::{LANES, run};
            for (p, &panel) in panels.iter().enumerate() {
                let halves = unsafe { [panel, panel.add(LANES)] };
                let out = unsafe { out.add(p * ROWS) };
                let mut q = 0;
                while q < n {
                    let (cols, out) = (&cols[q * k..], unsafe { out.add(q * ldc) });
                    let steps = steps.clone();
                    if q + 4 <= n {
                        unsafe { run::<4>(halves, cols, k, steps, out, ldc, add) };
                        q += 4;
                    } else {
                        unsafe { run::<1>(halves, cols, k, steps, out, ldc, add) };
                        q += 1;
                    }
                }
            }
        }
    }

    mod avx512 {
        use super::*;

        /// `P` panels times `C` columns (see [`Width::tile`]): multiply-adds into `P`·`C`
        /// registers.
        #[target_feature(enable = "avx512f")]
        // Column q's value at step l is cols[q·k + l]: q indexes it and the sums.
        #[allow(clippy::needless_range_loop)]
        pub unsafe fn run<const C: usize, const P: usize>(
            panels: [*const f32; 2],
            cols: &[f32],
            k: usize,
            steps: Range<usize>,
            out: *mut f32,
            ldc: usize,
            add: bool,
        ) {
            assert!(steps.end <= k && cols.len() >= (C - 1) * k + steps.end);
            let mut acc = [[_mm512_setzero_ps(); C]; P];
            for l in steps {
                let mut w = [_mm512_setzero_ps(); P];
                for (p, w) in w.iter_mut().enumerate() {
                    *w = unsafe { _mm512_loadu_ps(panels[p].add(l * ROWS)) };
                }
                for q in 0..C {
                    // SAFETY: checked above.
                    let x = _mm512_set1_ps(unsafe { *cols.get_unchecked(q * k + l) });
                    for p in 0..P {
                        acc[p][q] = _mm512_fmadd_ps(w[p], x, acc[p][q]);
                    }
                }
            }
            for (p, acc) in acc.iter().enumerate() {
                for (q, acc) in acc.iter().enumerate() {
                    unsafe {
                        let at = out.add(q * ldc + p * ROWS);
                        let sum = if add {
                            _mm512_add_ps(_mm512_loadu_ps(at), *acc)
                        } else {
                            *acc
                        };
                        _mm512_storeu_ps(at, sum);
                    }
                }
            }
        }
    }

    mod avx2 {
        use super::*;

        /// Rows per 256-bit register: half a panel.
        pub const LANES: usize = ROWS / 2;

        /// `rows` f16 rows of `k` values, `ld` apart, into f32 rows `k` apart in `out` (for
        /// both widths: every AVX-512 CPU has AVX2 and F16C, and this is a small part of the
        /// work).
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn widen_rows(
            out: &mut [f32],
            src: *const u16,
            ld: usize,
            rows: usize,
            k: usize,
        ) {
            for r in 0..rows {
                let row = unsafe { src.add(r * ld) };
                let dst = &mut out[r * k..][..k];
                let mut l = 0;
                while l + 8 <= k {
                    unsafe {
                        let h = _mm_loadu_si128(row.add(l) as *const __m128i);
                        _mm256_storeu_ps(dst.as_mut_ptr().add(l), _mm256_cvtph_ps(h));
                    }
                    l += 8;
                }
                for (l, d) in dst.iter_mut().enumerate().skip(l) {
                    *d = half::f16::from_bits(unsafe { *row.add(l) }).to_f32();
                }
            }
        }

        /// Sixteen f32 rows of `k` (`rows`, row by row) into register order: step l's sixteen
        /// values together (for both widths).
        #[target_feature(enable = "avx2,fma,f16c")]
        pub unsafe fn transpose(rows: &[f32], panel: &mut [f32], k: usize) {
            let index = _mm256_mullo_epi32(
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                _mm256_set1_epi32(k as i32),
            );
            let second = unsafe { rows.as_ptr().add(LANES * k) };
            for l in 0..k {
                unsafe {
                    let lo = _mm256_i32gather_ps::<4>(rows.as_ptr().add(l), index);
                    let hi = _mm256_i32gather_ps::<4>(second.add(l), index);
                    _mm256_storeu_ps(panel.as_mut_ptr().add(l * ROWS), lo);
                    _mm256_storeu_ps(panel.as_mut_ptr().add(l * ROWS + LANES), hi);
                }
            }
        }

        /// A panel's two `halves` times `C` columns (see [`Width::tile`]): multiply-adds into
        /// 2·`C` registers.
        #[target_feature(enable = "avx2,fma,f16c")]
        // Column q's value at step l is cols[q·k + l]: q indexes it and the sums.
        #[allow(clippy::needless_range_loop)]
        pub unsafe fn run<const C: usize>(
            halves: [*const f32; 2],
            cols: &[f32],
            k: usize,
            steps: Range<usize>,
            out: *mut f32,
            ldc: usize,
            add: bool,
        ) {
            assert!(steps.end <= k && cols.len() >= (C - 1) * k + steps.end);
            let mut acc = [[_mm256_setzero_ps(); C]; 2];
            for l in steps {
                let w = unsafe {
                    [
                        _mm256_loadu_ps(halves[0].add(l * ROWS)),
                        _mm256_loadu_ps(halves[1].add(l * ROWS)),
                    ]
                };
                for q in 0..C {
                    // SAFETY: checked above.
                    let x = _mm256_set1_ps(unsafe { *cols.get_unchecked(q * k + l) });
                    for h in 0..2 {
                        acc[h][q] = _mm256_fmadd_ps(w[h], x, acc[h][q]);
                    }
                }
            }
            for (h, acc) in acc.iter().enumerate() {
                for (q, acc) in acc.iter().enumerate() {
                    unsafe {
                        let at = out.add(q * ldc + h * LANES);
                        let sum = if add {
                            _mm256_add_ps(_mm256_loadu_ps(at), *acc)
                        } else {
                            *acc
                        };
                        _mm256_storeu_ps(at, sum);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f16 values in [-4, 4), `count` of them.
    fn values(count: usize, seed: u64) -> Vec<u16> {
        let mut x = seed;
        (0..count)
            .map(|_| {
                let x = crate::xorshift(&mut x);
                half::f16::from_f32((x % 8000) as f32 / 1000.0 - 4.0).to_bits()
            })
            .collect()
    }

    #[test]
    fn products_match_the_definition_with_every_instruction_set_this_cpu_runs() {
        let isas: Vec<Isa> = Isa::ALL.into_iter().filter(|&isa| runs_on(isa)).collect();
        if isas.is_empty() {
            eprintln!("this CPU has no AVX-512 or AVX2: the kernel is not used here");
            return;
        }
        let f = |h: u16| half::f16::from_bits(h).to_f32() as f64;
        // Whisper's shapes (scores 64 deep with A's rows 384 apart; values 704 deep), odd
        // column and panel counts, a depth that is not a multiple of 16, one to three threads.
        for isa in isas {
            for (m, n, k, lda, threads) in [
                (64, 13, 64, 384, 1),
                (48, 9, 40, 40, 2),
                (32, 20, 704, 704, 3),
                (16, 2, 7, 9, 1),
                // Two panel tiles (the second of two panels) by two column tiles, the second short.
                (96, 70, 24, 24, 3),
            ] {
                let a = values(m * lda, 3 + m as u64);
                let ldb = k + 5;
                let b = values(n * ldb, 11 + n as u64);
                let ldc = m + 3;
                let mut c = vec![f32::NAN; n * ldc];
                for ith in 0..threads {
                    let p = Product {
                        m,
                        n,
                        k,
                        a: a.as_ptr(),
                        lda,
                        b: b.as_ptr(),
                        ldb,
                        c: c.as_mut_ptr(),
                        ldc,
                    };
                    unsafe { gemm(isa, ith, threads, &p) };
                }
                for j in 0..n {
                    for i in 0..m {
                        let want: f64 = (0..k).map(|l| f(a[i * lda + l]) * f(b[j * ldb + l])).sum();
                        let got = c[j * ldc + i] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (k as f64) * 16.0,
                            "{isa:?} {m}×{n}×{k}: C[{j}][{i}] = {got}, by definition {want}"
                        );
                    }
                    assert!(c[j * ldc + m..(j + 1) * ldc].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    #[test]
    fn only_f16_products_of_whole_panels_are_taken() {
        let h = GGML_TYPE_F16;
        assert!(takes(704, 704, 64, h, GGML_TYPE_F32, GGML_TYPE_F32).is_none());
        assert!(takes(704, 1, 64, h, h, GGML_TYPE_F32).is_none());
        assert!(takes(704, 8, 64, h, h, GGML_TYPE_F32).is_none());
        assert!(takes(9, 16, 64, h, h, GGML_TYPE_F32).is_none());
        assert_eq!(takes(704, 704, 64, h, h, GGML_TYPE_F32), isa());
    }
}
