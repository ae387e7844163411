//! Rewrites of Kokoro's int8 ONNX graph that make it faster on ONNX Runtime (no GStreamer types).
//!
//! - **8-bit convolutions.** Each `ConvInteger` chain (below) becomes [`crate::qconv`]'s three
//!   nodes: the same 8-bit products, summed exactly, through ONNX Runtime's `MatMulInteger`,
//!   which uses the CPU's 8-bit dot products where `ConvInteger` has no fast kernel. About
//!   twice as fast as float convolutions, in a quarter of their weights' memory.
//! - **Float convolutions** (for chains the 8-bit rewrite does not take, or instead of it). ONNX Runtime's dynamic quantisation turns each `Conv` into
//!   `DynamicQuantizeLinear` (the input to 8 bits, at run time), `ConvInteger` with 8-bit
//!   weights, the bias quantised at run time (`Div`, `Floor`, `Cast`, `Reshape`), `Add`, `Cast`
//!   to float and `Mul` by the two scales. One float `Conv` goes back in its place, its weights
//!   the 8-bit weights dequantised (`(w - zero point) × scale`, the values the int8 path
//!   multiplies by) and the model's float bias. ONNX Runtime's float kernels beat its
//!   `ConvInteger` and the quantisation around it: 9–13% of a synthesis on 2 AVX-512 cores,
//!   for the convolutions' weights in 32 bits (~200 MiB more memory) and ~0.5 s more to load.
//! - **One Snake.** The generator's activation, `x + sin²(αx)/α` per channel, is exported as
//!   five operators (`Mul`, `Sin`, `Pow`, `Mul`, `Add`), each a pass over its largest tensors,
//!   and ONNX Runtime's `Sin` is scalar. [`crate::snake`]'s operator does it in one vectorised
//!   pass, with the adaptive instance normalisation before it (nine more operators) where there
//!   is one.
//! - **The STFT.** ONNX Runtime's `STFT` of the harmonic source is slow for its 20-point frames;
//!   [`crate::stft`]'s operator does the same sums.
//!
//! The operators are in the domain [`DOMAIN`]: a session that loads a rewritten model with
//! custom operators in it must register [`operators`].
//!
//! The model is edited at the protobuf wire level: every record but the rewritten nodes and
//! initialisers is copied byte for byte, so fields this module does not know survive.

use prost::Message;
use prost::bytes::Buf;
use prost::encoding::{
    WireType, decode_key, decode_varint, encode_key, encode_varint, encoded_len_varint,
};
use std::collections::{HashMap, HashSet};
use vox_common::onnx::{FLOAT, INT8, TensorProto as Tensor, UINT8};

/// ONNX `ModelProto` fields.
const MODEL_OPSET_IMPORT: u32 = 8;
const MODEL_GRAPH: u32 = 7;
/// ONNX `GraphProto` fields.
const GRAPH_NODE: u32 = 1;
const GRAPH_INITIALIZER: u32 = 5;
const GRAPH_OUTPUT: u32 = 12;
/// The fields of `NodeProto` this module reads and writes (attributes kept as raw records).
#[derive(Clone, PartialEq, Message)]
struct Node {
    #[prost(string, repeated, tag = "1")]
    input: Vec<String>,
    #[prost(string, repeated, tag = "2")]
    output: Vec<String>,
    #[prost(string, tag = "3")]
    name: String,
    #[prost(string, tag = "4")]
    op_type: String,
    #[prost(bytes = "vec", repeated, tag = "5")]
    attribute: Vec<Vec<u8>>,
    #[prost(string, tag = "7")]
    domain: String,
}

/// The values of a quantised weight, zero point, scale or bias as floats: float, uint8 or int8.
fn values(t: &Tensor) -> Option<Vec<f32>> {
    if t.data_location != 0 {
        return None;
    }
    let raw = &t.raw_data;
    let v: Vec<f32> = match t.data_type {
        FLOAT => t.floats()?,
        UINT8 if !raw.is_empty() => raw.iter().map(|&b| b as f32).collect(),
        INT8 if !raw.is_empty() => raw.iter().map(|&b| b as i8 as f32).collect(),
        UINT8 | INT8 => t.int32_data.iter().map(|&b| b as f32).collect(),
        _ => return None,
    };
    (v.len() == t.len()).then_some(v)
}

/// One top-level record of a protobuf message: its field number and its encoded bytes (key
/// included), and for a length-delimited field the payload's range within them.
struct Record<'a> {
    field: u32,
    bytes: &'a [u8],
    payload: &'a [u8],
}

