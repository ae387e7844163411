//! Whisper inference on whisper.cpp (through whisper-rs), with no GStreamer types.
//!
//! One loaded model is shared by every user in the process ([`load`]); each worker owns its
//! own decoding state ([`Engine`]). Times in results are milliseconds from the start of the
//! audio given to [`Engine::transcribe`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use vox_common::worker::runs_at_once;
use whisper_rs::{
    FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters, WhisperState,
};

pub const SAMPLE_RATE: usize = 16_000;
/// whisper.cpp ignores input shorter than 1 s (100 mel frames): shorter utterances are padded.
const MIN_SAMPLES: usize = SAMPLE_RATE * 11 / 10;
/// Silence put between utterances transcribed together.
pub const BATCH_GAP: usize = SAMPLE_RATE * 4 / 10;
/// An utterance in a joined pass whose words end this long before it does is transcribed again
/// alone (see [`cut_short`]): more than a VAD's trailing silence and padding.
const CUT_SHORT_MS: u64 = 2000;
/// In a batch, a word belongs to the utterance that started at most this long before its time:
/// the last word of an utterance is often timed a little after the utterance's end.
const OWNER_LEAD_MS: u64 = 100;
/// Encoder frames per second of audio (1500 frames for the 30 s window).
const FRAMES_PER_SECOND: f64 = 50.0;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Model(#[from] vox_common::models::ModelError),
    #[error("cannot load Whisper model {path}: {why}")]
    Load { path: PathBuf, why: String },
    #[error("Whisper inference failed: {0}")]
    Inference(String),
    #[error("transcription cancelled")]
    Cancelled,
    #[error("speech service: {0}")]
    Service(String),
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    /// ISO code, or "auto" to detect (multilingual models).
    pub language: String,
    pub translate: bool,
    pub threads: u32,
    pub initial_prompt: String,
    /// 1 = greedy, more = beam search of that width.
    pub beam_size: u32,
    /// Sampling temperature: 0 takes the likeliest token; above, tokens are sampled (OpenAI's
    /// `temperature`). No fallback to higher temperatures.
    pub temperature: f32,
    /// Encoder context: -1 sized to the utterance, 0 the full 30 s window, else that many frames.
    pub audio_ctx: i32,
    pub word_timestamps: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            language: "en".into(),
            translate: false,
            threads: default_threads(),
            initial_prompt: String::new(),
            beam_size: 1,
            temperature: 0.0,
            audio_ctx: -1,
            word_timestamps: false,
        }
    }
}

