//! 8-bit convolutions as ONNX Runtime's 8-bit matrix product (no GStreamer types).
//!
//! Kokoro's int8 model runs each convolution as `ConvInteger` on unsigned 8-bit weights and
//! input. ONNX Runtime has no fast kernel for that (unsigned × unsigned), while its
//! `MatMulInteger` of unsigned by signed 8-bit values uses the CPU's 8-bit dot products (VNNI):
//! 3.2 ms against 9.8 ms for a float `Conv` of 256 channels, kernel 3, over 4,000 frames (one
//! core, this machine). [`crate::rewrite`] turns each convolution into three nodes:
//!
//! - `ai.vox.Im2Col(x, x_zero)` ([`im2col`]): the 8-bit input `[1, C, T]` as a matrix
//!   `[C·k, T']`, row c·k + j channel c as tap j sees it, each value less 128 (signed: the same
//!   differences to the zero point, exactly), padding the zero point; and that zero point less
//!   128;
//! - `MatMulInteger(w, cols, w_zero, x_zero)`: the model's weights `[C', C·k]` times that;
//! - `ai.vox.Dequantise(acc, scale[, bias])` ([`dequantise`]): the 32-bit sums times the scale
//!   (input scale × weight scale), plus the float bias, as `[1, C', T']`.
//!
//! The arithmetic is the int8 model's own: the same 8-bit values multiplied, summed exactly.
//! Channels stay first throughout: no transposition. One sequence at a time (batch 1), as
//! Kokoro runs; a batched input is an error at run time.

use crate::snake::par_items;
use ort::operator::{
    BoxedKernel, ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput,
};
use ort::value::TensorElementType;

pub const IM2COL: &str = "Im2Col";
pub const DEQUANTISE: &str = "Dequantise";

/// Whether ONNX Runtime's products of unsigned by signed 8-bit values are exact and fast on
/// this CPU. On x86-64 they are with the 8-bit dot product instructions (AVX512-VNNI,
/// AVX-VNNI); without them its AVX2 kernels add pairs of products in 16 bits, which saturate
/// on large values, and the convolutions stay float. Other CPUs' (ARM's) 8-bit dot products
/// are exact.
pub fn exact() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512vnni") || std::is_x86_feature_detected!("avxvnni");
    #[cfg(not(target_arch = "x86_64"))]
    true
}

/// A 1-D convolution's geometry (ONNX `Conv` attributes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub kernel: usize,
    pub dilation: usize,
    pub stride: usize,
    pub pad_begin: usize,
    pub pad_end: usize,
}

impl Geometry {
    /// Output frames for `frames` of input; 0 when the kernel does not fit.
    pub fn frames_out(&self, frames: usize) -> usize {
        let span = self.dilation * (self.kernel - 1) + 1;
        let padded = frames + self.pad_begin + self.pad_end;
        if padded < span || self.stride == 0 {
            0
        } else {
            (padded - span) / self.stride + 1
        }
    }
}

/// From unsigned to signed 8 bits, less 128.
fn signed(v: u8) -> i8 {
    (v ^ 0x80) as i8
}

/// Rows `first..first + rows.len() / out_frames` of the matrix of `x` (`channels` rows of
/// `frames`), each `out_frames` long: row c·k + j, column t holds x[c][t·stride + j·dilation −
/// pad_begin] less 128, or `zero` less 128 outside the input (signed bytes).
pub fn im2col(
    x: &[u8],
    channels: usize,
    g: Geometry,
    zero: u8,
    out_frames: usize,
    first: usize,
    rows: &mut [i8],
) {
    let frames = x.len() / channels.max(1);
    let pad = signed(zero);
    for (i, row) in rows.chunks_exact_mut(out_frames.max(1)).enumerate() {
        let (c, j) = ((first + i) / g.kernel, (first + i) % g.kernel);
        let src = &x[c * frames..(c + 1) * frames];
        // Input index of output frame t: t·stride + offset (offset may be negative).
        let offset = (j * g.dilation) as isize - g.pad_begin as isize;
        if g.stride == 1 {
            // The frames whose input is inside: [lo, hi).
            let lo = (-offset).clamp(0, out_frames as isize) as usize;
            let hi = (frames as isize - offset).clamp(lo as isize, out_frames as isize) as usize;
            row[..lo].fill(pad);
            if hi > lo {
                let start = (lo as isize + offset) as usize;
                for (y, v) in row[lo..hi].iter_mut().zip(&src[start..start + hi - lo]) {
                    *y = signed(*v);
                }
            }
            row[hi..].fill(pad);
        } else {
            for (t, y) in row.iter_mut().enumerate() {
                let at = (t * g.stride) as isize + offset;
                *y = if at >= 0 && (at as usize) < frames {
                    signed(src[at as usize])
                } else {
                    pad
                };
            }
        }
    }
}

