//! ONNX's `STFT` of a real signal, one-sided, as an ONNX Runtime custom operator,
//! `ai.vox.Stft` (no GStreamer types). Kokoro's generator takes the STFT of its harmonic source
//! with a 20-point Hann window every 5 samples, ~5,000 frames per second of speech; ONNX
//! Runtime's `STFT` spends ~5% of a synthesis on it. Here each frame is 11 dot products with a
//! table of cosines and sines, blocks of frames shared among ONNX Runtime's threads.
//! [`crate::rewrite`] puts it in the graph in place of an `STFT` node with `onesided = 1`.

use crate::snake::Out;
use ort::operator::{
    BoxedKernel, ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

pub const NAME: &str = "Stft";

/// The one-sided spectra of the frames of `signal` (`frame_step` apart, `window.len()` long)
/// into `out` (frames × bins × [re, im], bins = len/2 + 1), from `first_frame` on, with `table`
/// (`Table::new(window.len())`).
pub fn spectra(
    table: &Table,
    signal: &[f32],
    frame_step: usize,
    window: &[f32],
    first_frame: usize,
    out: &mut [f32],
) {
    let n = window.len();
    let bins = n / 2 + 1;
    let mut frame = vec![0.0f32; n];
    for (f, spectrum) in out.chunks_exact_mut(2 * bins).enumerate() {
        let start = (first_frame + f) * frame_step;
        for ((x, s), w) in frame.iter_mut().zip(&signal[start..start + n]).zip(window) {
            *x = s * w;
        }
        table.transform(&frame, spectrum);
    }
}

/// cos(2πkn/N) and sin(2πkn/N) for each bin k and sample n, made once per transform.
pub struct Table {
    cos: Vec<f32>,
    sin: Vec<f32>,
    n: usize,
}

impl Table {
    pub fn new(n: usize) -> Self {
        let bins = n / 2 + 1;
        let angle = |k: usize, i: usize| {
            // k·i mod N keeps the angle small, so that f64 gives every entry to the last bit.
            2.0 * std::f64::consts::PI * ((k * i) % n) as f64 / n as f64
        };
        let cos = (0..bins)
            .flat_map(|k| (0..n).map(move |i| angle(k, i).cos() as f32))
            .collect();
        let sin = (0..bins)
            .flat_map(|k| (0..n).map(move |i| angle(k, i).sin() as f32))
            .collect();
        Self { cos, sin, n }
    }

    /// X[k] = Σ x[i]·e^(-2πjki/N) for the one-sided bins, as [re, im] pairs.
    fn transform(&self, x: &[f32], out: &mut [f32]) {
        for (k, bin) in out.chunks_exact_mut(2).enumerate() {
            let (c, s) = (
                &self.cos[k * self.n..(k + 1) * self.n],
                &self.sin[k * self.n..(k + 1) * self.n],
            );
            let (mut re, mut im) = (0.0f32, 0.0f32);
            for i in 0..self.n {
                re += x[i] * c[i];
                im -= x[i] * s[i];
            }
            bin[0] = re;
            bin[1] = im;
        }
    }
}

pub(crate) struct StftOperator;

impl Operator for StftOperator {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        NAME
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Int64),
            OperatorInput::required(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        Ok(Box::new(StftKernel))
    }
}

struct StftKernel;

/// Frames per task.
const BLOCK: usize = 256;

