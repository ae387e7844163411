//! Silero VAD v5/v6 forward pass in plain Rust (no GStreamer types, no ONNX Runtime).
//!
//! The network is small: an STFT magnitude (the model does it as a strided convolution with a
//! windowed-DFT basis; here an FFT, which is exact for that basis and needs no 264 KB matrix),
//! four 3-tap convolutions with ReLU, one LSTM cell step and a 1×1 output convolution with a
//! sigmoid — about 0.4 M multiply-adds per 32 ms chunk. A general runtime spends much of its
//! time per call on graph dispatch; here every layer is a loop of dot products over contiguous
//! weight rows, each row read once for up to four time steps, with all buffers allocated once.
//! Results match ONNX Runtime to about 1e-6.

use super::weights::{Conv, Weights};
use realfft::num_complex::Complex;
use realfft::{RealFftPlanner, RealToComplex};
use std::sync::Arc;

pub struct Native {
    window: Vec<f32>,
    fft: Arc<dyn RealToComplex<f32>>,
    filter_length: usize,
    bins: usize,
    encoder: Vec<Conv>,
    hidden: usize,
    /// `[weight_ih | weight_hh]` row by row: each gate row is 2 × hidden long.
    lstm: Vec<f32>,
    lstm_bias: Vec<f32>,
    out_weight: Vec<f32>,
    out_bias: f32,
    kernel: Kernel,
    // Scratch, reused between calls.
    frame: Vec<f32>,
    spectrum: Vec<Complex<f32>>,
    fft_scratch: Vec<Complex<f32>>,
    padded: Vec<f32>,
    act: Vec<f32>,
    next: Vec<f32>,
    col: Vec<f32>,
    /// `[x | h]`, the LSTM's input.
    xh: Vec<f32>,
    gates: Vec<f32>,
}

impl Native {
    pub fn new(w: &Weights) -> Self {
        let h = w.hidden;
        let mut lstm = Vec::with_capacity(4 * h * 2 * h);
        for row in 0..4 * h {
            lstm.extend_from_slice(&w.weight_ih[row * h..(row + 1) * h]);
            lstm.extend_from_slice(&w.weight_hh[row * h..(row + 1) * h]);
        }
        let fft = RealFftPlanner::new().plan_fft_forward(w.filter_length);
        Self {
            window: w.window.clone(),
            fft_scratch: vec![Complex::default(); fft.get_scratch_len()],
            fft,
            frame: vec![0.0; w.filter_length],
            spectrum: vec![Complex::default(); w.bins],
            filter_length: w.filter_length,
            bins: w.bins,
            encoder: w.encoder.clone(),
            hidden: h,
            lstm,
            lstm_bias: w.bias.clone(),
            out_weight: w.out_weight.clone(),
            out_bias: w.out_bias,
            kernel: Kernel::best(),
            padded: Vec::new(),
            act: Vec::new(),
            next: Vec::new(),
            col: Vec::new(),
            xh: vec![0.0; 2 * h],
            gates: vec![0.0; 4 * h],
        }
    }

