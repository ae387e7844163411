//! The Snake activation, `y = x + inverse × sin²(alpha × x)` with one `alpha` and `inverse`
//! (1/alpha) per channel, as one ONNX Runtime custom operator, `ai.vox.Snake` (no GStreamer
//! types). Kokoro's generator applies it 48 times, to its largest tensors; exported, each is
//! five operators and five passes over memory, and ONNX Runtime's `Sin` is scalar. Here it is
//! one pass, the sine a polynomial the compiler vectorises, the channels shared among ONNX
//! Runtime's threads. [`crate::rewrite`] puts it in the graph. Where an adaptive instance
//! normalisation (`scale × (x - mean) / sqrt(variance + eps) + shift` over time, nine more
//! operators and passes) comes before it, `ai.vox.AdaInSnake` does both: two passes to
//! measure, one to write.

use ort::operator::{
    BoxedKernel, ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

pub const NAME: &str = "Snake";
/// The same after an adaptive instance normalisation: `ai.vox.AdaInSnake`.
pub const NORM_NAME: &str = "AdaInSnake";

/// sin²(y). The argument is reduced to r in [-π/2, π/2] with y = r + kπ (π in three parts, so
/// that kπ is exact for |k| < 2¹⁶), where sin²(y) = sin²(r) and sin(r) is its Taylor polynomial
/// to r¹¹ (error below 6e-8). Beyond |y| = 1.2e7, where a float's step is a whole period, y is
/// held at that bound. No branches, so that it vectorises.
#[inline(always)]
fn sin2(y: f32) -> f32 {
    const PI_A: f32 = 3.140625;
    const PI_B: f32 = 9.675_026e-4;
    const PI_C: f32 = 1.509_958e-7;
    // Adding and taking away 1.5 × 2²³ rounds a float below 2²² to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let y = y.clamp(-1.2e7, 1.2e7);
    let k = (y * std::f32::consts::FRAC_1_PI + ROUND) - ROUND;
    let r = ((y - k * PI_A) - k * PI_B) - k * PI_C;
    let r2 = r * r;
    let p = -1.0 / 39_916_800.0;
    let p = p * r2 + 1.0 / 362_880.0;
    let p = p * r2 - 1.0 / 5_040.0;
    let p = p * r2 + 1.0 / 120.0;
    let p = p * r2 - 1.0 / 6.0;
    let s = r + r * r2 * p;
    s * s
}

#[inline(always)]
fn row(x: &[f32], alpha: f32, inverse: f32, y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x + inverse * sin2(alpha * x);
    }
}