/// Channels `first..first + out.len() / frames` of the result: out[c][t] = acc[c][t] ×
/// scale[c] + bias[c] (`scale` one value or one per channel; `bias` none or one per channel).
pub fn dequantise(
    acc: &[i32],
    frames: usize,
    scale: &[f32],
    bias: Option<&[f32]>,
    first: usize,
    out: &mut [f32],
) {
    if frames == 0 {
        return;
    }
    let pick = |v: &[f32], c: usize| if v.len() == 1 { v[0] } else { v[c] };
    for (i, row) in out.chunks_exact_mut(frames).enumerate() {
        let c = first + i;
        let (s, b) = (pick(scale, c), bias.map_or(0.0, |b| b[c]));
        for (y, a) in row.iter_mut().zip(&acc[c * frames..(c + 1) * frames]) {
            *y = *a as f32 * s + b;
        }
    }
}

fn missing(op: &str, i: usize) -> ort::Error {
    ort::Error::new(format!("{op}: input {i} missing"))
}

pub(crate) struct Im2ColOperator;

/// `ai.vox.Im2Col(x: uint8 [1, C, T], zero: uint8)` → (int8 [C·k, T'], int8 zero), attributes
/// `kernel`, `dilation`, `stride`, `pad_begin`, `pad_end`.
impl Operator for Im2ColOperator {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        IM2COL
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Uint8),
            OperatorInput::required(TensorElementType::Uint8),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(TensorElementType::Int8),
            OperatorOutput::required(TensorElementType::Int8),
        ]
    }

    fn create_kernel<'attr>(
        &self,
        info: &KernelContext<'attr>,
    ) -> ort::Result<Self::Kernel<'attr>> {
        let get = |name: &str| -> ort::Result<usize> {
            info.get::<i64>(name)
                .filter(|&v| v >= 0)
                .map(|v| v as usize)
                .ok_or_else(|| ort::Error::new(format!("{IM2COL}: attribute {name} missing")))
        };
        let g = Geometry {
            kernel: get("kernel")?,
            dilation: get("dilation")?,
            stride: get("stride")?,
            pad_begin: get("pad_begin")?,
            pad_end: get("pad_end")?,
        };
        if g.kernel == 0 || g.dilation == 0 || g.stride == 0 {
            return Err(ort::Error::new(format!("{IM2COL}: {g:?}")));
        }
        Ok(Box::new(Im2ColKernel(g)))
    }
}

struct Im2ColKernel(Geometry);

/// Matrix rows per task.
const ROWS: usize = 32;

impl Kernel for Im2ColKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let g = self.0;
        let x = ctx.input(0)?.ok_or_else(|| missing(IM2COL, 0))?;
        let zero = ctx.input(1)?.ok_or_else(|| missing(IM2COL, 1))?;
        let (shape, x) = x.try_extract_tensor::<u8>()?;
        let (_, zero) = zero.try_extract_tensor::<u8>()?;
        let zero = zero.first().copied().unwrap_or(0);
        if shape.len() != 3 || shape[0] != 1 {
            return Err(ort::Error::new(format!(
                "{IM2COL}: input {shape:?}: one sequence [1, channels, frames] is needed"
            )));
        }
        let (channels, frames) = (shape[1] as usize, shape[2] as usize);
        let (rows, out_frames) = (channels * g.kernel, g.frames_out(frames));
        let mut signed_zero = ctx
            .output(1, Vec::<i64>::new())?
            .ok_or_else(|| ort::Error::new(format!("{IM2COL}: no zero output")))?;
        signed_zero.try_extract_tensor_mut::<i8>()?.1[0] = signed(zero);
        let mut out = ctx
            .output(0, vec![rows as i64, out_frames as i64])?
            .ok_or_else(|| ort::Error::new(format!("{IM2COL}: no output")))?;
        let (_, y) = out.try_extract_tensor_mut::<i8>()?;
        par_items(ctx, y, out_frames, ROWS, |first, y| {
            im2col(x, channels, g, zero, out_frames, first, y)
        })
    }
}

pub(crate) struct DequantiseOperator;

/// `ai.vox.Dequantise(acc: int32 [C, T], scale: float (1 or C)[, bias: float C])` →
/// float `[1, C, T]`.
impl Operator for DequantiseOperator {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        DEQUANTISE
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Int32),
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        Ok(Box::new(DequantiseKernel))
    }
}

struct DequantiseKernel;

/// Output channels per task.
const CHANNELS: usize = 16;

