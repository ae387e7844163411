//! Reads Silero VAD v5/v6 weights out of the official ONNX file (no GStreamer types).
//!
//! The file holds one sub-graph per sample rate (the branches of a top-level `If` on `sr`), each
//! with its weights as `Constant` nodes or initializers named after the PyTorch parameters
//! (`…__encoder.0.reparam_conv.weight`, `…__decoder.rnn.weight_ih`, …). Only the few protobuf
//! fields needed to find them are declared; prost skips the rest.

use std::collections::HashMap;
use vox_common::onnx::TensorProto;

#[derive(Clone, PartialEq, prost::Message)]
struct ModelProto {
    #[prost(message, optional, tag = "7")]
    graph: Option<GraphProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct GraphProto {
    #[prost(message, repeated, tag = "1")]
    node: Vec<NodeProto>,
    #[prost(message, repeated, tag = "5")]
    initializer: Vec<TensorProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct NodeProto {
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(message, repeated, tag = "5")]
    attribute: Vec<AttributeProto>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct AttributeProto {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "5")]
    t: Option<TensorProto>,
    #[prost(message, optional, tag = "6")]
    g: Option<GraphProto>,
}

/// A float tensor: shape and values in row-major order.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub dims: Vec<usize>,
    pub data: Vec<f32>,
}