fn records(mut buf: &[u8]) -> Result<Vec<Record<'_>>, String> {
    let bad = |e: prost::DecodeError| format!("not an ONNX model: {e}");
    let mut out = Vec::new();
    while !buf.is_empty() {
        let start = buf;
        let (field, wire) = decode_key(&mut buf).map_err(bad)?;
        let payload_len = match wire {
            WireType::Varint => {
                decode_varint(&mut buf).map_err(bad)?;
                0
            }
            WireType::SixtyFourBit => 8,
            WireType::ThirtyTwoBit => 4,
            WireType::LengthDelimited => decode_varint(&mut buf).map_err(bad)? as usize,
            WireType::StartGroup | WireType::EndGroup => {
                return Err("not an ONNX model: protobuf groups".into());
            }
        };
        if buf.remaining() < payload_len {
            return Err("not an ONNX model: truncated".into());
        }
        let payload = &buf[..payload_len];
        buf.advance(payload_len);
        let used = start.len() - buf.len();
        out.push(Record {
            field,
            bytes: &start[..used],
            payload: if wire == WireType::LengthDelimited {
                payload
            } else {
                &[]
            },
        });
    }
    Ok(out)
}

fn put_message(field: u32, payload: &[u8], out: &mut Vec<u8>) {
    encode_key(field, WireType::LengthDelimited, out);
    encode_varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// The nodes that replace a chain of them.
struct Replacement {
    /// Index of the chain's last node, where the new ones go.
    at: usize,
    nodes: Vec<Node>,
    removed: Vec<usize>,
}

/// `OperatorSetIdProto`: the model imports our operators' domain.
#[derive(Clone, PartialEq, Message)]
struct OpsetImport {
    #[prost(string, tag = "1")]
    domain: String,
    #[prost(int64, tag = "2")]
    version: i64,
}

/// Which rewrites to make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Options {
    /// Convolutions as 8-bit matrix products ([`crate::qconv`]); before `float_convs`.
    pub int8_convs: bool,
    pub float_convs: bool,
    pub snake: bool,
    pub stft: bool,
}

impl Options {
    pub const ALL: Self = Self {
        int8_convs: true,
        float_convs: true,
        snake: true,
        stft: true,
    };
    pub const NONE: Self = Self {
        int8_convs: false,
        float_convs: false,
        snake: false,
        stft: false,
    };
}

/// The domain of our custom operators.
pub const DOMAIN: &str = "ai.vox";

/// Our custom operators, for a session whose model has them.
pub fn operators() -> ort::Result<ort::operator::OperatorDomain> {
    ort::operator::OperatorDomain::new(DOMAIN)?
        .add(crate::snake::SnakeOperator)?
        .add(crate::snake::NormSnakeOperator)?
        .add(crate::stft::StftOperator)?
        .add(crate::qconv::Im2ColOperator)?
        .add(crate::qconv::DequantiseOperator)
}

/// The nodes and initialisers of a graph, and who makes and uses each tensor.
struct Graph<'a> {
    nodes: &'a [Node],
    inits: &'a HashMap<String, &'a [u8]>,
    producer: HashMap<&'a str, usize>,
    consumers: HashMap<&'a str, Vec<usize>>,
    outputs: HashSet<&'a str>,
}

impl<'a> Graph<'a> {
    fn new(nodes: &'a [Node], inits: &'a HashMap<String, &'a [u8]>, outputs: &'a [String]) -> Self {
        let mut producer = HashMap::new();
        let mut consumers: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, n) in nodes.iter().enumerate() {
            for o in &n.output {
                producer.insert(o.as_str(), i);
            }
            for x in &n.input {
                consumers.entry(x.as_str()).or_default().push(i);
            }
        }
        let outputs = outputs.iter().map(String::as_str).collect();
        Self {
            nodes,
            inits,
            producer,
            consumers,
            outputs,
        }
    }

    fn tensor(&self, name: &str) -> Option<Tensor> {
        Tensor::decode(*self.inits.get(name)?).ok()
    }

    /// The node that makes `name`, when it is a `op`.
    fn made_by(&self, name: &str, op: &str) -> Option<&'a Node> {
        let n = &self.nodes[*self.producer.get(name)?];
        (n.op_type == op).then_some(n)
    }

    /// The one node that uses `name` (which is not a graph output).
    fn only_user(&self, name: &str) -> Option<usize> {
        match self.consumers.get(name).map(Vec::as_slice) {
            Some([c]) if !self.outputs.contains(name) => Some(*c),
            _ => None,
        }
    }
}

/// A rewritten model.
pub struct Rewritten {
    pub model: Vec<u8>,
    /// How many `ConvInteger` chains became 8-bit matrix products ([`crate::qconv`]).
    pub int8_convs: usize,
    /// How many `ConvInteger` chains became `Conv`s.
    pub convs: usize,
    /// How many Snake chains became one [`crate::snake`] operator.
    pub snakes: usize,
    /// How many of those took the adaptive instance normalisation before them too.
    pub norms: usize,
    /// How many `STFT`s became [`crate::stft`]'s.
    pub stfts: usize,
}

impl Rewritten {
    /// Whether the model has custom operators: the session must register [`operators`].
    pub fn has_operators(&self) -> bool {
        self.int8_convs + self.snakes + self.stfts > 0
    }
}

