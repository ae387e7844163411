//! The Snake activation, `y = x + inverse × sin²(alpha × x)` with one `alpha` and `inverse`
//! (1/alpha) per channel, as one ONNX Runtime custom operator, `ai.vox.Snake` (no GStreamer
//! types). Kokoro's generator applies it 48 times, to its largest tensors; exported, each is
//! five operators and five passes over memory, and ONNX Runtime's `Sin` is scalar. Here it is
//! one pass, the sine a polynomial the compiler vectorises, the channels shared among ONNX
//! Runtime's threads. [`crate::rewrite`] puts it in the graph.

use ort::operator::{
    BoxedKernel, ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

pub const NAME: &str = "Snake";

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

/// # Safety
/// The CPU must support AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_avx2(x: &[f32], alpha: f32, inverse: f32, y: &mut [f32]) {
    row(x, alpha, inverse, y)
}

/// The activation of one channel's `x` into `y`, with the widest vectors this CPU has.
pub fn activate(x: &[f32], alpha: f32, inverse: f32, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { row_avx2(x, alpha, inverse, y) };
    }
    row(x, alpha, inverse, y)
}

pub(crate) struct SnakeOperator;

impl Operator for SnakeOperator {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        NAME
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        Ok(Box::new(SnakeKernel))
    }
}

struct SnakeKernel;

/// The output's address, written by ONNX Runtime's threads one channel each.
struct Out(*mut f32);
// SAFETY: each task writes its own channel's disjoint range of the buffer.
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

impl Out {
    /// The address (a method, so that closures capture the whole `Out`).
    fn at(&self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

impl Kernel for SnakeKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let input = |i| {
            ctx.input(i)?
                .ok_or_else(|| ort::Error::new(format!("{NAME}: input {i} missing")))
        };
        let (x, alpha, inverse) = (input(0)?, input(1)?, input(2)?);
        let (shape, x) = x.try_extract_tensor::<f32>()?;
        let (_, alpha) = alpha.try_extract_tensor::<f32>()?;
        let (_, inverse) = inverse.try_extract_tensor::<f32>()?;
        let channels = alpha.len();
        if shape.len() < 2 || shape[1] as usize != channels || inverse.len() != channels {
            return Err(ort::Error::new(format!(
                "{NAME}: x {shape:?} with {channels} alphas and {} inverses",
                inverse.len()
            )));
        }
        // Rows are (batch, channel) pairs, each `len` contiguous values.
        let len: usize = shape[2..].iter().map(|&d| d.max(0) as usize).product();
        let rows = x.len() / len.max(1);
        let mut out = ctx
            .output(0, shape.to_vec())?
            .ok_or_else(|| ort::Error::new(format!("{NAME}: no output")))?;
        let (_, y) = out.try_extract_tensor_mut::<f32>()?;
        if y.len() != x.len() {
            return Err(ort::Error::new(format!("{NAME}: output of the wrong size")));
        }
        let out = Out(y.as_mut_ptr());
        ctx.par_for(rows, 0, |r| {
            let c = r % channels;
            let range = r * len..(r + 1) * len;
            // SAFETY: `range` lies within `y` (rows × len = its length), and no other task
            // writes it.
            let y = unsafe { std::slice::from_raw_parts_mut(out.at(range.start), len) };
            activate(&x[range], alpha[c], inverse[c], y);
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