/// Σ f(x) in sixteen lanes, so that the compiler vectorises it.
#[inline(always)]
fn sum(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    const L: usize = 16;
    let mut acc = [0.0f32; L];
    let chunks = x.chunks_exact(L);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for i in 0..L {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The parameters of one channel's normalisation and activation.
#[derive(Clone, Copy)]
pub struct Channel {
    pub scale: f32,
    pub shift: f32,
    pub eps: f32,
    pub alpha: f32,
    pub inverse: f32,
}

#[inline(always)]
fn norm_row(x: &[f32], p: Channel, y: &mut [f32]) {
    let n = x.len().max(1) as f32;
    let mean = sum(x, |v| v) / n;
    let variance = sum(x, |v| (v - mean) * (v - mean)) / n;
    let deviation = (variance + p.eps).sqrt();
    for (y, &x) in y.iter_mut().zip(x) {
        let v = p.scale * ((x - mean) / deviation) + p.shift;
        *y = v + p.inverse * sin2(p.alpha * v);
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(x: &[f32], alpha: f32, inverse: f32, y: &mut [f32]) {
    row(x, alpha, inverse, y)
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn norm_row_avx2(x: &[f32], p: Channel, y: &mut [f32]) {
    norm_row(x, p, y)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The activation of one channel's `x` into `y`, with the widest vectors this CPU has.
pub fn activate(x: &[f32], alpha: f32, inverse: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { row_avx2(x, alpha, inverse, y) };
    }
    row(x, alpha, inverse, y)
}

/// One channel's `x` normalised over its length, then activated, into `y`.
pub fn normalise_activate(x: &[f32], p: Channel, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { norm_row_avx2(x, p, y) };
    }
    norm_row(x, p, y)
}

pub(crate) struct SnakeOperator;

/// `ai.vox.Snake(x, alpha, inverse)`.
impl Operator for SnakeOperator {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        NAME
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        (0..3).map(|_| OperatorInput::required(TensorElementType::Float32))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        Ok(Box::new(SnakeKernel { norm: false }))
    }
}

pub(crate) struct NormSnakeOperator;

/// `ai.vox.AdaInSnake(x, scale, shift, eps, alpha, inverse)`.
impl Operator for NormSnakeOperator {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        NORM_NAME
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        (0..6).map(|_| OperatorInput::required(TensorElementType::Float32))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        Ok(Box::new(SnakeKernel { norm: true }))
    }
}

struct SnakeKernel {
    /// With the normalisation (`AdaInSnake`).
    norm: bool,
}

/// An operator's output, written by ONNX Runtime's threads (`par_for`), each task its own
/// disjoint range of it.
pub(crate) struct Out<T = f32>(*mut T);
// SAFETY: the tasks write disjoint ranges of the buffer, and `par_for` returns after them all.
unsafe impl<T> Send for Out<T> {}
unsafe impl<T> Sync for Out<T> {}

impl<T> Out<T> {
    pub(crate) fn new(buffer: &mut [T]) -> Self {
        Self(buffer.as_mut_ptr())
    }

    /// The address at `offset` (a method, so that closures capture the whole `Out`).
    pub(crate) fn at(&self, offset: usize) -> *mut T {
        self.0.wrapping_add(offset)
    }
}

/// Runs `f(first, items)` on ONNX Runtime's threads over `out` cut into items of `len` values,
/// `per_task` items to a task: each task gets its own items, `first..first + items.len() / len`.
pub(crate) fn par_items<T>(
    ctx: &ComputeContext,
    out: &mut [T],
    len: usize,
    per_task: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) -> ort::Result<()> {
    let items = out.len().checked_div(len).unwrap_or(0);
    if items == 0 {
        return Ok(());
    }
    let out = Out::new(out);
    ctx.par_for(items.div_ceil(per_task), 0, |task| {
        let first = task * per_task;
        let count = per_task.min(items - first);
        // SAFETY: items [first, first + count) lie within `out` (items × len values), and no
        // other task writes them.
        let y = unsafe { std::slice::from_raw_parts_mut(out.at(first * len), count * len) };
        f(first, y)
    })
}

impl Kernel for SnakeKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let name = if self.norm { NORM_NAME } else { NAME };
        let error = |what: String| ort::Error::new(format!("{name}: {what}"));
        let inputs = (0..if self.norm { 6 } else { 3 })
            .map(|i| {
                ctx.input(i)?
                    .ok_or_else(|| error(format!("input {i} missing")))
            })
            .collect::<ort::Result<Vec<_>>>()?;
        let (shape, x) = inputs[0].try_extract_tensor::<f32>()?;
        let values = |i: usize| inputs[i].try_extract_tensor::<f32>().map(|(_, v)| v);
        let (alpha, inverse) = if self.norm {
            (values(4)?, values(5)?)
        } else {
            (values(1)?, values(2)?)
        };
        let channels = alpha.len();
        // The normalisation is over the last axis of [batch, channels, time].
        let rank_fits = if self.norm {
            shape.len() == 3
        } else {
            shape.len() >= 2
        };
        if !rank_fits || shape[1] as usize != channels || inverse.len() != channels {
            return Err(error(format!(
                "x {shape:?} with {channels} alphas and {} inverses",
                inverse.len()
            )));
        }
        // Rows are (batch, channel) pairs, each `len` contiguous values.
        let len: usize = shape[2..].iter().map(|&d| d.max(0) as usize).product();
        let rows = x.len() / len.max(1);
        let (scale, shift, eps) = if self.norm {
            (values(1)?, values(2)?, values(3)?)
        } else {
            (&[1.0f32][..], &[0.0f32][..], &[0.0f32][..])
        };
        // A scale or shift per row (batch and channel), per channel, or one for all.
        let per_row = |v: &[f32]| v.len() == 1 || v.len() == channels || v.len() == rows;
        if !per_row(scale) || !per_row(shift) || eps.len() != 1 {
            return Err(error(format!(
                "x {shape:?} with {} scales, {} shifts and {} eps",
                scale.len(),
                shift.len(),
                eps.len()
            )));
        }
        let pick = |v: &[f32], r: usize| match v.len() {
            1 => v[0],
            n if n == rows => v[r],
            _ => v[r % channels],
        };
        let mut out = ctx
            .output(0, shape.to_vec())?
            .ok_or_else(|| error("no output".into()))?;
        let (_, y) = out.try_extract_tensor_mut::<f32>()?;
        if y.len() != x.len() {
            return Err(error("output of the wrong size".into()));
        }
        let norm = self.norm;
        par_items(ctx, y, len, 1, |r, y| {
            let c = r % channels;
            let range = r * len..(r + 1) * len;
            if norm {
                let p = Channel {
                    scale: pick(scale, r),
                    shift: pick(shift, r),
                    eps: eps[0],
                    alpha: alpha[c],
                    inverse: inverse[c],
                };
                normalise_activate(&x[range], p, y);
            } else {
                activate(&x[range], alpha[c], inverse[c], y);
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sine_squared_matches_the_library_sine() {
        let mut worst = 0.0f64;
        for i in -200_000..=200_000 {
            let y = i as f32 * 1e-3 * std::f32::consts::PI;
            let exact = (y as f64).sin().powi(2);
            worst = worst.max((sin2(y) as f64 - exact).abs());
        }
        assert!(worst < 1e-6, "worst error {worst:e} on [-200π, 200π]");
        // Far out, still a sine squared: within [0, 1].
        for y in [1e5f32, -3.3e6, 1e9, f32::MAX] {
            let s = sin2(y);
            assert!((0.0..=1.01).contains(&s), "sin²({y}) = {s}");
        }
    }

    #[test]
    fn a_normalised_row_is_the_snake_of_its_standard_scores() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 * 0.1 - 3.0)
            .collect();
        let p = Channel {
            scale: 1.3,
            shift: -0.2,
            eps: 1e-5,
            alpha: 0.8,
            inverse: 1.25,
        };
        let mut y = vec![0.0; x.len()];
        normalise_activate(&x, p, &mut y);
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        for (x, y) in x.iter().zip(&y) {
            let v = 1.3 * (*x as f64 - mean) / (var + 1e-5).sqrt() - 0.2;
            let exact = v + 1.25 * (0.8 * v).sin().powi(2);
            assert!((*y as f64 - exact).abs() < 1e-4, "{x} → {y}, not {exact}");
        }
    }

    #[test]
    fn one_row_is_the_snake_of_each_value() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 - 18.0) * 0.37).collect();
        let (alpha, inverse) = (1.7f32, 1.0 / 1.7f32);
        let mut y = vec![0.0; x.len()];
        activate(&x, alpha, inverse, &mut y);
        for (x, y) in x.iter().zip(&y) {
            let exact = *x as f64 + (1.0 / 1.7) * ((1.7 * *x as f64).sin()).powi(2);
            assert!(
                (*y as f64 - exact).abs() < 1e-5,
                "snake({x}) = {y}, not {exact}"
            );
        }
    }
}