impl std::fmt::Debug for Rewritten {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Rewritten({} bytes, {} 8-bit and {} float convolutions, {} snakes ({} with their \
             norm), {} STFTs)",
            self.model.len(),
            self.int8_convs,
            self.convs,
            self.snakes,
            self.norms,
            self.stfts
        )
    }
}

/// The model rewritten as `options` ask, or `None` when nothing in it has the shapes above
/// (a float model, say: chains of another shape are left as they are). An error when the bytes
/// are not an ONNX model.
pub fn rewrite(model: &[u8], options: Options) -> Result<Option<Rewritten>, String> {
    let top = records(model)?;
    let Some(graph) = top.iter().find(|r| r.field == MODEL_GRAPH) else {
        return Err("not an ONNX model: no graph".into());
    };
    let graph_records = records(graph.payload)?;

    let mut nodes = Vec::new();
    let mut inits: HashMap<String, &[u8]> = HashMap::new();
    let mut init_names = Vec::new();
    let mut graph_outputs = Vec::new();
    for r in &graph_records {
        match r.field {
            GRAPH_NODE => nodes.push(Node::decode(r.payload).map_err(|e| e.to_string())?),
            GRAPH_INITIALIZER => {
                let t = Tensor::decode(r.payload).map_err(|e| e.to_string())?;
                init_names.push(t.name.clone());
                inits.insert(t.name, r.payload);
            }
            GRAPH_OUTPUT => {
                // ValueInfoProto.name is its field 1.
                let name = records(r.payload)?.into_iter().find(|f| f.field == 1);
                graph_outputs.extend(name.map(|f| String::from_utf8_lossy(f.payload).into_owned()));
            }
            _ => {}
        }
    }
    // Subgraphs may use outer names: pruning would need to see into them.
    if nodes
        .iter()
        .any(|n| matches!(n.op_type.as_str(), "If" | "Loop" | "Scan"))
    {
        return Ok(None);
    }

    let g = Graph::new(&nodes, &inits, &graph_outputs);
    let mut replacements = Vec::new();
    let mut weights: HashMap<String, Weight> = HashMap::new();
    let (mut int8_convs, mut convs, mut snakes, mut norms, mut stfts) = (0, 0, 0, 0, 0);
    for (i, n) in nodes.iter().enumerate() {
        if !n.domain.is_empty() {
            continue;
        }
        let r = match n.op_type.as_str() {
            "ConvInteger" => options
                .int8_convs
                .then(|| int8_conv(&g, i, &mut weights))
                .flatten()
                .or_else(|| {
                    options
                        .float_convs
                        .then(|| float_conv(&g, i, &mut weights))
                        .flatten()
                }),
            "Sin" if options.snake => snake(&g, i),
            "STFT" if options.stft => stft(&g, i),
            _ => None,
        };
        if let Some(r) = r {
            match n.op_type.as_str() {
                "Sin" if r.nodes[0].op_type == crate::snake::NORM_NAME => {
                    (snakes, norms) = (snakes + 1, norms + 1)
                }
                "Sin" => snakes += 1,
                "STFT" => stfts += 1,
                _ if r.nodes.len() > 1 => int8_convs += 1,
                _ => convs += 1,
            }
            replacements.push(r);
        }
    }
    if replacements.is_empty() {
        return Ok(None);
    }

    // The graph after the swap: the new nodes at their chains' ends, then anything no longer
    // needed for the outputs dropped (the quantisers and 8-bit weights the chains used).
    let mut removed = HashSet::new();
    let mut swapped: HashMap<usize, Vec<Node>> = HashMap::new();
    for r in replacements {
        removed.extend(r.removed);
        swapped.insert(r.at, r.nodes);
    }
    // The nodes at each place, and whether they are new.
    let mut kept: Vec<Option<(Vec<Node>, bool)>> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| match swapped.remove(&i) {
            Some(new) => Some((new, true)),
            None if removed.contains(&i) => None,
            None => Some((vec![n.clone()], false)),
        })
        .collect();
    loop {
        let mut used: HashSet<&str> = graph_outputs.iter().map(String::as_str).collect();
        for (ns, _) in kept.iter().flatten() {
            used.extend(ns.iter().flat_map(|n| n.input.iter().map(String::as_str)));
        }
        let dead: Vec<usize> = kept
            .iter()
            .enumerate()
            // A group of new nodes lives by its last node's outputs (the others feed it).
            .filter(|(_, n)| {
                n.as_ref().is_some_and(|(ns, _)| {
                    !ns.last()
                        .is_some_and(|n| n.output.iter().any(|o| used.contains(o.as_str())))
                })
            })
            .map(|(i, _)| i)
            .collect();
        if dead.is_empty() {
            break;
        }
        for i in dead {
            kept[i] = None;
        }
    }
    let used: HashSet<&str> = kept
        .iter()
        .flatten()
        .flat_map(|(ns, _)| ns.iter().flat_map(|n| n.input.iter().map(String::as_str)))
        .chain(graph_outputs.iter().map(String::as_str))
        .collect();

    // The new weights are made one at a time as they are written, after the graph's length
    // is known, so that the model is never held twice.
    let mut new_weights: Vec<&Weight> = weights
        .values()
        .filter(|w| used.contains(w.name.as_str()))
        .collect();
    new_weights.sort_by(|a, b| a.name.cmp(&b.name));
    let new_nodes: HashMap<usize, Vec<Vec<u8>>> = kept
        .iter()
        .enumerate()
        .filter_map(|(i, n)| match n {
            Some((ns, true)) => Some((i, ns.iter().map(Message::encode_to_vec).collect())),
            _ => None,
        })
        .collect();
    let message_len = |len: usize| 1 + encoded_len_varint(len as u64) + len;
    let mut graph_len = 0;
    let mut node_index = 0;
    let mut init_index = 0;
    let mut keep = Vec::with_capacity(graph_records.len());
    for r in &graph_records {
        let (kept_bytes, new) = match r.field {
            GRAPH_NODE => {
                node_index += 1;
                match &kept[node_index - 1] {
                    Some((_, true)) => (0, Some(&new_nodes[&(node_index - 1)])),
                    Some((_, false)) => (r.bytes.len(), None),
                    None => (0, None),
                }
            }
            GRAPH_INITIALIZER => {
                init_index += 1;
                let name = init_names[init_index - 1].as_str();
                (
                    if used.contains(name) {
                        r.bytes.len()
                    } else {
                        0
                    },
                    None,
                )
            }
            _ => (r.bytes.len(), None),
        };
        graph_len += kept_bytes + new.map_or(0, |ns| ns.iter().map(|n| message_len(n.len())).sum());
        keep.push((kept_bytes > 0, new));
    }
    graph_len += new_weights
        .iter()
        .map(|w| message_len(w.encoded_len()))
        .sum::<usize>();

    let mut out = Vec::with_capacity(model.len() - graph.payload.len() + graph_len + 64);
    if int8_convs + snakes + stfts > 0 {
        let domain = OpsetImport {
            domain: DOMAIN.into(),
            version: 1,
        };
        put_message(MODEL_OPSET_IMPORT, &domain.encode_to_vec(), &mut out);
    }
    for r in &top {
        if r.field != MODEL_GRAPH {
            out.extend_from_slice(r.bytes);
            continue;
        }
        encode_key(MODEL_GRAPH, WireType::LengthDelimited, &mut out);
        encode_varint(graph_len as u64, &mut out);
        let start = out.len();
        for (r, (keep, new)) in graph_records.iter().zip(&keep) {
            if *keep {
                out.extend_from_slice(r.bytes);
            }
            for node in new.iter().flat_map(|ns| ns.iter()) {
                put_message(GRAPH_NODE, node, &mut out);
            }
        }
        for w in &new_weights {
            let t = w
                .tensor(&g)
                .ok_or_else(|| format!("cannot make {} from {}", w.name, w.q))?;
            put_message(GRAPH_INITIALIZER, &t.encode_to_vec(), &mut out);
        }
        if out.len() - start != graph_len {
            return Err("rewrite: the graph's length came out wrong".into());
        }
    }
    Ok(Some(Rewritten {
        model: out,
        int8_convs,
        convs,
        snakes,
        norms,
        stfts,
    }))
}