pub fn default_threads() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(2)
        .min(4)
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct WordOut {
    pub start_ms: u64,
    pub end_ms: u64,
    pub text: String,
    pub probability: f32,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SegmentOut {
    pub start_ms: u64,
    pub end_ms: u64,
    pub text: String,
    pub words: Vec<WordOut>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Output {
    pub text: String,
    pub language: String,
    pub segments: Vec<SegmentOut>,
}

/// Loads a model, or returns the copy already loaded in this process. Models stay loaded for
/// the life of the process, so pipelines that come and go (one per file, per session) share one.
pub fn load(path: &Path) -> Result<Arc<WhisperContext>> {
    static MODELS: Mutex<Option<HashMap<PathBuf, Arc<WhisperContext>>>> = Mutex::new(None);
    let mut models = MODELS.lock().unwrap_or_else(|p| p.into_inner());
    let models = models.get_or_insert_with(HashMap::new);
    let key = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    if let Some(ctx) = models.get(&key) {
        return Ok(ctx.clone());
    }
    let mut params = WhisperContextParameters::default();
    params.use_gpu(cfg!(feature = "cuda"));
    // No DTW token timestamps (Whisper's alignment heads): they cost a fifth of every
    // transcription, and the words of a batch go back to their utterances as well by whole
    // segments and the tokens' own times (`cargo bench --bench transcribe_rtf`, 2026-11-29:
    // 1.42-1.49 s against 1.77 s; WER 5.4-8.5% from run to run with either).
    let ctx = WhisperContext::new_with_params(&key, params).map_err(|e| Error::Load {
        path: key.clone(),
        why: format!("{e} (is it a whisper.cpp ggml file?)"),
    })?;
    let ctx = Arc::new(ctx);
    models.insert(key, ctx.clone());
    Ok(ctx)
}

/// Resolves a model name (`tiny.en`) or path, verifies it, and loads it.
pub fn load_model(name_or_path: &str) -> Result<Arc<WhisperContext>> {
    let path = vox_common::models::resolve(name_or_path, vox_common::models::ModelKind::Whisper)?;
    load(&path)
}

/// The process's cores for one transcription on `threads` threads (none to wait for when
/// whisper.cpp runs on the GPU). A transcription is always wanted now: someone has stopped
/// speaking, or a file is waiting.
fn cpu_turn(threads: u32) -> Option<vox_common::cpu::Turn<'static>> {
    (!cfg!(feature = "cuda"))
        .then(|| vox_common::cpu::Cores::global().take(threads as usize, std::time::Instant::now()))
}

/// The encoder context for `samples` of audio (`audio_ctx` = -1): the audio's frames plus a
/// margin, rounded up to 64, at least 256 frames (5 s) and at most the model's window. Measured
/// on tiny.en: windows much tighter than that make Whisper repeat itself or emit garbage on
/// utterances of a second or two; wider ones cost time without changing the text.
pub fn audio_ctx_for(samples: usize, model_ctx: i32) -> i32 {
    let seconds = samples as f64 / SAMPLE_RATE as f64;
    let frames = (seconds * FRAMES_PER_SECOND).ceil() as i32 + 128;
    ((frames + 63) / 64 * 64).max(256).min(model_ctx)
}

/// The most tokens a segment of `samples` of audio may take: more than a speaker can say (about
/// 3 tokens a second is typical), so a decoder that loops stops within seconds of compute.
fn token_budget(samples: usize) -> i32 {
    let seconds = samples as f64 / SAMPLE_RATE as f64;
    (seconds * 8.0).ceil() as i32 + 16
}

/// Whether a single-segment pass in `state` looped: its segment ran to the token `budget` (or
/// to whisper.cpp's own limit, `limit`) and repeats itself as [`collapse_repeats`] removes.
/// Speech that says a phrase twice ends well within the budget.
fn loops(state: &WhisperState, budget: i32, limit: i32) -> bool {
    state.as_iter().any(|s| {
        let text = s.to_str_lossy().unwrap_or_default();
        s.n_tokens() >= budget.min(limit)
            && collapse_repeats(&text).split_whitespace().count() < text.split_whitespace().count()
    })
}

/// Removes decoding loops: a run of three or more words repeated right after itself, or a run
/// of two words repeated three times or more ("and so my fellow Americans, and so my fellow
/// Americans" → once), Whisper's typical failure on short clips. Words are compared without case
/// and punctuation; the first occurrence is kept as written.
pub fn collapse_repeats(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let keys: Vec<String> = words
        .iter()
        .map(|w| {
            w.chars()
                .filter(|c| c.is_alphanumeric())
                .flat_map(char::to_lowercase)
                .collect()
        })
        .collect();
    let mut kept = Vec::with_capacity(words.len());
    let mut i = 0;
    'scan: while i < words.len() {
        for n in (2..=(words.len() - i) / 2).rev() {
            let mut copies = 1;
            while i + (copies + 1) * n <= words.len()
                && keys[i..i + n] == keys[i + copies * n..i + (copies + 1) * n]
            {
                copies += 1;
            }
            if (n >= 3 && copies >= 2) || copies >= 3 {
                kept.extend(&words[i..i + n]);
                i += copies * n;
                continue 'scan;
            }
        }
        kept.push(words[i]);
        i += 1;
    }
    kept.join(" ")
}

/// Segments that are only a non-speech annotation ("[BLANK_AUDIO]", "(music)").
fn is_annotation(text: &str) -> bool {
    let t = text.trim();
    t.is_empty()
        || (t.starts_with('[') && t.ends_with(']'))
        || (t.starts_with('(') && t.ends_with(')'))
        || (t.starts_with('*') && t.ends_with('*'))
}

