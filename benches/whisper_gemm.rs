//! whisperstt's matrix-product kernels (`elements/whisper/src/gemm`) on tiny.en's encoder
//! shapes, one thread, with every instruction set this CPU runs: billions of multiply-adds per second,
//! medians of 15 runs after a warm-up. tinyBLAS, which they replace, is measured end to end
//! instead (`VOX_WHISPER_GEMM=tinyblas`, README), since it cannot be called outside ggml's
//! thread pool.

use gstvoxwhisper::gemm::{Isa, Product, f16, q8};
use std::time::Instant;

const RUNS: usize = 15;

/// (what, rows m, columns n, depth k in values) as whisper.cpp asks for them on tiny.en
/// (width 384, six heads of 64, 704 encoder frames: a 14 s window).
const Q8_SHAPES: [(&str, usize, usize, usize); 3] = [
    ("attention projections (q8)", 384, 704, 384),
    ("MLP up (q8)", 1536, 704, 384),
    ("MLP down (q8)", 384, 704, 1536),
];
const F16_SHAPES: [(&str, usize, usize, usize); 2] = [
    ("attention scores, one head (f16)", 704, 704, 64),
    ("attention values, one head (f16)", 64, 704, 704),
];

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Pseudo-random bytes.
fn bytes(count: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Seconds per product, median of [`RUNS`].
fn time(mut run: impl FnMut()) -> f64 {
    run();
    median(
        (0..RUNS)
            .map(|_| {
                let t = Instant::now();
                run();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    println!(
        "\nwhisperstt's matrix kernels, one thread, GMAC/s (billions of multiply-adds per second)"
    );
    println!("| product | m × n × k | AVX-512 | AVX-VNNI | AVX2 |");
    println!("|---|---|---|---|---|");
    for (what, m, n, k) in Q8_SHAPES {
        let kb = k / q8::QK8_0;
        // Q8_0 blocks: an f16 scale (0.01 here: any finite value does) and 32 bytes.
        let block = |v: Vec<u8>| -> Vec<u8> {
            v.chunks(q8::QK8_0)
                .flat_map(|c| {
                    half::f16::from_f32(0.01)
                        .to_le_bytes()
                        .into_iter()
                        .chain(c.iter().copied())
                })
                .collect()
        };
        let (a, b) = (block(bytes(m * k, 1)), block(bytes(n * k, 2)));
        row(what, (m, n, k), kb, &a, &b, q8::runs_on, |isa, p| unsafe {
            q8::gemm(isa, 0, 1, p)
        });
    }
    for (what, m, n, k) in F16_SHAPES {
        let to_f16 = |v: Vec<u8>| -> Vec<u16> {
            v.iter()
                .map(|&x| half::f16::from_f32(x as i8 as f32 / 64.0).to_bits())
                .collect()
        };
        let (a, b) = (to_f16(bytes(m * k, 3)), to_f16(bytes(n * k, 4)));
        row(what, (m, n, k), k, &a, &b, f16::runs_on, |isa, p| unsafe {
            f16::gemm(isa, 0, 1, p)
        });
    }
}

/// Prints one product's row: `m` × `n` × `k` values, `depth` elements of `a` and `b` per row
/// (Q8_0 blocks or f16 values), timed with every instruction set this CPU runs.
fn row<T>(
    what: &str,
    (m, n, k): (usize, usize, usize),
    depth: usize,
    a: &[T],
    b: &[T],
    runs_on: fn(Isa) -> bool,
    gemm: impl Fn(Isa, &Product<T>),
) {
    let mut c = vec![0f32; m * n];
    let p = Product {
        m,
        n,
        k: depth,
        a: a.as_ptr(),
        lda: depth,
        b: b.as_ptr(),
        ldb: depth,
        c: c.as_mut_ptr(),
        ldc: m,
    };
    let cells: Vec<String> = Isa::ALL
        .into_iter()
        .map(|isa| {
            if runs_on(isa) {
                let seconds = time(|| gemm(isa, &p));
                format!("{:.0}", (m * n * k) as f64 / seconds / 1e9)
            } else {
                "—".into()
            }
        })
        .collect();
    println!("| {what} | {m} × {n} × {k} | {} |", cells.join(" | "));
}