/// A `ConvInteger` at `conv` and the nodes around it that dynamic quantisation made.
struct ConvChain {
    conv: usize,
    /// The float input, before `DynamicQuantizeLinear`.
    x: String,
    /// [Add the run-time quantised bias] → Cast to float → Mul by `scale`.
    add: Option<usize>,
    cast: usize,
    mul: usize,
    /// The float bias behind the quantised one.
    bias: Option<String>,
    /// Input scale × weight scale (made at run time), and the weight scale.
    scale: String,
    w_scale: String,
    /// The 8-bit weights and their zero point (none: 0), initialisers.
    weight: String,
    w_zero: Option<String>,
}

impl ConvChain {
    /// The chain of the `ConvInteger` at `i`, when it has the expected shape.
    fn at(g: &Graph, i: usize) -> Option<Self> {
        let nodes = g.nodes;
        let conv = &nodes[i];
        let other = |n: &Node, this: &str| -> Option<String> {
            match n.input.as_slice() {
                [a, b] if a == this => Some(b.clone()),
                [a, b] if b == this => Some(a.clone()),
                _ => None,
            }
        };
        // The input, quantised at run time.
        let quantiser = g.made_by(&conv.input[0], "DynamicQuantizeLinear")?;
        if quantiser.output.len() < 3 || conv.input.get(2) != Some(&quantiser.output[2]) {
            return None;
        }
        let x = quantiser.input.first()?.clone();
        let x_scale = &quantiser.output[1];
        let mut at = g.only_user(&conv.output[0])?;
        let mut add = None;
        let mut bias = None;
        if nodes[at].op_type == "Add" {
            let b = other(&nodes[at], &conv.output[0])?;
            let (float_bias, bias_scale) = quantised_bias(g, &b)?;
            let t = g.tensor(&float_bias)?;
            if t.data_type != FLOAT || t.dims.len() != 1 {
                return None;
            }
            bias = Some((float_bias, bias_scale));
            add = Some(at);
            at = g.only_user(&nodes[at].output[0])?;
        }
        let cast = at;
        if nodes[cast].op_type != "Cast" || !casts_to_float(&nodes[cast]) {
            return None;
        }
        let mul = g.only_user(&nodes[cast].output[0])?;
        if nodes[mul].op_type != "Mul" {
            return None;
        }
        let scale = other(&nodes[mul], &nodes[cast].output[0])?;
        let w_scale = other(g.made_by(&scale, "Mul")?, x_scale)?;
        if bias
            .as_ref()
            .is_some_and(|(_, bias_scale)| *bias_scale != scale)
        {
            return None;
        }
        Some(Self {
            conv: i,
            x,
            add,
            cast,
            mul,
            bias: bias.map(|(b, _)| b),
            scale,
            w_scale,
            weight: conv.input[1].clone(),
            w_zero: conv.input.get(3).filter(|z| !z.is_empty()).cloned(),
        })
    }