/// One convolution: weights `[out][in][kernel]` flattened, bias `[out]`.
#[derive(Debug, Clone)]
pub struct Conv {
    pub out_channels: usize,
    pub in_channels: usize,
    pub kernel: usize,
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Everything the forward pass needs for one sample rate.
#[derive(Debug, Clone)]
pub struct Weights {
    /// The STFT's analysis window: the model's basis is checked to be exactly a windowed DFT
    /// (real rows `w·cos`, imaginary rows `-w·sin`), so an FFT computes it.
    pub window: Vec<f32>,
    pub filter_length: usize,
    pub bins: usize,
    pub encoder: Vec<Conv>,
    /// LSTM cell, PyTorch gate order (input, forget, cell, output).
    pub hidden: usize,
    pub weight_ih: Vec<f32>,
    pub weight_hh: Vec<f32>,
    /// `bias_ih + bias_hh`.
    pub bias: Vec<f32>,
    /// Output 1×1 convolution.
    pub out_weight: Vec<f32>,
    pub out_bias: f32,
}

/// Parses `bytes` (an ONNX file) and returns the weights for 16 kHz and 8 kHz, in that order,
/// or why the file does not have the Silero v5/v6 layout.
pub fn parse(bytes: &[u8]) -> Result<(Weights, Weights), String> {
    use prost::Message;
    let model = ModelProto::decode(bytes).map_err(|e| format!("not an ONNX model: {e}"))?;
    let graph = model.graph.ok_or("the ONNX file has no graph")?;
    let mut by_rate: HashMap<usize, Weights> = HashMap::new();
    for branch in graph
        .node
        .iter()
        .filter(|n| n.op_type == "If")
        .flat_map(|n| n.attribute.iter().filter_map(|a| a.g.as_ref()))
    {
        let mut tensors = HashMap::new();
        collect(branch, &mut tensors)?;
        if let Some(weights) = branch_weights(&tensors)? {
            // A filter of 256 samples is the 16 kHz branch, 128 the 8 kHz one.
            by_rate.insert(weights.filter_length, weights);
        }
    }
    match (by_rate.remove(&256), by_rate.remove(&128)) {
        (Some(w16), Some(w8)) => Ok((w16, w8)),
        _ => Err("no Silero v5/v6 weights for 16 kHz and 8 kHz found".into()),
    }
}

/// Float tensors of a sub-graph (recursively), keyed by name.
fn collect(graph: &GraphProto, out: &mut HashMap<String, Tensor>) -> Result<(), String> {
    for t in &graph.initializer {
        if let Some(tensor) = to_tensor(t)? {
            out.insert(t.name.clone(), tensor);
        }
    }
    for node in &graph.node {
        for attr in &node.attribute {
            if node.op_type == "Constant"
                && attr.name == "value"
                && let (Some(t), Some(name)) = (&attr.t, node.output.first())
                && let Some(tensor) = to_tensor(t)?
            {
                out.insert(name.clone(), tensor);
            }
            if let Some(g) = &attr.g {
                collect(g, out)?;
            }
        }
    }
    Ok(())
}

fn to_tensor(t: &TensorProto) -> Result<Option<Tensor>, String> {
    let Some(data) = t.floats() else {
        return Ok(None);
    };
    let dims: Vec<usize> = t.dims.iter().map(|&d| d.max(0) as usize).collect();
    if data.len() != dims.iter().product::<usize>() {
        return Err(format!(
            "tensor {} holds {} values for shape {dims:?}",
            t.name,
            data.len()
        ));
    }
    Ok(Some(Tensor { dims, data }))
}

/// The weights of one branch, or `None` when it holds no STFT basis (not a model branch).
fn branch_weights(tensors: &HashMap<String, Tensor>) -> Result<Option<Weights>, String> {
    let find = |param: &str| -> Option<&Tensor> {
        let mut hits = tensors
            .iter()
            .filter(|(name, _)| name.ends_with(param) && name.len() > param.len())
            .filter(|(name, _)| {
                matches!(name.as_bytes()[name.len() - param.len() - 1], b'_' | b'.')
            });
        let first = hits.next().map(|(_, t)| t);
        first.filter(|_| hits.next().is_none())
    };
    let Some(basis) = find("stft.forward_basis_buffer") else {
        return Ok(None);
    };
    let need = |param: &str| find(param).ok_or_else(|| format!("weight {param} missing"));
    let shape_err = |param: &str, t: &Tensor| format!("weight {param} has shape {:?}", t.dims);

    // Basis [2 * bins, 1, filter_length], bins = filter_length / 2 + 1.
    let [rows, 1, filter_length] = basis.dims[..] else {
        return Err(shape_err("stft.forward_basis_buffer", basis));
    };
    let bins = filter_length / 2 + 1;
    if rows != 2 * bins {
        return Err(shape_err("stft.forward_basis_buffer", basis));
    }
    let window = dft_window(&basis.data, filter_length, bins)
        .ok_or("the STFT basis is not a windowed DFT")?;

    let mut encoder = Vec::new();
    let mut channels = bins;
    for i in 0..4 {
        let wname = format!("encoder.{i}.reparam_conv.weight");
        let bname = format!("encoder.{i}.reparam_conv.bias");
        let (w, b) = (need(&wname)?, need(&bname)?);
        let [out_channels, in_channels, kernel] = w.dims[..] else {
            return Err(shape_err(&wname, w));
        };
        if in_channels != channels || kernel != 3 || b.dims != [out_channels] {
            return Err(shape_err(&wname, w));
        }
        channels = out_channels;
        encoder.push(Conv {
            out_channels,
            in_channels,
            kernel,
            weight: w.data.clone(),
            bias: b.data.clone(),
        });
    }

    let hidden = channels;
    if hidden != super::STATE_LEN / 2 {
        return Err(format!(
            "LSTM of {hidden} units, expected {}",
            super::STATE_LEN / 2
        ));
    }
    let (wih, whh) = (need("rnn.weight_ih")?, need("rnn.weight_hh")?);
    let (bih, bhh) = (need("rnn.bias_ih")?, need("rnn.bias_hh")?);
    if wih.dims != [4 * hidden, hidden] || whh.dims != [4 * hidden, hidden] {
        return Err(shape_err("decoder.rnn.weight_ih", wih));
    }
    if bih.dims != [4 * hidden] || bhh.dims != [4 * hidden] {
        return Err(shape_err("decoder.rnn.bias_ih", bih));
    }
    let (ow, ob) = (
        need("decoder.decoder.2.weight")?,
        need("decoder.decoder.2.bias")?,
    );
    if ow.dims != [1, hidden, 1] || ob.dims != [1] {
        return Err(shape_err("decoder.decoder.2.weight", ow));
    }
    Ok(Some(Weights {
        window,
        filter_length,
        bins,
        encoder,
        hidden,
        weight_ih: wih.data.clone(),
        weight_hh: whh.data.clone(),
        bias: bih.data.iter().zip(&bhh.data).map(|(a, b)| a + b).collect(),
        out_weight: ow.data.clone(),
        out_bias: ob.data[0],
    }))
}

/// The window `w` if `basis` is `[w·cos(2πkn/N); -w·sin(2πkn/N)]` for bins k (row 0 is `w`).
fn dft_window(basis: &[f32], n: usize, bins: usize) -> Option<Vec<f32>> {
    let window = basis[..n].to_vec();
    let tolerance = 1e-5;
    for k in 0..bins {
        for (i, w) in window.iter().enumerate() {
            // k·i mod N keeps the angle small and exact.
            let angle = 2.0 * std::f64::consts::PI * ((k * i) % n) as f64 / n as f64;
            let w = f64::from(*w);
            let re = f64::from(basis[k * n + i]);
            let im = f64::from(basis[(bins + k) * n + i]);
            if (re - w * angle.cos()).abs() > tolerance || (im + w * angle.sin()).abs() > tolerance
            {
                return None;
            }
        }
    }
    Some(window)
}
