//! Kokoro-82M on ONNX Runtime (no GStreamer types): token ids + style + speed → 24 kHz audio.
//! One session per (model file, thread count, rewrites) per process, shared by every element
//! instance.

use crate::rewrite::{self, Options};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{RunOptions, Session};
use ort::value::Tensor;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

pub const SAMPLE_RATE: u32 = 24_000;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] vox_common::models::ModelError),
    #[error("{0}")]
    Runtime(String),
    #[error("cannot load Kokoro model {path}: {why}")]
    Load { path: PathBuf, why: String },
    #[error("Kokoro inference failed: {0}")]
    Inference(String),
    #[error("the synthesis was cancelled")]
    Cancelled,
}

pub struct Kokoro {
    session: Mutex<Session>,
    /// ONNX Runtime's intra-op threads: the cores a synthesis takes.
    threads: usize,
    /// Compute seconds per second of audio made, a moving average (None until measured).
    rtf: Mutex<Option<f32>>,
}

/// The real-time factor assumed before one is measured (2 cores of this project's CI: ~0.4).
const RTF_PRIOR: f32 = 0.5;
/// Seconds of speech per word at speed 1 (measured on English replies: 0.31–0.37).
const SPEECH_PER_WORD: f32 = 0.33;
/// Seconds of silence Kokoro makes around any piece at speed 1 (~0.25 s before, ~0.45 after),
/// which it takes as long to make as speech.
const PIECE_SILENCE: f32 = 0.7;

/// How many words Kokoro can speak in a piece made within `seconds` of compute, at real-time
/// factor `rtf` and `speed`: 0 when even a word's piece takes longer.
pub fn words_within(seconds: f32, rtf: f32, speed: f32) -> usize {
    let audio = seconds / rtf.max(1e-3) * speed;
    ((audio - PIECE_SILENCE) / SPEECH_PER_WORD).max(0.0) as usize
}

/// Seconds of compute a piece of `words` words takes at real-time factor `rtf` and `speed` (the
/// inverse of [`words_within`]).
pub fn compute_for(words: usize, rtf: f32, speed: f32) -> f32 {
    (PIECE_SILENCE + words as f32 * SPEECH_PER_WORD) / speed.max(1e-3) * rtf
}

type Registry = Mutex<Vec<((PathBuf, usize, Options), Arc<Kokoro>)>>;

impl Kokoro {
    /// The shared model named or pointed to by `model`, loaded on first use.
    pub fn shared(model: &str, threads: usize, options: Options) -> Result<Arc<Self>, Error> {
        static MODELS: Registry = Mutex::new(Vec::new());
        let path = vox_common::models::resolve(model, vox_common::models::ModelKind::Tts)?;
        let mut models = MODELS.lock().unwrap_or_else(|p| p.into_inner());
        let key = (path.clone(), threads, options);
        if let Some((_, m)) = models.iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let m = Arc::new(Self::load(&path, threads, options)?);
        models.push((key, m.clone()));
        Ok(m)
    }

    /// Loads the model at `path` for `threads` cores, its graph rewritten as `options` ask
    /// (see [`crate::rewrite`]; 8-bit convolutions only where [`crate::qconv::exact`]).
    pub fn load(path: &Path, threads: usize, options: Options) -> Result<Self, Error> {
        let options = Options {
            int8_convs: options.int8_convs && crate::qconv::exact(),
            ..options
        };
        let env = vox_common::onnx::environment().map_err(Error::Runtime)?;
        let load_err = |e: &dyn std::fmt::Display| Error::Load {
            path: path.to_path_buf(),
            why: e.to_string(),
        };
        let rewritten = if options != Options::NONE {
            let bytes = std::fs::read(path).map_err(|e| load_err(&e))?;
            rewrite::rewrite(&bytes, options).map_err(|e| load_err(&e))?
        } else {
            None
        };
        let mut builder = Session::builder(env)
            .map_err(|e| load_err(&e))?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| load_err(&e))?
            .with_intra_threads(threads.max(1))
            .map_err(|e| load_err(&e))?
            .with_inter_threads(1)
            .map_err(|e| load_err(&e))?;
        if rewritten.as_ref().is_some_and(|r| r.has_operators()) {
            let domain = rewrite::operators().map_err(|e| load_err(&e))?;
            builder = builder.with_operators(domain).map_err(|e| load_err(&e))?;
        }
        let session = match &rewritten {
            Some(r) => builder.commit_from_memory(&r.model),
            None => builder.commit_from_file(path),
        }
        .map_err(|e| load_err(&e))?;
        drop(rewritten);
        let mut names: Vec<&str> = session.inputs().iter().map(|i| i.name()).collect();
        names.sort_unstable();
        if names != ["speed", "style", "tokens"] {
            return Err(load_err(&format!(
                "inputs {names:?}, expected tokens, style and speed (Kokoro v1.0 ONNX)"
            )));
        }
        Ok(Self {
            session: Mutex::new(session),
            threads: threads.max(1),
            rtf: Mutex::new(None),
        })
    }

    /// Compute seconds per second of audio, as measured on this process's syntheses so far.
    pub fn real_time_factor(&self) -> f32 {
        self.rtf
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(RTF_PRIOR)
    }

    /// Audio for one chunk of ids (without the padding zeros, at most 509) in `style`.
    pub fn synthesise(&self, ids: &[i64], style: &[f32], speed: f32) -> Result<Vec<f32>, Error> {
        let run = RunOptions::new().map_err(|e| Error::Inference(e.to_string()))?;
        self.synthesise_with(ids, style, speed, &run, Instant::now(), &|| false)
    }

    /// [`Self::synthesise`] under `run`, which another thread may terminate (a flush). The
    /// audio is needed by `deadline` (now for a reply's first piece; later ones when the audio
    /// before them will have played): the process's cores go to the earliest deadline first.
    /// `cancelled()` ends the wait for them.
    pub fn synthesise_with(
        &self,
        ids: &[i64],
        style: &[f32],
        speed: f32,
        run: &RunOptions,
        deadline: Instant,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Vec<f32>, Error> {
        let infer = |e: ort::Error| Error::Inference(e.to_string());
        let mut padded = Vec::with_capacity(ids.len() + 2);
        padded.push(0);
        padded.extend_from_slice(ids);
        padded.push(0);
        let tokens = Tensor::from_array(([1usize, padded.len()], padded)).map_err(infer)?;
        let style = Tensor::from_array(([1usize, style.len()], style.to_vec())).map_err(infer)?;
        let speed = Tensor::from_array(([1usize], vec![speed])).map_err(infer)?;
        let _cores = vox_common::cpu::Cores::global()
            .take_unless(self.threads, deadline, cancelled)
            .ok_or(Error::Cancelled)?;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let outputs = session
            .run_with_options(
                ort::inputs![
                "tokens" => tokens,
                "style" => style,
                "speed" => speed
                ],
                run,
            )
            .map_err(infer)?;
        let (_, audio) = outputs[0].try_extract_tensor::<f32>().map_err(infer)?;
        if !audio.is_empty() {
            let rtf = started.elapsed().as_secs_f32() * SAMPLE_RATE as f32 / audio.len() as f32;
            let mut average = self.rtf.lock().unwrap_or_else(|p| p.into_inner());
            *average = Some(average.map_or(rtf, |a| 0.7 * a + 0.3 * rtf));
        }
        Ok(audio.to_vec())
    }
}