    /// The convolution's weights made as `kind`, named after the 8-bit ones with `suffix`.
    fn made(
        &self,
        kind: WeightKind,
        suffix: &str,
        scale: Option<String>,
        dims: Vec<i64>,
    ) -> Weight {
        Weight {
            name: format!("{}_{suffix}", self.weight),
            kind,
            q: self.weight.clone(),
            zero: self.w_zero.clone(),
            scale,
            dims,
        }
    }

    fn removed(&self) -> Vec<usize> {
        [Some(self.conv), self.add, Some(self.cast), Some(self.mul)]
            .into_iter()
            .flatten()
            .collect()
    }
}

/// Adds `weight` to the weights to write, once per name; `None` when the same name was asked
/// with other zero points or scales, or the initialisers do not fit.
fn add_weight(g: &Graph, weights: &mut HashMap<String, Weight>, weight: Weight) -> Option<String> {
    match weights.get(&weight.name) {
        Some(w) if (&w.zero, &w.scale) != (&weight.zero, &weight.scale) => return None,
        Some(_) => {}
        None => {
            // Checked here, made when written.
            weight.tensor(g)?;
            weights.insert(weight.name.clone(), weight.clone());
        }
    }
    Some(weight.name)
}

/// The float `Conv` for the `ConvInteger` at `i`, when its chain has the expected shape.
fn float_conv(g: &Graph, i: usize, weights: &mut HashMap<String, Weight>) -> Option<Replacement> {
    let chain = ConvChain::at(g, i)?;
    let conv = &g.nodes[i];
    let dims = g.tensor(&chain.weight)?.dims;
    let weight = add_weight(
        g,
        weights,
        chain.made(
            WeightKind::Float,
            "float",
            Some(chain.w_scale.clone()),
            dims,
        ),
    )?;
    let mut input = vec![chain.x.clone(), weight];
    input.extend(chain.bias.clone());
    Some(Replacement {
        at: chain.mul,
        nodes: vec![Node {
            input,
            output: g.nodes[chain.mul].output.clone(),
            name: format!("{}_float", conv.name),
            op_type: "Conv".into(),
            attribute: conv.attribute.clone(),
            domain: String::new(),
        }],
        removed: chain.removed(),
    })
}