impl Kernel for DequantiseKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let acc = ctx.input(0)?.ok_or_else(|| missing(DEQUANTISE, 0))?;
        let scale = ctx.input(1)?.ok_or_else(|| missing(DEQUANTISE, 1))?;
        let bias = ctx.input(2)?;
        let (shape, acc) = acc.try_extract_tensor::<i32>()?;
        let (_, scale) = scale.try_extract_tensor::<f32>()?;
        let bias = match &bias {
            Some(b) => Some(b.try_extract_tensor::<f32>()?.1),
            None => None,
        };
        if shape.len() != 2 {
            return Err(ort::Error::new(format!(
                "{DEQUANTISE}: sums {shape:?}: [channels, frames] is needed"
            )));
        }
        let (channels, frames) = (shape[0] as usize, shape[1] as usize);
        if !(scale.len() == 1 || scale.len() == channels)
            || bias.is_some_and(|b| b.len() != channels)
        {
            return Err(ort::Error::new(format!(
                "{DEQUANTISE}: {channels} channels, {} scales, {:?} biases",
                scale.len(),
                bias.map(<[f32]>::len)
            )));
        }
        let mut out = ctx
            .output(0, vec![1, channels as i64, frames as i64])?
            .ok_or_else(|| ort::Error::new(format!("{DEQUANTISE}: no output")))?;
        let (_, y) = out.try_extract_tensor_mut::<f32>()?;
        par_items(ctx, y, frames, CHANNELS, |first, y| {
            dequantise(acc, frames, scale, bias, first, y)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution by definition, in integers: [outs, frames out].
    fn reference(
        x: &[u8],
        channels: usize,
        w: &[i32],
        outs: usize,
        g: Geometry,
        zero: u8,
    ) -> Vec<i32> {
        let frames = x.len() / channels;
        let n = g.frames_out(frames);
        let mut y = vec![0; outs * n];
        for o in 0..outs {
            for t in 0..n {
                let mut sum = 0;
                for c in 0..channels {
                    for j in 0..g.kernel {
                        let at = (t * g.stride + j * g.dilation) as i64 - g.pad_begin as i64;
                        let v = if at >= 0 && (at as usize) < frames {
                            x[c * frames + at as usize]
                        } else {
                            zero
                        };
                        sum += (v as i32 - zero as i32) * w[(o * channels + c) * g.kernel + j];
                    }
                }
                y[o * n + t] = sum;
            }
        }
        y
    }

    #[test]
    fn the_weights_times_the_matrix_is_the_convolution() {
        let (channels, frames, outs, zero) = (3, 23, 2, 7u8);
        let x: Vec<u8> = (0..channels * frames)
            .map(|i| ((i * 37) % 251) as u8)
            .collect();
        for g in [
            Geometry {
                kernel: 3,
                dilation: 1,
                stride: 1,
                pad_begin: 1,
                pad_end: 1,
            },
            Geometry {
                kernel: 7,
                dilation: 3,
                stride: 1,
                pad_begin: 9,
                pad_end: 9,
            },
            Geometry {
                kernel: 11,
                dilation: 5,
                stride: 1,
                pad_begin: 25,
                pad_end: 25,
            },
            Geometry {
                kernel: 3,
                dilation: 1,
                stride: 2,
                pad_begin: 1,
                pad_end: 1,
            },
            Geometry {
                kernel: 12,
                dilation: 1,
                stride: 6,
                pad_begin: 3,
                pad_end: 3,
            },
            Geometry {
                kernel: 1,
                dilation: 1,
                stride: 1,
                pad_begin: 0,
                pad_end: 0,
            },
        ] {
            let w: Vec<i32> = (0..outs * channels * g.kernel)
                .map(|i| (i as i32 * 13) % 29 - 14)
                .collect();
            let n = g.frames_out(frames);
            let rows = channels * g.kernel;
            let mut cols = vec![0i8; rows * n];
            // In two pieces, as two tasks would.
            let split = rows / 2;
            let (a, b) = cols.split_at_mut(split * n);
            im2col(&x, channels, g, zero, n, 0, a);
            im2col(&x, channels, g, zero, n, split, b);
            let z = signed(zero) as i32;
            let mut y = vec![0; outs * n];
            for o in 0..outs {
                for t in 0..n {
                    y[o * n + t] = (0..rows)
                        .map(|r| (cols[r * n + t] as i32 - z) * w[o * rows + r])
                        .sum();
                }
            }
            assert_eq!(y, reference(&x, channels, &w, outs, g, zero), "{g:?}");
        }
    }

    #[test]
    fn sums_come_back_scaled_and_biased() {
        // 2 channels × 3 frames.
        let acc = [1, 2, 3, 10, 20, 30];
        let mut out = vec![0.0; 6];
        dequantise(&acc, 3, &[0.5, 0.25], Some(&[1.0, -1.0]), 0, &mut out);
        assert_eq!(out, [1.5, 2.0, 2.5, 1.5, 4.0, 6.5]);
        let mut second = vec![0.0; 3];
        dequantise(&acc, 3, &[2.0], None, 1, &mut second);
        assert_eq!(second, [20.0, 40.0, 60.0]);
    }
}