/// A sample above this is sound (-60 dBFS); below, silence.
const AUDIBLE: f32 = 1e-3;

/// Kokoro starts every piece with about a quarter of a second of silence, heard as that much
/// more latency before each answer: cut it to `lead` seconds before the first sound. The
/// silence at the end makes the pause between sentences (see [`trim_trailing_silence`]).
pub fn trim_leading_silence(audio: &mut Vec<f32>, lead: f32) {
    let Some(onset) = audio.iter().position(|x| x.abs() > AUDIBLE) else {
        return;
    };
    let keep = (lead * SAMPLE_RATE as f32) as usize;
    audio.drain(..onset.saturating_sub(keep));
}

/// Cuts the silence after the last sound of `audio` to `tail` seconds (Kokoro's own is
/// ~0.4–0.7 s: a sentence's pause, too long between a sentence's opening and its rest).
pub fn trim_trailing_silence(audio: &mut Vec<f32>, tail: f32) {
    let Some(last) = audio.iter().rposition(|x| x.abs() > AUDIBLE) else {
        return;
    };
    let keep = (tail * SAMPLE_RATE as f32) as usize;
    audio.truncate((last + 1 + keep).min(audio.len()));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A quarter second of silence, half a second of sound, half a second of silence.
    fn silence_sound_silence() -> Vec<f32> {
        let rate = SAMPLE_RATE as usize;
        let mut audio = vec![0.0f32; rate / 4];
        audio.extend(std::iter::repeat_n(0.5, rate / 2));
        audio.extend(vec![0.0; rate / 2]);
        audio
    }

    #[test]
    fn leading_silence_is_cut_to_the_lead() {
        let rate = SAMPLE_RATE as usize;
        let mut audio = silence_sound_silence();
        trim_leading_silence(&mut audio, 0.02);
        assert_eq!(audio.len(), rate / 50 + rate);
        assert_eq!(audio[rate / 50], 0.5);
        // Sound from the start, and silence only, are left as they are.
        let mut loud = vec![0.5f32; 100];
        trim_leading_silence(&mut loud, 0.02);
        assert_eq!(loud.len(), 100);
        let mut quiet = vec![0.0f32; 100];
        trim_leading_silence(&mut quiet, 0.02);
        assert_eq!(quiet.len(), 100);
    }

    #[test]
    fn words_within_a_compute_budget() {
        // 0.6 s at RTF 0.4 makes 1.5 s of audio: 0.7 s of silence and 2 words.
        assert_eq!(words_within(0.6, 0.4, 1.0), 2);
        // Twice the speed, twice the audio per second of compute.
        assert_eq!(words_within(0.6, 0.4, 2.0), 6);
        assert_eq!(words_within(0.2, 0.4, 1.0), 0);
        assert_eq!(words_within(3.0, 0.4, 1.0), 20);
        // And back: 2 words take 0.54 s at RTF 0.4, a little less than 0.6 s.
        assert!((compute_for(2, 0.4, 1.0) - 0.544).abs() < 1e-3);
        assert_eq!(words_within(compute_for(20, 0.4, 1.0) + 1e-3, 0.4, 1.0), 20);
    }

    #[test]
    fn trailing_silence_is_cut_to_the_tail() {
        let rate = SAMPLE_RATE as usize;
        let mut audio = silence_sound_silence();
        trim_trailing_silence(&mut audio, 0.08);
        assert_eq!(audio.len(), rate / 4 + rate / 2 + rate * 2 / 25);
        // A shorter tail than asked for, and silence only, are left as they are.
        let before = audio.len();
        trim_trailing_silence(&mut audio, 0.5);
        assert_eq!(audio.len(), before);
        let mut quiet = vec![0.0f32; 100];
        trim_trailing_silence(&mut quiet, 0.02);
        assert_eq!(quiet.len(), 100);
    }
}
