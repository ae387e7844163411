//! Silero VAD v6 on ONNX Runtime (no GStreamer types).
//!
//! Each call scores one chunk (512 samples at 16 kHz, 256 at 8 kHz). As in Silero's own
//! wrapper, the model sees the chunk prefixed with the last 64 (32) samples of the previous one;
//! without that context the probabilities differ. The recurrent state is carried between calls.

use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] vox_common::models::ModelError),
    #[error("cannot load the ONNX Runtime library {path}: {why}")]
    Runtime { path: PathBuf, why: String },
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

const STATE_LEN: usize = 2 * 128;

/// The process's ONNX Runtime environment: loaded once, from the verified library in the models
/// directory (or `$ORT_DYLIB_PATH`). A failure is remembered and reported the same way again.
fn environment() -> Result<&'static ort::environment::Environment> {
    static ENV: OnceLock<std::result::Result<ort::environment::Environment, String>> =
        OnceLock::new();
    let env = ENV.get_or_init(|| {
        let path = vox_common::models::onnxruntime_library().map_err(|e| e.to_string())?;
        let fail = |why: String| {
            Error::Runtime {
                path: path.clone(),
                why,
            }
            .to_string()
        };
        let builder = ort::init_from(&path).map_err(|e| fail(e.to_string()))?;
        builder
            .with_name("vox")
            .build()
            .map_err(|e| fail(e.to_string()))
    });
    env.as_ref().map_err(|e| Error::Environment(e.clone()))
}

/// Model bytes, read and verified once per process and shared by every instance.
fn model_bytes(path: &Path) -> Result<Arc<[u8]>> {
    static CACHE: Mutex<Vec<(PathBuf, Arc<[u8]>)>> = Mutex::new(Vec::new());
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, bytes)) = cache.iter().find(|(p, _)| p == path) {
        return Ok(bytes.clone());
    }
    let bytes: Arc<[u8]> = std::fs::read(path)
        .map_err(|e| Error::Load {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?
        .into();
    cache.push((path.to_path_buf(), bytes.clone()));
    Ok(bytes)
}

pub struct SileroVad {
    session: Session,
    rate: u32,
    chunk: usize,
    context_len: usize,
    input: Tensor<f32>,
    state: Tensor<f32>,
    sr: Tensor<i64>,
}

impl SileroVad {
    /// Loads the model named or pointed to by `model` (`silero-vad` or a path).
    pub fn load(model: &str, rate: u32) -> Result<Self> {
        let path = vox_common::models::resolve(model, vox_common::models::ModelKind::Vad)?;
        Self::load_path(&path, rate)
    }

    pub fn load_path(path: &Path, rate: u32) -> Result<Self> {
        let (chunk, context_len) = match rate {
            16000 => (512, 64),
            8000 => (256, 32),
            other => return Err(Error::Rate(other)),
        };
        let env = environment()?;
        let bytes = model_bytes(path)?;
        let load_err = |e: &dyn std::fmt::Display| Error::Load {
            path: path.to_path_buf(),
            why: e.to_string(),
        };
        let session = Session::builder(env)
            .map_err(|e| load_err(&e))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| load_err(&e))?
            .with_intra_threads(1)
            .map_err(|e| load_err(&e))?
            .with_inter_threads(1)
            .map_err(|e| load_err(&e))?
            .commit_from_memory(&bytes)
            .map_err(|e| load_err(&e))?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        if names != ["input", "state", "sr"] {
            return Err(load_err(&format!(
                "inputs {names:?}, expected [\"input\", \"state\", \"sr\"] (Silero VAD v5/v6)"
            )));
        }
        let infer = |e: ort::Error| Error::Inference(e.to_string());
        let input = Tensor::from_array((
            [1usize, context_len + chunk],
            vec![0f32; context_len + chunk],
        ))
        .map_err(infer)?;
        let state = Tensor::from_array(([2usize, 1, 128], vec![0f32; STATE_LEN])).map_err(infer)?;
        let sr = Tensor::from_array(ndarray::arr0(i64::from(rate))).map_err(infer)?;
        Ok(Self {
            session,
            rate,
            chunk,
            context_len,
            input,
            state,
            sr,
        })
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
        self.input.extract_tensor_mut().1.fill(0.0);
        self.state.extract_tensor_mut().1.fill(0.0);
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
        {
            let (_, data) = self.input.extract_tensor_mut();
            // The last `context_len` samples of the previous call become this call's prefix.
            data.copy_within(self.chunk.., 0);
            data[self.context_len..].copy_from_slice(chunk);
        }
        let infer = |e: ort::Error| Error::Inference(e.to_string());
        let outputs = self
            .session
            .run(ort::inputs![&self.input, &self.state, &self.sr])
            .map_err(infer)?;
        let probability = outputs["output"]
            .try_extract_tensor::<f32>()
            .map_err(infer)?
            .1[0];
        let (_, new_state) = outputs["stateN"]
            .try_extract_tensor::<f32>()
            .map_err(infer)?;
        if new_state.len() != STATE_LEN {
            return Err(Error::Inference(format!(
                "state of {} values, expected {STATE_LEN}",
                new_state.len()
            )));
        }
        let new_state = new_state.to_vec();
        drop(outputs);
        self.state
            .extract_tensor_mut()
            .1
            .copy_from_slice(&new_state);
        Ok(probability)
    }
}