impl Kernel for StftKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let input = |i| {
            ctx.input(i)?
                .ok_or_else(|| ort::Error::new(format!("{NAME}: input {i} missing")))
        };
        let (signal, step, window) = (input(0)?, input(1)?, input(2)?);
        let (shape, signal) = signal.try_extract_tensor::<f32>()?;
        let (_, step) = step.try_extract_tensor::<i64>()?;
        let (_, window) = window.try_extract_tensor::<f32>()?;
        let n = window.len();
        let step = step.first().copied().unwrap_or(0);
        // [batch, length] or [batch, length, 1]: a real signal.
        let real = shape.len() == 2 || (shape.len() == 3 && shape[2] == 1);
        if !real || n == 0 || step <= 0 {
            return Err(ort::Error::new(format!(
                "{NAME}: signal {shape:?}, window of {n}, step {step}: a real signal, a window \
                 and a positive step are needed"
            )));
        }
        let (batch, length, step) = (shape[0] as usize, shape[1] as usize, step as usize);
        let frames = if length < n {
            0
        } else {
            (length - n) / step + 1
        };
        let bins = n / 2 + 1;
        let mut out = ctx
            .output(0, vec![batch as i64, frames as i64, bins as i64, 2])?
            .ok_or_else(|| ort::Error::new(format!("{NAME}: no output")))?;
        let (_, y) = out.try_extract_tensor_mut::<f32>()?;
        let per_frame = 2 * bins;
        let out = Out::new(y);
        let blocks = frames.div_ceil(BLOCK);
        let table = Table::new(n);
        ctx.par_for(batch * blocks, 0, |task| {
            let (b, block) = (task / blocks, task % blocks);
            let first = block * BLOCK;
            let count = BLOCK.min(frames - first);
            let offset = (b * frames + first) * per_frame;
            // SAFETY: the frames [first, first + count) of batch b lie within the output
            // (batch × frames × per_frame floats), and no other task writes them.
            let y = unsafe { std::slice::from_raw_parts_mut(out.at(offset), count * per_frame) };
            let signal = &signal[b * length..(b + 1) * length];
            spectra(&table, signal, step, window, first, y);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_of_a_cosine_has_its_energy_in_its_bin() {
        // 20 samples, a cosine of 3 cycles: X[3] = N/2 (a rectangular window), the rest ~0.
        let n = 20;
        let signal: Vec<f32> = (0..n)
            .map(|i| (2.0 * std::f32::consts::PI * 3.0 * i as f32 / n as f32).cos())
            .collect();
        let window = vec![1.0f32; n];
        let mut out = vec![0.0f32; 2 * (n / 2 + 1)];
        spectra(&Table::new(window.len()), &signal, 5, &window, 0, &mut out);
        for k in 0..=n / 2 {
            let (re, im) = (out[2 * k], out[2 * k + 1]);
            let want = if k == 3 { 10.0 } else { 0.0 };
            assert!(
                (re - want).abs() < 1e-4 && im.abs() < 1e-4,
                "bin {k}: {re} {im}"
            );
        }
    }

    #[test]
    fn spectra_match_a_double_precision_dft() {
        let (n, step) = (20, 5);
        let signal: Vec<f32> = (0..403)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let window: Vec<f32> = (0..n)
            .map(|i| (0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos()) as f32)
            .collect();
        let (frames, bins) = ((signal.len() - n) / step + 1, n / 2 + 1);
        let mut out = vec![0.0f32; frames * bins * 2];
        // From frame 3 on, as a task of the operator would.
        spectra(
            &Table::new(n),
            &signal,
            step,
            &window,
            3,
            &mut out[3 * bins * 2..],
        );
        let mut worst = 0.0f64;
        for f in 3..frames {
            for k in 0..bins {
                let (mut re, mut im) = (0.0f64, 0.0f64);
                for i in 0..n {
                    let x = signal[f * step + i] as f64 * window[i] as f64;
                    let a = 2.0 * std::f64::consts::PI * (k * i) as f64 / n as f64;
                    re += x * a.cos();
                    im -= x * a.sin();
                }
                let got = &out[(f * bins + k) * 2..][..2];
                worst = worst
                    .max((got[0] as f64 - re).abs())
                    .max((got[1] as f64 - im).abs());
            }
        }
        assert!(worst < 1e-5, "worst difference {worst:e}");
    }

    #[test]
    fn frames_step_through_the_signal() {
        // Frame f starts at f × step: with a window picking the first sample only, bin 0 of
        // frame f is the signal at f × step.
        let signal: Vec<f32> = (0..40).map(|i| i as f32).collect();
        let mut window = vec![0.0f32; 8];
        window[0] = 1.0;
        let frames = (40 - 8) / 5 + 1;
        let mut out = vec![0.0f32; frames * 2 * 5];
        spectra(&Table::new(window.len()), &signal, 5, &window, 0, &mut out);
        for f in 0..frames {
            assert_eq!(out[f * 10], (f * 5) as f32);
        }
    }
}