/// Decoder states (whisper.cpp's caches and compute buffers, tens of MB each) are pooled per
/// model: a transcription takes one and gives it back, so a process holds as many as run at
/// once, not one per element (a live agent has an element per session, mostly idle). At most
/// [`runs_at_once`] run at once: more would only share the same cores (each already runs on
/// `threads` of them), finish later all together, and hold more memory; a transcription beyond
/// that waits for a state.
struct Pool {
    ctx: Arc<WhisperContext>,
    free: Vec<WhisperState>,
    /// States made (free or taken).
    made: usize,
}

static STATES: Mutex<Vec<Pool>> = Mutex::new(Vec::new());
static RETURNED: Condvar = Condvar::new();

/// A state taken from the pool for one transcription; back in the pool when dropped.
struct PooledState<'a> {
    ctx: &'a Arc<WhisperContext>,
    state: Option<WhisperState>,
}

impl<'a> PooledState<'a> {
    /// Whether a state of `ctx` was ever made (the model is known to run).
    fn made(ctx: &Arc<WhisperContext>) -> bool {
        STATES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|p| Arc::ptr_eq(&p.ctx, ctx) && p.made > 0)
    }

    /// A free state of `ctx`'s pool, a new one while fewer than `limit` were made, or else the
    /// next one given back.
    fn take(ctx: &'a Arc<WhisperContext>, limit: usize) -> Result<Self> {
        let mut pools = STATES.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let i = match pools.iter().position(|p| Arc::ptr_eq(&p.ctx, ctx)) {
                Some(i) => i,
                None => {
                    // The entry keeps the context alive, so its address is never reused.
                    pools.push(Pool {
                        ctx: ctx.clone(),
                        free: Vec::new(),
                        made: 0,
                    });
                    pools.len() - 1
                }
            };
            let pool = &mut pools[i];
            if let Some(state) = pool.free.pop() {
                return Ok(Self {
                    ctx,
                    state: Some(state),
                });
            }
            if pool.made < limit {
                pool.made += 1;
                drop(pools);
                return match ctx.create_state() {
                    Ok(state) => Ok(Self {
                        ctx,
                        state: Some(state),
                    }),
                    Err(e) => {
                        let mut pools = STATES.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(p) = pools.iter_mut().find(|p| Arc::ptr_eq(&p.ctx, ctx)) {
                            p.made -= 1;
                        }
                        RETURNED.notify_one();
                        Err(Error::Inference(format!(
                            "cannot create decoder state: {e}"
                        )))
                    }
                };
            }
            pools = RETURNED.wait(pools).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl std::ops::Deref for PooledState<'_> {
    type Target = WhisperState;
    fn deref(&self) -> &WhisperState {
        self.state.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for PooledState<'_> {
    fn deref_mut(&mut self) -> &mut WhisperState {
        self.state.as_mut().expect("held until dropped")
    }
}

impl Drop for PooledState<'_> {
    fn drop(&mut self) {
        let Some(state) = self.state.take() else {
            return;
        };
        let mut pools = STATES.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pools.iter_mut().find(|p| Arc::ptr_eq(&p.ctx, self.ctx)) {
            pool.free.push(state);
        }
        RETURNED.notify_one();
    }
}

pub struct Engine {
    ctx: Arc<WhisperContext>,
}

impl Engine {
    /// An engine on `ctx`; a decoder state is made (or found in the pool) now, so that a model
    /// that cannot run fails here and the first transcription does not wait for it.
    pub fn new(ctx: Arc<WhisperContext>) -> Result<Self> {
        if !PooledState::made(&ctx) {
            drop(PooledState::take(&ctx, 1)?);
        }
        Ok(Self { ctx })
    }

