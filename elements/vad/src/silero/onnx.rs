//! Silero VAD on ONNX Runtime (no GStreamer types): the reference engine, and the fallback for
//! model files whose layout the native engine does not know.

use super::{Error, Result};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::Tensor;
use std::path::Path;

const STATE_LEN: usize = super::STATE_LEN;

pub struct Onnx {
    session: Session,
    input: Tensor<f32>,
    state: Tensor<f32>,
    sr: Tensor<i64>,
}

impl Onnx {
    pub fn new(path: &Path, bytes: &[u8], rate: u32, input_len: usize) -> Result<Self> {
        let env = vox_common::onnx::environment().map_err(Error::Environment)?;
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
            .commit_from_memory(bytes)
            .map_err(|e| load_err(&e))?;
        let names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        if names != ["input", "state", "sr"] {
            return Err(load_err(&format!(
                "inputs {names:?}, expected [\"input\", \"state\", \"sr\"] (Silero VAD v5/v6)"
            )));
        }
        let infer = |e: ort::Error| Error::Inference(e.to_string());
        let input =
            Tensor::from_array(([1usize, input_len], vec![0f32; input_len])).map_err(infer)?;
        let state = Tensor::from_array(([2usize, 1, 128], vec![0f32; STATE_LEN])).map_err(infer)?;
        let sr = Tensor::from_array(ndarray::arr0(i64::from(rate))).map_err(infer)?;
        Ok(Self {
            session,
            input,
            state,
            sr,
        })
    }

    /// Speech probability of `input` (context + chunk); `state` is `[h; c]`, updated in place.
    pub fn forward(&mut self, input: &[f32], state: &mut [f32]) -> Result<f32> {
        self.input.extract_tensor_mut().1.copy_from_slice(input);
        self.state.extract_tensor_mut().1.copy_from_slice(state);
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
        state.copy_from_slice(new_state);
        Ok(probability)
    }
}