/// The three nodes of [`crate::qconv`] for the `ConvInteger` at `i`: a 1-D convolution of one
/// group, its weights 8-bit with one zero point.
fn int8_conv(g: &Graph, i: usize, weights: &mut HashMap<String, Weight>) -> Option<Replacement> {
    let chain = ConvChain::at(g, i)?;
    let conv = &g.nodes[i];
    let w = g.tensor(&chain.weight)?;
    if w.dims.len() != 3 || w.data_type != UINT8 {
        return None;
    }
    let (outs, ins, kernel) = (w.dims[0], w.dims[1], w.dims[2]);
    let mut geometry = crate::qconv::Geometry {
        kernel: kernel as usize,
        dilation: 1,
        stride: 1,
        pad_begin: 0,
        pad_end: 0,
    };
    for a in &conv.attribute {
        let a = Attribute::decode(a.as_slice()).ok()?;
        let one = |v: &[i64]| match v {
            [x] if *x >= 0 => Some(*x as usize),
            _ => None,
        };
        match a.name.as_str() {
            "kernel_shape" if one(&a.ints)? == geometry.kernel => {}
            "dilations" => geometry.dilation = one(&a.ints)?,
            "strides" => geometry.stride = one(&a.ints)?,
            "pads" => match a.ints.as_slice() {
                [b, e] if *b >= 0 && *e >= 0 => {
                    (geometry.pad_begin, geometry.pad_end) = (*b as usize, *e as usize)
                }
                _ => return None,
            },
            "group" if a.i == 1 => {}
            "auto_pad" if a.s.is_empty() || a.s == b"NOTSET" => {}
            _ => return None,
        }
    }
    if geometry.kernel == 0 || geometry.dilation == 0 || geometry.stride == 0 {
        return None;
    }
    let matrix = add_weight(
        g,
        weights,
        chain.made(WeightKind::Rows, "rows", None, vec![outs, ins * kernel]),
    )?;
    let y = &conv.output[0];
    let (cols, x_zero, acc) = (
        format!("{y}_columns"),
        format!("{y}_signed_zero"),
        format!("{y}_sums"),
    );
    let int = |name: &str, i: usize| {
        Attribute {
            name: name.into(),
            i: i as i64,
            r#type: ATTRIBUTE_INT,
            ..Default::default()
        }
        .encode_to_vec()
    };
    let mut dequantise = vec![acc.clone(), chain.scale.clone()];
    dequantise.extend(chain.bias.clone());
    Some(Replacement {
        at: chain.mul,
        nodes: vec![
            Node {
                input: vec![conv.input[0].clone(), conv.input[2].clone()],
                output: vec![cols.clone(), x_zero.clone()],
                name: format!("{}_im2col", conv.name),
                op_type: crate::qconv::IM2COL.into(),
                attribute: vec![
                    int("kernel", geometry.kernel),
                    int("dilation", geometry.dilation),
                    int("stride", geometry.stride),
                    int("pad_begin", geometry.pad_begin),
                    int("pad_end", geometry.pad_end),
                ],
                domain: DOMAIN.into(),
            },
            Node {
                input: vec![
                    matrix,
                    cols,
                    chain.w_zero.clone().unwrap_or_default(),
                    x_zero,
                ],
                output: vec![acc],
                name: format!("{}_matmul", conv.name),
                op_type: "MatMulInteger".into(),
                attribute: Vec::new(),
                domain: String::new(),
            },
            Node {
                input: dequantise,
                output: g.nodes[chain.mul].output.clone(),
                name: format!("{}_dequantise", conv.name),
                op_type: crate::qconv::DEQUANTISE.into(),
                attribute: Vec::new(),
                domain: DOMAIN.into(),
            },
        ],
        removed: chain.removed(),
    })
}

/// The one operator for the Snake chain at the `Sin` at `i`:
/// `Add(x, Mul(inverse, Pow(Sin(Mul(alpha, x)), 2)))`, `alpha` and `inverse` initialisers of
/// one value per channel (the second dimension of `x`).
fn snake(g: &Graph, i: usize) -> Option<Replacement> {
    let nodes = g.nodes;
    let sin = &nodes[i];
    let scaled = g.made_by(sin.input.first()?, "Mul")?;
    let [a, b] = scaled.input.as_slice() else {
        return None;
    };
    let (alpha, x) = if g.inits.contains_key(a) {
        (a, b)
    } else {
        (b, a)
    };
    let per_channel = |name: &str| {
        let t = g.tensor(name)?;
        let ok = t.data_type == FLOAT
            && t.dims.len() >= 2
            && t.dims.iter().enumerate().all(|(d, &n)| d == 1 || n == 1);
        ok.then_some(t.dims)
    };
    let channels = per_channel(alpha)?;
    let at_sin = g.only_user(&scaled.output[0])?;
    let pow = g
        .only_user(&sin.output[0])
        .filter(|&p| nodes[p].op_type == "Pow")?;
    let two = values(&g.tensor(nodes[pow].input.get(1)?)?)?;
    if at_sin != i || two != [2.0] {
        return None;
    }
    let times = g
        .only_user(&nodes[pow].output[0])
        .filter(|&m| nodes[m].op_type == "Mul")?;
    let inverse = match nodes[times].input.as_slice() {
        [a, b] if *b == nodes[pow].output[0] => a.clone(),
        [a, b] if *a == nodes[pow].output[0] => b.clone(),
        _ => return None,
    };
    if per_channel(&inverse)? != channels {
        return None;
    }
    let add = g
        .only_user(&nodes[times].output[0])
        .filter(|&a| nodes[a].op_type == "Add")?;
    if !nodes[add].input.contains(x) {
        return None;
    }
    let scaled_at = *g.producer.get(scaled.output[0].as_str())?;
    let mut removed = vec![scaled_at, i, pow, times, add];
    // With the AdaIN that makes `x` (used by this Snake only), one operator does both.
    let users: HashSet<usize> = g.consumers.get(x.as_str())?.iter().copied().collect();
    let norm = adain(g, x).filter(|_| users == HashSet::from([scaled_at, add]));
    let (op, input) = match norm {
        Some(norm) => {
            removed.extend(norm.nodes);
            let input = vec![
                norm.x,
                norm.scale,
                norm.shift,
                norm.eps,
                alpha.clone(),
                inverse,
            ];
            (crate::snake::NORM_NAME, input)
        }
        None => (crate::snake::NAME, vec![x.clone(), alpha.clone(), inverse]),
    };
    Some(Replacement {
        at: add,
        nodes: vec![Node {
            input,
            output: nodes[add].output.clone(),
            name: format!("{}_snake", sin.name),
            op_type: op.into(),
            attribute: Vec::new(),
            domain: DOMAIN.into(),
        }],
        removed,
    })
}