    /// Whisper's parameters, with an encoder context of `window` frames.
    fn params<'a>(
        &self,
        opts: &'a Options,
        window: i32,
        cancelled: impl Fn() -> bool + 'static,
    ) -> FullParams<'a, 'a> {
        let strategy = if opts.beam_size > 1 {
            SamplingStrategy::BeamSearch {
                beam_size: opts.beam_size as i32,
                patience: -1.0,
            }
        } else {
            SamplingStrategy::Greedy { best_of: 1 }
        };
        let mut params = FullParams::new(strategy);
        params.set_n_threads(opts.threads.max(1) as i32);
        params.set_translate(opts.translate);
        params.set_language(Some(self.language(opts)));
        params.set_no_context(true);
        params.set_print_special(false);
        params.set_print_progress(false);
        params.set_print_realtime(false);
        params.set_print_timestamps(false);
        params.set_suppress_blank(true);
        params.set_temperature(opts.temperature);
        params.set_temperature_inc(0.0);
        params.set_token_timestamps(opts.word_timestamps);
        if !opts.initial_prompt.is_empty() {
            params.set_initial_prompt(&opts.initial_prompt);
        }
        params.set_audio_ctx(window);
        params.set_abort_callback_safe::<_, Box<dyn FnMut() -> bool>>(Some(Box::new(move || {
            cancelled()
        })
            as Box<dyn FnMut() -> bool>));
        params
    }

    /// The encoder context for `samples` of audio as `opts.audio_ctx` asks.
    fn window(&self, opts: &Options, samples: usize) -> i32 {
        let model_ctx = self.ctx.model_n_audio_ctx();
        match opts.audio_ctx {
            -1 => audio_ctx_for(samples, model_ctx),
            0 => model_ctx,
            n => n.min(model_ctx),
        }
    }

    /// Runs Whisper over `audio` in `state` with at most `budget` tokens a segment: one
    /// utterance (`single`: one segment) or a batch (segments with token times). On an encoder
    /// window cut to the audio, Whisper sometimes loops: it says the utterance again and again
    /// until the budget ends it (1 of 31 short sentences of our TTS, measured with tiny.en, at
    /// windows of 5-7.7 s for a 3 s sentence; none from 9 s up). For one utterance, such a
    /// pass ([`loops`]) is done again once on twice the window, which costs one more pass only
    /// when it happens, instead of a transcript with half a repeat left after
    /// [`collapse_repeats`].
    /// (A batched pass that reaches the budget is cut back by whisper.cpp to its last timestamp
    /// and goes on from there, so its loops cannot be told this way; the filter takes them.)
    fn run(
        &self,
        state: &mut WhisperState,
        opts: &Options,
        audio: &[f32],
        cancelled: impl Fn() -> bool + Clone + 'static,
        budget: i32,
        single: bool,
    ) -> Result<()> {
        let pass = |state: &mut WhisperState, window: i32| {
            let mut params = self.params(opts, window, cancelled.clone());
            params.set_max_tokens(budget);
            if single {
                params.set_single_segment(true);
            } else {
                params.set_token_timestamps(true);
            }
            state
                .full(params, audio)
                .map_err(|e| Error::Inference(e.to_string()))
        };
        let window = self.window(opts, audio.len());
        let model_ctx = self.ctx.model_n_audio_ctx();
        let _cores = cpu_turn(opts.threads);
        pass(state, window)?;
        // whisper.cpp decodes at most half the text context, less its prompt tokens.
        let limit = self.ctx.model_n_text_ctx() / 2 - 4;
        if single && window < model_ctx && loops(state, budget, limit) && !cancelled() {
            let wider = (window * 2).min(model_ctx);
            log::info!("the decoder looped on a window of {window} frames: again on {wider}");
            pass(state, wider)?;
        }
        Ok(())
    }

    fn language<'a>(&self, opts: &'a Options) -> &'a str {
        if self.ctx.is_multilingual() {
            opts.language.as_str()
        } else {
            "en"
        }
    }

    fn detected_language(&self, state: &WhisperState, opts: &Options) -> String {
        let language = self.language(opts);
        if self.ctx.is_multilingual() && language == "auto" {
            whisper_rs::get_lang_str(state.full_lang_id_from_state())
                .unwrap_or("auto")
                .to_string()
        } else {
            language.to_string()
        }
    }

    /// Transcribes 16 kHz mono audio. `cancelled` is polled during inference.
    pub fn transcribe(
        &mut self,
        samples: &[f32],
        opts: &Options,
        cancelled: impl Fn() -> bool + Clone + 'static,
    ) -> Result<Output> {
        let duration_ms = (samples.len() * 1000 / SAMPLE_RATE) as u64;
        let padded;
        let audio = if samples.len() < MIN_SAMPLES {
            padded = {
                let mut v = samples.to_vec();
                v.resize(MIN_SAMPLES, 0.0);
                v
            };
            &padded[..]
        } else {
            samples
        };
        // One utterance is at most 30 s: one segment, and a token budget that a speaker cannot
        // exceed, so a decoder that starts to loop is cut short.
        let budget = token_budget(samples.len());
        let mut state = PooledState::take(&self.ctx, runs_at_once(opts.threads))?;
        self.run(&mut state, opts, audio, cancelled, budget, true)?;
        let eot = self.ctx.token_eot();
        let mut out = Output {
            language: self.detected_language(&state, opts),
            ..Default::default()
        };
        for segment in state.as_iter() {
            let text = segment
                .to_str_lossy()
                .map_err(|e| Error::Inference(e.to_string()))?
                .trim()
                .to_string();
            if is_annotation(&text) {
                continue;
            }
            let clamp = |cs: i64| ((cs.max(0) as u64) * 10).min(duration_ms);
            let mut seg = SegmentOut {
                start_ms: clamp(segment.start_timestamp()),
                end_ms: clamp(segment.end_timestamp()),
                text,
                words: Vec::new(),
            };
            if opts.word_timestamps {
                for (piece, data) in text_tokens(&segment, eot) {
                    add_token(
                        &mut seg.words,
                        &piece,
                        clamp(data.t0),
                        clamp(data.t1),
                        data.p,
                    );
                }
                seg.words.retain(|w| !w.text.trim().is_empty());
            }
            out.segments.push(seg);
        }
        // A loop can span segments: drop segments that only repeat the previous one, then
        // collapse what remains inside each.
        let mut segments: Vec<SegmentOut> = Vec::with_capacity(out.segments.len());
        for mut seg in std::mem::take(&mut out.segments) {
            seg.text = collapse_repeats(&seg.text);
            let same = |a: &str, b: &str| collapse_repeats(&format!("{a} {b}")) == a;
            match segments.last_mut() {
                Some(prev) if same(&prev.text, &seg.text) => prev.end_ms = seg.end_ms,
                _ => segments.push(seg),
            }
        }
        out.segments = segments;
        out.text = collapse_repeats(
            &out.segments
                .iter()
                .map(|s| s.text.as_str())
                .collect::<Vec<_>>()
                .join(" "),
        );
        Ok(out)
    }

    /// Transcribes several utterances in one pass: they are joined with `BATCH_GAP` of silence
    /// (at most 30 s in all), Whisper sees them with each other's context, and every word is
    /// given back to the utterance its segment, or else its time, falls in. Far fewer encoder
    /// passes than one per utterance, and the accuracy of long-form transcription on short
    /// utterances.
    pub fn transcribe_batch(
        &mut self,
        pieces: &[&[f32]],
        opts: &Options,
        cancelled: impl Fn() -> bool + Clone + 'static,
    ) -> Result<Vec<Output>> {
        let mut joined = Vec::new();
        let mut spans = Vec::with_capacity(pieces.len());
        for (i, p) in pieces.iter().enumerate() {
            if i > 0 {
                joined.resize(joined.len() + BATCH_GAP, 0.0);
            }
            spans.push((joined.len(), p.len()));
            joined.extend_from_slice(p);
        }
        if joined.len() < MIN_SAMPLES {
            joined.resize(MIN_SAMPLES, 0.0);
        }
        let budget = token_budget(joined.len());
        let mut state = PooledState::take(&self.ctx, runs_at_once(opts.threads))?;
        self.run(&mut state, opts, &joined, cancelled.clone(), budget, false)?;
        let ms = |samples: usize| (samples * 1000 / SAMPLE_RATE) as u64;
        // Piece i owns the words timed from OWNER_LEAD_MS before its start to the next's.
        let owner = |t_ms: u64| {
            spans
                .iter()
                .rposition(|&(start, _)| ms(start).saturating_sub(OWNER_LEAD_MS) <= t_ms)
                .unwrap_or(0)
        };
        let mut words: Vec<Vec<WordOut>> = vec![Vec::new(); pieces.len()];
        let mut current = usize::MAX;
        let eot = self.ctx.token_eot();
        for segment in state.as_iter() {
            let seg_text = segment.to_str_lossy().unwrap_or_default().to_string();
            if is_annotation(&seg_text) {
                continue;
            }
            // Whisper usually starts a segment at a pause, with timestamps the model predicted:
            // a segment that lies within one utterance goes to it whole, which is sturdier than
            // per-word times at an utterance's last word. Segments spanning utterances are split
            // word by word.
            let (s0, s1) = (
                (segment.start_timestamp().max(0) as u64) * 10,
                (segment.end_timestamp().max(0) as u64) * 10,
            );
            let whole = segment_owner(&spans, s0, s1);
            for (i, (piece, data)) in text_tokens(&segment, eot).into_iter().enumerate() {
                let (t0, t1) = ((data.t0.max(0) as u64) * 10, (data.t1.max(0) as u64) * 10);
                // A token continuing a word stays with the word's utterance; each segment decides
                // afresh (languages written without spaces have one "word" per segment).
                let starts_word = piece.starts_with(' ') || i == 0 || current == usize::MAX;
                if starts_word {
                    current = whole.unwrap_or_else(|| owner((t0 + t1) / 2));
                }
                let (start, len) = spans[current];
                let rel = |t: u64| t.saturating_sub(ms(start)).min(ms(len));
                add_token(&mut words[current], &piece, rel(t0), rel(t1), data.p);
            }
        }
        let language = self.detected_language(&state, opts);
        drop(state);
        // Each utterance's output, and where its last word ends (ms into it).
        let (mut outputs, ends): (Vec<Output>, Vec<Option<u64>>) = words
            .into_iter()
            .zip(&spans)
            .map(|(mut words, &(_, len))| {
                words.retain(|w| !w.text.trim().is_empty());
                let end = words.iter().map(|w| w.end_ms).max();
                let text = collapse_repeats(
                    &words
                        .iter()
                        .map(|w| w.text.as_str())
                        .collect::<Vec<_>>()
                        .join(" "),
                );
                let segments = if text.is_empty() {
                    Vec::new()
                } else {
                    vec![SegmentOut {
                        start_ms: 0,
                        end_ms: ms(len),
                        text: text.clone(),
                        words: if opts.word_timestamps {
                            words
                        } else {
                            Vec::new()
                        },
                    }]
                };
                let output = Output {
                    text,
                    language: language.clone(),
                    segments,
                };
                (output, end)
            })
            .unzip();
        // The decoder can stop early in a joined pass (an end of text where speech goes on):
        // an utterance it left without words for its last seconds is transcribed again alone.
        for (i, piece) in pieces.iter().enumerate() {
            if cut_short(ends[i], piece.len()) && !cancelled() {
                log::info!(
                    "utterance {i} of a batch cut short ({:?}): transcribed again alone",
                    outputs[i].text
                );
                // A failed second look keeps what the joined pass gave.
                match self.transcribe(piece, opts, cancelled.clone()) {
                    Ok(alone) => outputs[i] = alone,
                    Err(e) => log::warn!("utterance {i} of a batch, alone: {e}"),
                }
            }
        }
        Ok(outputs)
    }
}