    /// Speech probability of `input` (context + chunk); `state` is `[h; c]`, updated in place.
    pub fn forward(&mut self, input: &[f32], state: &mut [f32]) -> f32 {
        let dot = self.kernel.dot;
        let (fl, bins, h) = (self.filter_length, self.bins, self.hidden);
        let hop = fl / 2;
        let pad = fl / 4;

        // Reflection padding on the right, as the model's Pad node (mode "reflect").
        self.padded.clear();
        self.padded.extend_from_slice(input);
        let n = input.len();
        self.padded
            .extend((1..=pad).map(|j| input[n.saturating_sub(1 + j).min(n - 1)]));

        // STFT magnitude, [bins][frames].
        let frames = (self.padded.len() - fl) / hop + 1;
        self.act.clear();
        self.act.resize(bins * frames, 0.0);
        for t in 0..frames {
            let samples = &self.padded[t * hop..t * hop + fl];
            for ((f, x), w) in self.frame.iter_mut().zip(samples).zip(&self.window) {
                *f = x * w;
            }
            self.fft
                .process_with_scratch(&mut self.frame, &mut self.spectrum, &mut self.fft_scratch)
                .expect("buffer lengths match the plan");
            for (k, z) in self.spectrum.iter().enumerate() {
                // As the model computes it: sqrt(re² + im²) (not hypot, which is slower).
                self.act[k * frames + t] = (z.re * z.re + z.im * z.im).sqrt();
            }
        }

        // Encoder: 3-tap convolutions (padding 1, strides 1, 2, 2, 1), each with ReLU.
        let mut len = frames;
        for (i, conv) in self.encoder.iter().enumerate() {
            let stride = if i == 1 || i == 2 { 2 } else { 1 };
            len = conv3(
                conv,
                stride,
                &self.act,
                len,
                &mut self.next,
                &mut self.col,
                self.kernel,
            );
            std::mem::swap(&mut self.act, &mut self.next);
        }

        // The decoder takes the encoder's single remaining time step.
        for c in 0..h {
            self.xh[c] = self.act[c * len];
        }
        self.xh[h..].copy_from_slice(&state[..h]);
        for (g, (row, b)) in self
            .gates
            .iter_mut()
            .zip(self.lstm.chunks_exact(2 * h).zip(&self.lstm_bias))
        {
            *g = dot(row, &self.xh) + b;
        }
        let (hs, cs) = state.split_at_mut(h);
        let mut out = self.out_bias;
        for j in 0..h {
            let i = sigmoid(self.gates[j]);
            let f = sigmoid(self.gates[h + j]);
            let g = tanh(self.gates[2 * h + j]);
            let o = sigmoid(self.gates[3 * h + j]);
            let c = f * cs[j] + i * g;
            cs[j] = c;
            hs[j] = o * tanh(c);
            out += self.out_weight[j] * hs[j].max(0.0);
        }
        sigmoid(out)
    }
}

/// A 3-tap convolution with padding 1 and ReLU on `[in][len]`, into `out` as `[out][len']`;
/// returns `len'`. Output columns are im2col columns, up to four per pass over the weights.
fn conv3(
    conv: &Conv,
    stride: usize,
    input: &[f32],
    len: usize,
    out: &mut Vec<f32>,
    col: &mut Vec<f32>,
    kernel: Kernel,
) -> usize {
    let k = conv.kernel;
    let out_len = (len + 2 - k) / stride + 1;
    let row = conv.in_channels * k;
    out.clear();
    out.resize(conv.out_channels * out_len, 0.0);
    col.clear();
    col.resize(row * out_len, 0.0);
    for t in 0..out_len {
        for c in 0..conv.in_channels {
            for j in 0..k {
                // Input position t*stride + j - 1 (padding 1).
                let pos = (t * stride + j).wrapping_sub(1);
                col[t * row + c * k + j] = if pos < len { input[c * len + pos] } else { 0.0 };
            }
        }
    }
    let mut acc = [0.0f32; 4];
    for t0 in (0..out_len).step_by(4) {
        let group = (out_len - t0).min(4);
        if group == 1 {
            for o in 0..conv.out_channels {
                let v = (kernel.dot)(
                    &conv.weight[o * row..(o + 1) * row],
                    &col[t0 * row..][..row],
                );
                out[o * out_len + t0] = (v + conv.bias[o]).max(0.0);
            }
            continue;
        }
        let at = |t: usize| &col[(t0 + t.min(group - 1)) * row..][..row];
        let cols = [at(0), at(1), at(2), at(3)];
        for o in 0..conv.out_channels {
            (kernel.dot4)(&conv.weight[o * row..(o + 1) * row], cols, &mut acc);
            for t in 0..group {
                out[o * out_len + t0 + t] = (acc[t] + conv.bias[o]).max(0.0);
            }
        }
    }
    out_len
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// tanh through one `exp` (libm's `tanhf` goes through the slower `expm1f`); within 1e-7 of it.
fn tanh(x: f32) -> f32 {
    // Beyond ±10, tanh is ±1 in f32 and exp(2x) would overflow.
    let x = x.clamp(-10.0, 10.0);
    1.0 - 2.0 / ((2.0 * x).exp() + 1.0)
}

/// Dot products of one weight row with one column, or with four columns at once (the row is
/// read once for all four). The fastest versions this CPU runs, chosen once.
#[derive(Clone, Copy)]
struct Kernel {
    dot: fn(&[f32], &[f32]) -> f32,
    dot4: fn(&[f32], [&[f32]; 4], &mut [f32; 4]),
}

impl Kernel {
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Self {
                // SAFETY: the CPU has AVX2 and FMA (checked just above).
                dot: |a, b| unsafe { dot_avx2(a, b) },
                dot4: |a, c, out| unsafe { dot4_avx2(a, c, out) },
            };
        }
        Self::portable()
    }

    fn portable() -> Self {
        Self {
            dot: dot_portable,
            dot4: |a, cols, out| {
                for (o, c) in out.iter_mut().zip(cols) {
                    *o = dot_portable(a, c);
                }
            },
        }
    }
}