/// An adaptive instance normalisation, `scale × (x - mean) / sqrt(variance + eps) + shift`,
/// mean and variance over the last axis of [batch, channels, time], as exported:
/// `Add(Mul(scale, Div(d = Sub(x, ReduceMean(x)), Sqrt(Add(ReduceMean(Mul(d, d)), eps)))),
/// shift)`.
struct AdaIn {
    x: String,
    scale: String,
    shift: String,
    eps: String,
    /// Its nodes, each used by the next only.
    nodes: Vec<usize>,
}

/// The AdaIN whose output is `y`.
fn adain(g: &Graph, y: &str) -> Option<AdaIn> {
    let at = |name: &str| g.producer.get(name).copied();
    let [a, b] = g.made_by(y, "Add")?.input.as_slice() else {
        return None;
    };
    let (mul, shift) = match (g.made_by(a, "Mul"), g.made_by(b, "Mul")) {
        (Some(m), None) => (m, b),
        (None, Some(m)) => (m, a),
        _ => return None,
    };
    let [a, b] = mul.input.as_slice() else {
        return None;
    };
    let (div, scale) = match (g.made_by(a, "Div"), g.made_by(b, "Div")) {
        (Some(d), None) => (d, b),
        (None, Some(d)) => (d, a),
        _ => return None,
    };
    let [d, sd] = div.input.as_slice() else {
        return None;
    };
    let [x, m] = g.made_by(d, "Sub")?.input.as_slice() else {
        return None;
    };
    let mean = g.made_by(m, "ReduceMean")?;
    let sqrt = g.made_by(sd, "Sqrt")?;
    let [v, eps] = g.made_by(sqrt.input.first()?, "Add")?.input.as_slice() else {
        return None;
    };
    let variance = g.made_by(v, "ReduceMean")?;
    let square = g.made_by(variance.input.first()?, "Mul")?;
    let over_time = |r: &Node| {
        let keeps_dims = r.attribute.iter().all(|a| {
            Attribute::decode(a.as_slice()).is_ok_and(|a| a.name != "keepdims" || a.i == 1)
        });
        let axis = r.input.get(1).and_then(|axes| g.tensor(axes)?.int64());
        keeps_dims && matches!(axis, Some(2 | -1))
    };
    let eps_value = values(&g.tensor(eps)?)?;
    if mean.input.first() != Some(x)
        || square.input != [d.clone(), d.clone()]
        || !over_time(mean)
        || !over_time(variance)
        || eps_value.len() != 1
    {
        return None;
    }
    // Each node's output goes to the next only (the difference to its square and the Div).
    let d_users: HashSet<usize> = g.consumers.get(d.as_str())?.iter().copied().collect();
    let chain = [m, v, sd, &sqrt.input[0], &div.output[0], &mul.output[0]];
    if d_users != HashSet::from([at(&square.output[0])?, at(&div.output[0])?])
        || chain.iter().any(|t| g.only_user(t).is_none())
        || g.only_user(&square.output[0]).is_none()
    {
        return None;
    }
    let nodes = [
        m,
        d,
        &square.output[0],
        v,
        &sqrt.input[0],
        sd,
        &div.output[0],
        &mul.output[0],
        y,
    ]
    .iter()
    .map(|t| at(t))
    .collect::<Option<Vec<usize>>>()?;
    Some(AdaIn {
        x: x.clone(),
        scale: scale.clone(),
        shift: shift.clone(),
        eps: eps.clone(),
        nodes,
    })
}

/// [`crate::stft`]'s operator for the `STFT` at `i`: a one-sided transform with a frame step
/// and a window given, the frame length (if given) the window's.
fn stft(g: &Graph, i: usize) -> Option<Replacement> {
    let node = &g.nodes[i];
    let [signal, step, window, rest @ ..] = node.input.as_slice() else {
        return None;
    };
    let window_len = g.tensor(window)?.dims;
    let one_sided = node
        .attribute
        .iter()
        .filter_map(|a| Attribute::decode(a.as_slice()).ok())
        .any(|a| a.name == "onesided" && a.i == 1);
    let length_fits = match rest {
        [] => true,
        [length] => window_len == [g.tensor(length)?.int64()?],
        _ => false,
    };
    if !one_sided || !length_fits || window_len.len() != 1 || step.is_empty() {
        return None;
    }
    Some(Replacement {
        at: i,
        nodes: vec![Node {
            input: vec![signal.clone(), step.clone(), window.clone()],
            output: node.output.clone(),
            name: format!("{}_vox", node.name),
            op_type: crate::stft::NAME.into(),
            attribute: Vec::new(),
            domain: DOMAIN.into(),
        }],
        removed: vec![i],
    })
}