/// Whether an utterance of `len` samples (speech by the VAD's account, to within its padding)
/// whose last word in a joined pass ended at `last_word_end` (ms into it; `None`: no word) was
/// left without words for its last [`CUT_SHORT_MS`], or without any when longer than that.
fn cut_short(last_word_end: Option<u64>, len: usize) -> bool {
    let len_ms = (len * 1000 / SAMPLE_RATE) as u64;
    len_ms.saturating_sub(last_word_end.unwrap_or(0)) > CUT_SHORT_MS
}

/// The text tokens of a segment (special and timestamp tokens skipped), with their data.
fn text_tokens(
    segment: &whisper_rs::WhisperSegment<'_>,
    eot: whisper_rs::WhisperTokenId,
) -> Vec<(String, whisper_rs::WhisperTokenData)> {
    (0..segment.n_tokens())
        .filter_map(|i| segment.get_token(i))
        .filter(|t| t.token_id() < eot)
        .map(|t| {
            (
                t.to_str_lossy().unwrap_or_default().to_string(),
                t.token_data(),
            )
        })
        .collect()
}

/// The utterance a segment `[s0, s1)` (ms in the joined audio) lies in: the one whose span
/// (with half the gap on each side) covers at least 80% of it, if any.
fn segment_owner(spans: &[(usize, usize)], s0: u64, s1: u64) -> Option<usize> {
    let ms = |samples: usize| (samples * 1000 / SAMPLE_RATE) as u64;
    let half_gap = ms(BATCH_GAP) / 2;
    let length = s1.saturating_sub(s0).max(1);
    spans.iter().position(|&(start, len)| {
        let (a, b) = (
            ms(start).saturating_sub(half_gap),
            ms(start + len) + half_gap,
        );
        let overlap = s1.min(b).saturating_sub(s0.max(a));
        overlap * 5 >= length * 4
    })
}