/// Sixteen independent lanes, so the compiler vectorises it with whatever SIMD the target has.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; L];
    let (ac, bc) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for i in 0..L {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// # Safety
/// The CPU must support AVX2 and FMA (checked by [`Kernel::best`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    let (mut s0, mut s1, mut s2, mut s3) = (
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
        _mm256_setzero_ps(),
    );
    // SAFETY: every load reads 8 floats at offsets below `n`, within both slices.
    unsafe {
        while i + 32 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                s1,
            );
            s2 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 16)),
                _mm256_loadu_ps(pb.add(i + 16)),
                s2,
            );
            s3 = _mm256_fmadd_ps(
                _mm256_loadu_ps(pa.add(i + 24)),
                _mm256_loadu_ps(pb.add(i + 24)),
                s3,
            );
            i += 32;
        }
        while i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            i += 8;
        }
    }
    let s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s) };
    let mut sum: f32 = lanes.iter().sum();
    while i < n {
        sum += a[i] * b[i];
        i += 1;
    }
    sum
}

/// # Safety
/// The CPU must support AVX2 and FMA (checked by [`Kernel::best`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot4_avx2(a: &[f32], cols: [&[f32]; 4], out: &mut [f32; 4]) {
    use std::arch::x86_64::*;
    let n = cols.iter().fold(a.len(), |n, c| n.min(c.len()));
    let pa = a.as_ptr();
    let pc = cols.map(|c| c.as_ptr());
    let mut s = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    // SAFETY: every load reads 8 floats at offsets below `n`, within all five slices.
    unsafe {
        while i + 8 <= n {
            let w = _mm256_loadu_ps(pa.add(i));
            for j in 0..4 {
                s[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(pc[j].add(i)), s[j]);
            }
            i += 8;
        }
    }
    for j in 0..4 {
        let mut lanes = [0.0f32; 8];
        // SAFETY: `lanes` holds 8 floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), s[j]) };
        let mut sum: f32 = lanes.iter().sum();
        for k in i..n {
            sum += a[k] * cols[j][k];
        }
        out[j] = sum;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tanh_matches_std() {
        for i in -2000..=2000 {
            let x = i as f32 / 100.0;
            assert!(
                (tanh(x) - x.tanh()).abs() < 2e-7,
                "x={x}: {} vs {}",
                tanh(x),
                x.tanh()
            );
        }
    }

    #[test]
    fn dot_products_agree() {
        let a: Vec<f32> = (0..387)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let b: Vec<f32> = (0..387)
            .map(|i| ((i * 53 % 89) as f32 - 44.0) / 44.0)
            .collect();
        let exact: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        for n in [0, 1, 7, 8, 31, 32, 33, 129, 387] {
            let exact_n: f64 = a[..n]
                .iter()
                .zip(&b[..n])
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum();
            assert!(
                (f64::from(dot_portable(&a[..n], &b[..n])) - exact_n).abs() < 1e-3,
                "n={n}"
            );
            for kernel in [Kernel::best(), Kernel::portable()] {
                let one = (kernel.dot)(&a[..n], &b[..n]);
                assert!((f64::from(one) - exact_n).abs() < 1e-3, "n={n}");
                let mut four = [0.0; 4];
                (kernel.dot4)(&a[..n], [&b[..n]; 4], &mut four);
                for v in four {
                    assert!((f64::from(v) - exact_n).abs() < 1e-3, "n={n}");
                }
            }
        }
        assert!((f64::from(dot_portable(&a, &b)) - exact).abs() < 1e-3);
    }
}
