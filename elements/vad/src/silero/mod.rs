//! Silero VAD v5/v6 (no GStreamer types).
//!
//! Each call scores one chunk (512 samples at 16 kHz, 256 at 8 kHz). As in Silero's own
//! wrapper, the model sees the chunk prefixed with the last 64 (32) samples of the previous one;
//! without that context the probabilities differ. The recurrent state is carried between calls.
//!
//! Two engines run the same model file: [`native`] (the default: the forward pass in plain
//! Rust, with the weights read from the ONNX file) and [`onnx`] (ONNX Runtime, the reference,
//! used for files whose layout the native engine does not recognise). They agree to about 1e-6.

pub mod native;
pub mod onnx;
pub mod weights;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] vox_common::models::ModelError),
    #[error("cannot load Silero VAD model {path}: {why}")]
    Load { path: PathBuf, why: String },
    #[error("{0}")]
    Environment(String),
    #[error("Silero VAD inference failed: {0}")]
    Inference(String),
    #[error("unsupported sample rate {0}: Silero VAD takes 8000 or 16000 Hz")]
    Rate(u32),
}

pub type Result<T> = std::result::Result<T, Error>;

/// `[h; c]` of the LSTM, 128 values each.
pub(crate) const STATE_LEN: usize = 2 * 128;

/// Which engine runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EngineKind {
    /// Native when the file has the Silero v5/v6 layout, ONNX Runtime otherwise.
    #[default]
    Auto,
    Native,
    OnnxRuntime,
}

enum Engine {
    Native(Box<native::Native>),
    Onnx(Box<onnx::Onnx>),
}

/// The weights for 16 and 8 kHz, or why the native engine cannot read the file.
type Parsed = std::result::Result<Arc<(weights::Weights, weights::Weights)>, String>;

/// Reads and parses a model file once per process: every instance shares its bytes (for ONNX
/// Runtime) and its weights.
fn load_file(path: &Path) -> Result<(Arc<[u8]>, Parsed)> {
    type Entry = (PathBuf, Arc<[u8]>, Parsed);
    static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, bytes, parsed)) = cache.iter().find(|(p, _, _)| p == path) {
        return Ok((bytes.clone(), parsed.clone()));
    }
    let bytes: Arc<[u8]> = std::fs::read(path)
        .map_err(|e| Error::Load {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?
        .into();
    let parsed = weights::parse(&bytes).map(Arc::new);
    cache.push((path.to_path_buf(), bytes.clone(), parsed.clone()));
    Ok((bytes, parsed))
}

pub struct SileroVad {
    engine: Engine,
    rate: u32,
    chunk: usize,
    context_len: usize,
    /// Context followed by the chunk being scored.
    input: Vec<f32>,
    state: Vec<f32>,
}

impl SileroVad {
    /// Loads the model named or pointed to by `model` (`silero-vad` or a path), native engine
    /// where possible.
    pub fn load(model: &str, rate: u32) -> Result<Self> {
        Self::load_with(model, rate, EngineKind::Auto)
    }

    pub fn load_with(model: &str, rate: u32, engine: EngineKind) -> Result<Self> {
        let path = vox_common::models::resolve(model, vox_common::models::ModelKind::Vad)?;
        Self::load_path(&path, rate, engine)
    }

    pub fn load_path(path: &Path, rate: u32, kind: EngineKind) -> Result<Self> {
        let (chunk, context_len) = match rate {
            16000 => (512, 64),
            8000 => (256, 32),
            other => return Err(Error::Rate(other)),
        };
        let (bytes, weights) = load_file(path)?;
        let native = |w: &(weights::Weights, weights::Weights)| {
            let w = if rate == 16000 { &w.0 } else { &w.1 };
            Engine::Native(Box::new(native::Native::new(w)))
        };
        let onnx = || -> Result<Engine> {
            Ok(Engine::Onnx(Box::new(onnx::Onnx::new(
                path,
                &bytes,
                rate,
                context_len + chunk,
            )?)))
        };
        let engine = match (kind, &weights) {
            (EngineKind::Native | EngineKind::Auto, Ok(w)) => native(w),
            (EngineKind::Native, Err(why)) => {
                return Err(Error::Load {
                    path: path.to_path_buf(),
                    why: format!("{why} (engine=onnxruntime runs other layouts)"),
                });
            }
            (EngineKind::Auto, Err(_)) | (EngineKind::OnnxRuntime, _) => onnx()?,
        };
        Ok(Self {
            engine,
            rate,
            chunk,
            context_len,
            input: vec![0.0; context_len + chunk],
            state: vec![0.0; STATE_LEN],
        })
    }

    /// The engine in use: `native` or `onnxruntime`.
    pub fn engine(&self) -> &'static str {
        match self.engine {
            Engine::Native(_) => "native",
            Engine::Onnx(_) => "onnxruntime",
        }
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// Samples per chunk: 512 at 16 kHz, 256 at 8 kHz.
    pub fn chunk_len(&self) -> usize {
        self.chunk
    }

    /// Clears the recurrent state and the context (new stream, flush).
    pub fn reset(&mut self) {
        self.input.fill(0.0);
        self.state.fill(0.0);
    }

    /// Speech probability of one chunk of exactly `chunk_len()` samples.
    pub fn process(&mut self, chunk: &[f32]) -> Result<f32> {
        if chunk.len() != self.chunk {
            return Err(Error::Inference(format!(
                "chunk of {} samples, expected {}",
                chunk.len(),
                self.chunk
            )));
        }
        // The last `context_len` samples of the previous call become this call's prefix.
        self.input.copy_within(self.chunk.., 0);
        self.input[self.context_len..].copy_from_slice(chunk);
        match &mut self.engine {
            Engine::Native(n) => Ok(n.forward(&self.input, &mut self.state)),
            Engine::Onnx(o) => o.forward(&self.input, &mut self.state),
        }
    }
}