/// Adds a token to a word list: a token with a leading space (or the first) starts a word.
fn add_token(words: &mut Vec<WordOut>, piece: &str, t0: u64, t1: u64, p: f32) {
    if piece.starts_with(' ') || words.is_empty() {
        words.push(WordOut {
            start_ms: t0,
            end_ms: t1,
            text: piece.trim_start().to_string(),
            probability: p,
        });
    } else if let Some(w) = words.last_mut() {
        let begun = w.text.chars().any(char::is_alphanumeric);
        w.text.push_str(piece);
        w.end_ms = t1.max(w.end_ms);
        // A word's probability is its letters' least: punctuation around it is a guess about
        // the sentence, not about the word.
        if piece.chars().any(char::is_alphanumeric) {
            w.probability = if begun { w.probability.min(p) } else { p };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_utterance_left_without_words_for_its_last_seconds_was_cut_short() {
        let second = SAMPLE_RATE;
        // Words to within a VAD's trailing silence of the end.
        assert!(!cut_short(Some(9_400), 10 * second));
        assert!(!cut_short(Some(8_200), 10 * second));
        // "Once a", then nothing for 14 s of speech.
        assert!(cut_short(Some(900), 15 * second));
        // No word at all: a short murmur may have none; three seconds of speech may not.
        assert!(!cut_short(None, second));
        assert!(cut_short(None, 3 * second));
    }

    #[test]
    fn a_words_probability_is_its_letters_least() {
        let mut words = Vec::new();
        for (piece, p) in [
            (" \"", 0.2),
            ("Lo", 0.9),
            ("tha", 0.7),
            ("\".", 0.1),
            (" sir", 0.4),
        ] {
            add_token(&mut words, piece, 0, 0, p);
        }
        let got: Vec<_> = words
            .iter()
            .map(|w| (w.text.as_str(), w.probability))
            .collect();
        assert_eq!(got, [("\"Lotha\".", 0.7), ("sir", 0.4)]);
    }

    #[test]
    fn audio_ctx_grows_with_length_and_is_capped() {
        assert_eq!(audio_ctx_for(16_000, 1500), 256);
        assert_eq!(audio_ctx_for(16_000 * 11, 1500), 704);
        assert_eq!(audio_ctx_for(16_000 * 40, 1500), 1500);
    }

    #[test]
    fn repeats_are_collapsed() {
        assert_eq!(
            collapse_repeats("And so, my fellow Americans, and so, my fellow Americans, ask not."),
            "And so, my fellow Americans, ask not."
        );
        assert_eq!(
            collapse_repeats("\"S NOT\" \"S NOT\" \"S NOT\""),
            "\"S NOT\""
        );
        assert_eq!(
            collapse_repeats("go home go home, now"),
            "go home go home, now"
        );
        assert_eq!(collapse_repeats("a b c a b c a b c d"), "a b c d");
        assert_eq!(collapse_repeats("no no no"), "no no no");
        assert_eq!(collapse_repeats(""), "");
    }

    #[test]
    fn annotations_are_recognised() {
        assert!(is_annotation("[BLANK_AUDIO]"));
        assert!(is_annotation(" (music) "));
        assert!(!is_annotation("And so, my fellow Americans"));
    }
}