/// The `AttributeProto` fields the rewrites read and write (the others are skipped when read).
#[derive(Clone, PartialEq, Message)]
struct Attribute {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(int64, tag = "3")]
    i: i64,
    #[prost(bytes = "vec", tag = "4")]
    s: Vec<u8>,
    #[prost(int64, repeated, tag = "8")]
    ints: Vec<i64>,
    /// `AttributeProto.type`: [`ATTRIBUTE_INT`] for the integers written.
    #[prost(int32, tag = "20")]
    r#type: i32,
}

/// `AttributeProto.type` of an integer.
const ATTRIBUTE_INT: i32 = 2;

fn casts_to_float(cast: &Node) -> bool {
    cast.attribute.iter().any(|a| {
        Attribute::decode(a.as_slice()).is_ok_and(|a| a.name == "to" && a.i == FLOAT as i64)
    })
}

/// What a [`Weight`] is made as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum WeightKind {
    /// Float, `(q - zero) × scale`, in the 8-bit weights' shape.
    Float,
    /// The unsigned 8-bit weights as they are, `[out channels, in channels × kernel]` (a
    /// `MatMulInteger`'s left side).
    Rows,
}

/// A convolution's weights made from its 8-bit ones.
#[derive(Clone)]
struct Weight {
    name: String,
    kind: WeightKind,
    /// The 8-bit weights, their zero points (none: 0) and scales (for `Float`), all
    /// initialisers.
    q: String,
    zero: Option<String>,
    scale: Option<String>,
    dims: Vec<i64>,
}

impl Weight {
    fn header(&self) -> Tensor {
        Tensor {
            dims: self.dims.clone(),
            data_type: if self.kind == WeightKind::Float {
                FLOAT
            } else {
                UINT8
            },
            name: self.name.clone(),
            ..Default::default()
        }
    }

    /// The length of the encoded [`Self::tensor`].
    fn encoded_len(&self) -> usize {
        let values: usize = self.dims.iter().map(|&d| d.max(0) as usize).product();
        let raw = if self.kind == WeightKind::Float {
            4 * values
        } else {
            values
        };
        self.header().encoded_len() + 1 + encoded_len_varint(raw as u64) + raw
    }

    /// The tensor: zero points and scales per output channel (the first dimension) or one for
    /// all (one zero point only for `Rows`); `None` when the initialisers are missing or do not
    /// fit.
    fn tensor(&self, g: &Graph) -> Option<Tensor> {
        let w = g.tensor(&self.q)?;
        if !matches!(w.data_type, INT8 | UINT8) || w.dims.len() < 2 {
            return None;
        }
        let q = values(&w)?;
        let zero = match &self.zero {
            Some(z) => values(&g.tensor(z)?)?,
            None => vec![0.0],
        };
        let channels = w.dims[0].max(1) as usize;
        let fits = |v: &[f32]| v.len() == 1 || v.len() == channels;
        if !fits(&zero) || q.len() % channels != 0 {
            return None;
        }
        let per = q.len() / channels;
        let raw = match self.kind {
            WeightKind::Float => {
                let scale = values(&g.tensor(self.scale.as_ref()?)?)?;
                if w.dims != self.dims || !fits(&scale) {
                    return None;
                }
                let pick = |v: &[f32], o: usize| if v.len() == 1 { v[0] } else { v[o] };
                let mut raw = Vec::with_capacity(q.len() * 4);
                for (k, v) in q.iter().enumerate() {
                    let o = k / per;
                    raw.extend_from_slice(&((v - pick(&zero, o)) * pick(&scale, o)).to_le_bytes());
                }
                raw
            }
            WeightKind::Rows => {
                if w.data_type != UINT8
                    || zero.len() != 1
                    || self.dims != [channels as i64, per as i64]
                {
                    return None;
                }
                q.iter().map(|&v| v as u8).collect()
            }
        };
        Some(Tensor {
            raw_data: raw,
            ..self.header()
        })
    }
}

/// The float bias behind a bias quantised at run time (`Reshape` ← `Cast` ← `Floor` ←
/// `Div(bias, scale)`), and the scale it was divided by.
fn quantised_bias(g: &Graph, name: &str) -> Option<(String, String)> {
    let reshape = g.made_by(name, "Reshape")?;
    let cast = g.made_by(reshape.input.first()?, "Cast")?;
    let floor = g.made_by(cast.input.first()?, "Floor")?;
    let div = g.made_by(floor.input.first()?, "Div")?;
    match div.input.as_slice() {
        [bias, scale] => Some((bias.clone(), scale.clone())),
        _ => None,
    }
}
