//! # kokorotts
//!
//! Text to speech with Kokoro-82M (int8 ONNX on ONNX Runtime) and libespeak-ng phonemes. Each
//! text buffer is one piece of text to speak (a sentence from `llmchat`, a transcript, a file's
//! contents); it is split into sentences and clauses, and each sentence's audio is pushed as
//! soon as it is synthesised, before the next one is started. Kokoro's ~250 ms of silence before
//! each piece is cut to 20 ms (it would be heard as latency). Output buffers are contiguous,
//! starting at the text's PTS (or where the previous audio ended, if later).
//!
//! Bus messages: `vox-tts-first-audio` (`time-to-first-audio` in ns from the text's arrival,
//! `synthesis-time` of that first piece, `pts`) when a text's first audio is pushed, and `vox-tts-done` (`audio-duration`,
//! `synthesis-time`, `sentences`) when it is finished. Flushing drops queued text and stops the
//! synthesis in flight after the current chunk.
//!
//! `first-words`: when none of the stream's audio is playing (its start, or after the speech ran
//! out), a sentence's opening — up to a clause mark or that many words — is spoken on its own,
//! and the rest after it. Kokoro makes a piece's audio all at once, in time proportional to its
//! length, so the first audio comes in about half the time of the whole sentence; the rest is
//! made while the opening plays, in pieces sized to the audio playing (a real-time listener may
//! wait a little between them). A piece that does not end a sentence (such an opening, or a
//! clause from `llmchat first-clause`) has its trailing silence cut to a breath (100 ms;
//! Kokoro's own ~400 ms is a sentence's pause).
//!
//! Text after a `vox-turn` event with `state=tentative` (from `llmchat`, answering a transcript
//! whisperstt sent ahead of the end of the caller's turn) is a reply ahead: it is synthesised at
//! once, and its audio held until an out-of-band `vox-turn` confirms the turn; one that
//! withdraws it drops the text and stops its synthesis. Its `time-to-first-audio` counts from
//! the confirmation when that came after the text. The first audio of each reply (the text
//! after a `vox-turn` event) has the MARKER flag, so that downstream can tell a reply's start
//! from a gap inside one.
//!
//! With `url` set to a speech service (OpenAI's audio API, e.g. `vox serve tts`), each sentence
//! is spoken there instead and its audio pushed as it streams in (24 kHz PCM); no model is
//! loaded. A service fault costs that sentence, with a warning naming the cause, never the
//! pipeline: `timeout-ms`, `retries` with back-off, and a circuit breaker, as in whisperstt.
//!
//! ```sh
//! echo "Hello there. How are you today?" > hello.txt
//! gst-launch-1.0 filesrc location=hello.txt blocksize=1048576 ! text/x-raw,format=utf8 ! \
//!     kokorotts voice=jf_alpha ! audioconvert ! wavenc ! filesink location=hello.wav
//! ```

use crossbeam_channel::Receiver;
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use crate::engine::{
    Kokoro, SAMPLE_RATE, trim_leading_silence, trim_trailing_silence, words_within,
};
use crate::phonemes::{self, Vocab};
use crate::rewrite::Options;
use crate::voices::{self, Voice};
use ort::session::RunOptions;
use vox_common::events::{Decisions, TurnMark, TurnState};
use vox_common::remote::{Remote, RemoteError};
use vox_common::worker::{Serial, Work};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "kokorotts",
        gst::DebugColorFlags::empty(),
        Some("Kokoro text to speech"),
    )
});

const DEFAULT_MODEL: &str = "kokoro";
const DEFAULT_VOICES: &str = "kokoro-voices";
const DEFAULT_VOCAB: &str = "kokoro-vocab";
const DEFAULT_VOICE: &str = "jf_alpha";
const DEFAULT_LANGUAGE: &str = "en-us";
const DEFAULT_SPEED: f32 = 1.0;
const DEFAULT_THREADS: u32 = 2;
const DEFAULT_FIRST_WORDS: u32 = 0;

#[derive(Debug, Clone)]
struct Settings {
    model: String,
    voices: String,
    vocab: String,
    voice: String,
    language: String,
    speed: f32,
    threads: u32,
    int8_convolutions: bool,
    float_convolutions: bool,
    fused_operators: bool,
    first_words: u32,
    service: vox_common::remote::Settings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.into(),
            voices: DEFAULT_VOICES.into(),
            vocab: DEFAULT_VOCAB.into(),
            voice: DEFAULT_VOICE.into(),
            language: DEFAULT_LANGUAGE.into(),
            speed: DEFAULT_SPEED,
            threads: DEFAULT_THREADS,
            int8_convolutions: true,
            float_convolutions: true,
            fused_operators: true,
            first_words: DEFAULT_FIRST_WORDS,
            service: Default::default(),
        }
    }
}

/// Where speech is made: the model in-process, or a speech service.
enum Synth {
    Local(Loaded),
    Remote {
        remote: Remote,
        voice: String,
        speed: f32,
    },
}

/// What the worker needs, loaded at start.
struct Loaded {
    model: Arc<Kokoro>,
    voice: Voice,
    vocab: Vocab,
    language: String,
    speed: f32,
}

struct Job {
    text: String,
    pts: Option<gst::ClockTime>,
    arrived: Instant,
    /// The id of the reply ahead this text belongs to: its audio waits for the turn's
    /// confirmation.
    tentative: Option<u64>,
    /// The first text of a reply (after a `vox-turn` event): its first buffer has the MARKER
    /// flag.
    first_of_turn: bool,
}

pub struct KokoroTts {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    settings: Mutex<Settings>,
    loaded: Mutex<Option<Arc<Synth>>>,
    /// The synthesis worker; a flush drops queued text and stops the synthesis in flight.
    serial: Serial<Job>,
    /// Where the next audio buffer starts.
    next_pts: Mutex<Option<gst::ClockTime>>,
    /// When the audio pushed so far will have played, at real-time pace from its push: the
    /// deadline of the next piece's synthesis.
    audio_until: Mutex<Option<Instant>>,
    /// The synthesis in flight, which a flush terminates (ONNX Runtime stops between nodes).
    running: Mutex<Option<Arc<RunOptions>>>,
    /// The reply ahead the text arriving now belongs to (set by serialized `vox-turn` events).
    tentative: Mutex<Option<u64>>,
    /// A `vox-turn` event came and no text since: the next text begins a reply.
    turn_began: std::sync::atomic::AtomicBool,
    /// The reply ahead being spoken, whose synthesis a withdrawal terminates.
    speaking_ahead: Mutex<Option<u64>>,
    /// Replies ahead confirmed or withdrawn.
    decisions: Decisions,
}

fn audio_caps() -> gst::Caps {
    gst::Caps::builder("audio/x-raw")
        .field("format", "F32LE")
        .field("layout", "interleaved")
        .field("rate", SAMPLE_RATE as i32)
        .field("channels", 1i32)
        .build()
}

fn samples_to_time(n: u64) -> gst::ClockTime {
    gst::ClockTime::from_nseconds(n * 1_000_000_000 / u64::from(SAMPLE_RATE))
}

impl KokoroTts {
    /// When the audio pushed so far will have played, if some of it is still playing.
    fn playing_until(&self) -> Option<Instant> {
        self.audio_until
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .filter(|until| *until > Instant::now())
    }

    fn settings(&self) -> Settings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn load(&self) -> Result<Synth, String> {
        let s = self.settings();
        if let Some(remote) = s.service.remote()? {
            gst::info!(CAT, imp = self, "speaking on {}", remote.endpoint(""));
            return Ok(Synth::Remote {
                remote,
                voice: s.voice,
                speed: s.speed,
            });
        }
        let resolve =
            |name: &str, kind| vox_common::models::resolve(name, kind).map_err(|e| e.to_string());
        let vocab_path = resolve(&s.vocab, vox_common::models::ModelKind::Vocab)?;
        let vocab = Vocab::load(&vocab_path).map_err(|e| e.to_string())?;
        let voices_path = resolve(&s.voices, vox_common::models::ModelKind::Voices)?;
        let voice = voices::load(&voices_path, &s.voice).map_err(|e| e.to_string())?;
        // Starts espeak-ng and checks the language now, not at the first sentence.
        phonemes::phonemise("test", &s.language).map_err(|e| e.to_string())?;
        let model = Kokoro::shared(
            &s.model,
            s.threads as usize,
            Options {
                int8_convs: s.int8_convolutions,
                float_convs: s.float_convolutions,
                snake: s.fused_operators,
                stft: s.fused_operators,
            },
        )
        .map_err(|e| e.to_string())?;
        Ok(Synth::Local(Loaded {
            model,
            voice,
            vocab,
            language: s.language,
            speed: s.speed,
        }))
    }

    fn start_worker(&self) -> Result<(), gst::ErrorMessage> {
        let loaded = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| gst::error_msg!(gst::CoreError::StateChange, ("model not loaded")))?;
        let element = self.obj().downgrade();
        self.serial
            .start("kokorotts", move |rx| worker_loop(element, loaded, rx))
            .map_err(|e| gst::error_msg!(gst::CoreError::Thread, ("cannot start worker: {}", e)))
    }

    fn sink_chain(
        &self,
        _pad: &gst::Pad,
        buffer: gst::Buffer,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
        let text = match std::str::from_utf8(map.as_slice()) {
            Ok(t) => t.to_string(),
            Err(_) => {
                gst::warning!(CAT, imp = self, "text buffer is not valid UTF-8");
                String::from_utf8_lossy(map.as_slice()).into_owned()
            }
        };
        if text.trim().is_empty() {
            return Ok(gst::FlowSuccess::Ok);
        }
        let job = Job {
            text,
            pts: buffer.pts(),
            arrived: Instant::now(),
            tentative: *self.tentative.lock().unwrap_or_else(|p| p.into_inner()),
            first_of_turn: self
                .turn_began
                .swap(false, std::sync::atomic::Ordering::SeqCst),
        };
        if self.serial.queue(job) {
            Ok(gst::FlowSuccess::Ok)
        } else {
            Err(gst::FlowError::Flushing)
        }
    }

    /// Stops the synthesis in flight (ONNX Runtime stops between nodes).
    fn terminate_running(&self) {
        if let Some(run) = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = run.terminate();
        }
    }

    fn sink_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        use gst::EventView;
        if let Some(mark) = TurnMark::from_event(&event) {
            let mut tentative = self.tentative.lock().unwrap_or_else(|p| p.into_inner());
            if matches!(mark.state, TurnState::Tentative | TurnState::Final) {
                self.turn_began
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            match mark.state {
                TurnState::Tentative => *tentative = Some(mark.id),
                TurnState::Final => *tentative = None,
                TurnState::Confirmed => self.decisions.decide(mark.id, true),
                TurnState::Withdrawn => {
                    self.decisions.decide(mark.id, false);
                    let speaking = *self
                        .speaking_ahead
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if speaking == Some(mark.id) {
                        self.terminate_running();
                    }
                }
            }
            return true;
        }
        match event.view() {
            EventView::FlushStart(_) => {
                self.serial.bump();
                self.terminate_running();
                self.srcpad.push_event(event)
            }
            EventView::FlushStop(_) => {
                let _push = self
                    .serial
                    .push_lock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                *self.next_pts.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *self.audio_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *self.tentative.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.srcpad.push_event(event)
            }
            EventView::Caps(_) => {
                let caps = gst::event::Caps::new(&audio_caps());
                self.serial.forward(&self.srcpad, caps)
            }
            _ if event.is_serialized() => self.serial.forward(&self.srcpad, event),
            _ => gst::Pad::event_default(pad, Some(&*self.obj()), event),
        }
    }

    /// Pushes one chunk of audio; returns its flow result.
    fn push_audio(
        &self,
        samples: &[f32],
        pts: gst::ClockTime,
        discont: bool,
        reply_start: bool,
    ) -> bool {
        let bytes: Vec<u8> = samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        let mut buffer = gst::Buffer::from_mut_slice(bytes);
        {
            let b = buffer.get_mut().expect("new buffer");
            b.set_pts(pts);
            b.set_duration(samples_to_time(samples.len() as u64));
            if discont {
                b.set_flags(gst::BufferFlags::DISCONT);
            }
            if reply_start {
                b.set_flags(gst::BufferFlags::MARKER);
            }
        }
        match self.srcpad.push(buffer) {
            Ok(_) => true,
            Err(gst::FlowError::Flushing) | Err(gst::FlowError::Eos) => false,
            Err(err) => {
                gst::element_imp_error!(
                    self,
                    gst::StreamError::Failed,
                    ("cannot push audio: {:?}", err)
                );
                false
            }
        }
    }

    fn post(&self, structure: gst::Structure) {
        let _ = self.obj().post_message(
            gst::message::Element::builder(structure)
                .src(&*self.obj())
                .build(),
        );
    }
}

/// Silence kept before the first sound of each piece (Kokoro's own is ~250 ms).
const LEAD: f32 = 0.02;
/// Silence kept after a piece that does not end a sentence (Kokoro's own is ~400 ms).
const BREATH: f32 = 0.1;
/// With `first-words`, a sentence's rest that would leave the listener waiting longer than this
/// (for want of audio) is split once more: a pause this long is better than another seam.
const PAUSE_OK: f32 = 0.3;
/// A piece that goes on from audio still playing is needed when that audio ends (plus
/// [`PAUSE_OK`]), so it must start that long before it is needed that it takes to make: its
/// deadline on the cores, which is often already past, and then earlier than the first words of
/// another stream, which are due when asked. The listener's sentence goes on before another
/// caller's first words; a caller who waits a second longer for the answer's start is better off
/// than one who hears it stop for two or three seconds in the middle (measured with two calls on
/// 2 cores, when the rest of the first sentence gave way). It goes ahead of first words asked at
/// most this long before it, so that a long answer, always behind, does not starve the others.
const GO_ON_AHEAD: std::time::Duration = std::time::Duration::from_secs(1);

/// The deadline on the cores of a piece of `words` words: now with nothing playing (first
/// words), else when it must start to be ready as the audio playing ends (see [`GO_ON_AHEAD`]).
fn piece_deadline(imp: &KokoroTts, loaded: &Loaded, words: usize) -> Instant {
    let now = Instant::now();
    let Some(until) = imp.playing_until() else {
        return now;
    };
    let making = crate::engine::compute_for(words, loaded.model.real_time_factor(), loaded.speed);
    let needed = until + std::time::Duration::from_secs_f32(PAUSE_OK);
    let start_by = needed
        .checked_sub(std::time::Duration::from_secs_f32(making))
        .unwrap_or(now);
    start_by.max(now.checked_sub(GO_ON_AHEAD).unwrap_or(now))
}

/// Speaks one job sentence by sentence, pushing each sentence's audio before synthesising the
/// next (with a speech service, as it streams in). Stops early when the generation changes
/// (flush).
fn speak(imp: &KokoroTts, synth: &Synth, job: Job, generation: u64) {
    let cancelled = || {
        imp.serial.generation() != generation
            || job.tentative.is_some_and(|id| imp.decisions.withdrawn(id))
    };
    *imp.speaking_ahead.lock().unwrap_or_else(|p| p.into_inner()) = job.tentative;
    let mut out = Output {
        first_audio: true,
        total: 0,
    };
    let mut sentences = 0u32;
    let started = Instant::now();
    let first_words = imp.settings().first_words as usize;
    for sentence in vox_common::text::sentences(&job.text) {
        let mut rest = sentence;
        // The fewest words the next piece has: the opening's, then twice the piece before (a
        // sentence is said in few pieces however far behind the stream is).
        let mut least = first_words;
        loop {
            let split = piece_words(imp, synth, least, &rest)
                .and_then(|words| vox_common::text::opening(&rest, words));
            let (piece, more) = match split {
                Some((head, tail)) => (head, Some(tail)),
                None => (std::mem::take(&mut rest), None),
            };
            if !speak_piece(imp, synth, &job, &piece, &mut out, &cancelled) {
                return;
            }
            least = 2 * piece.split_whitespace().count();
            match more {
                Some(tail) => rest = tail,
                None => break,
            }
        }
        sentences += 1;
    }
    imp.post(
        gst::Structure::builder("vox-tts-done")
            .field("audio-duration", samples_to_time(out.total).nseconds())
            .field("synthesis-time", started.elapsed().as_nanos() as u64)
            .field("sentences", sentences)
            .build(),
    );
}

/// With `first-words` (`least` is then its value, or more for a later piece of a sentence),
/// how many words the next piece of `rest` (of a sentence) may have, or `None` to speak it
/// whole: with nothing playing, `least`; with audio playing, as many words as Kokoro can make
/// before that audio runs out (plus [`PAUSE_OK`]), and no fewer than `least`.
fn piece_words(imp: &KokoroTts, synth: &Synth, least: usize, rest: &str) -> Option<usize> {
    if least == 0 {
        return None;
    }
    let Some(until) = imp.playing_until() else {
        return Some(least);
    };
    let playing = until
        .saturating_duration_since(Instant::now())
        .as_secs_f32();
    let Synth::Local(loaded) = synth else {
        // A speech service's pace is unknown: its sentences go whole.
        return None;
    };
    let fit = words_within(
        playing + PAUSE_OK,
        loaded.model.real_time_factor(),
        loaded.speed,
    );
    (rest.split_whitespace().count() > fit).then_some(fit.max(least))
}

/// One sentence, or a part of one (its trailing silence cut to a breath); false when the job
/// is to stop.
fn speak_piece(
    imp: &KokoroTts,
    synth: &Synth,
    job: &Job,
    sentence: &str,
    out: &mut Output,
    cancelled: &impl Fn() -> bool,
) -> bool {
    let part = !vox_common::text::ends_sentence(sentence);
    let (remote, voice, speed) = match synth {
        Synth::Local(loaded) => {
            return speak_local(imp, loaded, job, sentence, part, out, cancelled);
        }
        Synth::Remote {
            remote,
            voice,
            speed,
        } => (remote, voice, *speed),
    };
    let synthesis = Instant::now();
    // A part of a sentence is short: it is gathered whole so that its tail can be cut.
    let mut gathered = Vec::new();
    let result = crate::remote::speak(remote, sentence, voice, speed, cancelled, |audio| {
        if part {
            gathered.extend_from_slice(audio);
            true
        } else {
            out.push(imp, job, audio, synthesis.elapsed(), cancelled)
        }
    });
    if part && result.is_ok() {
        trim_trailing_silence(&mut gathered, BREATH);
        if !out.push(imp, job, &gathered, synthesis.elapsed(), cancelled) {
            return false;
        }
    }
    match result {
        Ok(()) => !cancelled(),
        Err(RemoteError::Cancelled) => false,
        // A service fault costs this sentence, never the stream.
        Err(e) => {
            gst::element_imp_warning!(
                imp,
                gst::ResourceError::Read,
                ("speech service failed on {:?}: {}", sentence, e)
            );
            !cancelled()
        }
    }
}

/// One sentence with the model in-process, chunk by chunk, the last one's trailing silence cut
/// to a breath when it is a `part` of a sentence; false when the job is to stop.
fn speak_local(
    imp: &KokoroTts,
    loaded: &Loaded,
    job: &Job,
    sentence: &str,
    part: bool,
    out: &mut Output,
    cancelled: &impl Fn() -> bool,
) -> bool {
    let chunks = match phonemes::chunks(sentence, &loaded.language, &loaded.vocab) {
        Ok(c) => c,
        Err(e) => {
            gst::element_imp_warning!(imp, gst::StreamError::Failed, ("{}", e));
            return true;
        }
    };
    let last = chunks.len().saturating_sub(1);
    // Words per chunk, for the time each takes to make.
    let words = sentence.split_whitespace().count().div_ceil(last + 1);
    for (i, chunk) in chunks.into_iter().enumerate() {
        if cancelled() {
            return false;
        }
        let style = loaded.voice.style(chunk.ids.len());
        let synthesis = Instant::now();
        let run = match RunOptions::new() {
            Ok(r) => Arc::new(r),
            Err(e) => {
                gst::element_imp_warning!(imp, gst::CoreError::Failed, ("{}", e));
                return false;
            }
        };
        *imp.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(run.clone());
        if cancelled() {
            return false;
        }
        let deadline = piece_deadline(imp, loaded, words);
        let asked = Instant::now();
        let playing = imp.playing_until();
        let result = loaded.model.synthesise_with(
            &chunk.ids,
            style,
            loaded.speed,
            &run,
            deadline,
            cancelled,
        );
        *imp.running.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Where a gap in the voice comes from: GST_DEBUG=kokorotts:5.
        let ms = |from: Instant, to: Instant| -> i128 {
            to.saturating_duration_since(from).as_millis() as i128
                - from.saturating_duration_since(to).as_millis() as i128
        };
        gst::debug!(
            CAT,
            imp = imp,
            "piece of {words} words: {} ms of audio left when asked, due in {} ms, made in {} ms \
             with the wait for the cores (alone: ~{} ms), ready {} ms before the audio ran out",
            playing.map_or(0, |u| ms(asked, u)),
            ms(asked, deadline),
            asked.elapsed().as_millis(),
            (crate::engine::compute_for(words, loaded.model.real_time_factor(), loaded.speed)
                * 1000.0) as u64,
            playing.map_or(0, |u| ms(Instant::now(), u)),
        );
        let audio = match result {
            Ok(mut a) => {
                trim_leading_silence(&mut a, LEAD);
                if part && i == last {
                    trim_trailing_silence(&mut a, BREATH);
                }
                a
            }
            Err(_) if cancelled() => return false,
            Err(e) => {
                // One bad sentence never stops the stream.
                gst::element_imp_warning!(
                    imp,
                    gst::StreamError::Failed,
                    ("cannot speak {:?}: {}", sentence, e)
                );
                return true;
            }
        };
        gst::debug!(
            CAT,
            imp = imp,
            "{} ids → {} samples: {}",
            chunk.ids.len(),
            audio.len(),
            chunk.phonemes
        );
        if !out.push(imp, job, &audio, synthesis.elapsed(), cancelled) {
            return false;
        }
    }
    true
}

/// A job's audio as it goes out.
struct Output {
    first_audio: bool,
    /// Samples pushed.
    total: u64,
}

impl Output {
    /// Pushes `audio` after what went before (posting the first audio's message); false when
    /// the job is to stop (flushing, or downstream refused).
    fn push(
        &mut self,
        imp: &KokoroTts,
        job: &Job,
        audio: &[f32],
        synthesis_took: std::time::Duration,
        cancelled: &impl Fn() -> bool,
    ) -> bool {
        if audio.is_empty() {
            return true;
        }
        // A reply ahead is heard once its turn is confirmed.
        let mut since = job.arrived;
        if let Some(id) = job.tentative {
            match imp.decisions.wait(id, cancelled) {
                Some((true, at)) => since = since.max(at),
                _ => return false,
            }
        }
        let _push = imp
            .serial
            .push_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if cancelled() {
            return false;
        }
        let (pts, discont) = {
            let mut next = imp.next_pts.lock().unwrap_or_else(|p| p.into_inner());
            let pts = match (*next, job.pts) {
                (Some(n), Some(p)) => n.max(p),
                (Some(n), None) => n,
                (None, p) => p.unwrap_or(gst::ClockTime::ZERO),
            };
            let discont = *next != Some(pts);
            *next = Some(pts + samples_to_time(audio.len() as u64));
            (pts, discont)
        };
        if !imp.push_audio(audio, pts, discont, job.first_of_turn && self.first_audio) {
            return false;
        }
        {
            let mut until = imp.audio_until.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let from = until.map_or(now, |u| u.max(now));
            *until = Some(from + std::time::Duration::from(samples_to_time(audio.len() as u64)));
        }
        self.total += audio.len() as u64;
        if std::mem::take(&mut self.first_audio) {
            imp.post(
                gst::Structure::builder("vox-tts-first-audio")
                    .field("time-to-first-audio", since.elapsed().as_nanos() as u64)
                    .field("synthesis-time", synthesis_took.as_nanos() as u64)
                    .field("pts", pts.nseconds())
                    .build(),
            );
        }
        true
    }
}

fn worker_loop(
    element: glib::WeakRef<super::KokoroTtsElement>,
    loaded: Arc<Synth>,
    rx: Receiver<Work<Job>>,
) {
    for work in rx {
        let Some(obj) = element.upgrade() else { return };
        let imp = obj.imp();
        match work {
            Work::Stop => return,
            Work::Event(event, generation) => imp.serial.push_event(&imp.srcpad, event, generation),
            Work::Job(job, generation) => {
                if generation == imp.serial.generation() {
                    speak(imp, &loaded, job, generation);
                }
            }
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for KokoroTts {
    const NAME: &'static str = "GstKokoroTts";
    type Type = super::KokoroTtsElement;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let templ = klass.pad_template("sink").expect("sink template");
        let sinkpad = gst::Pad::builder_from_template(&templ)
            .chain_function(|pad, parent, buffer| {
                KokoroTts::catch_panic_pad_function(
                    parent,
                    || Err(gst::FlowError::Error),
                    |imp| imp.sink_chain(pad, buffer),
                )
            })
            .event_function(|pad, parent, event| {
                KokoroTts::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.sink_event(pad, event),
                )
            })
            .build();
        let templ = klass.pad_template("src").expect("src template");
        let srcpad = gst::Pad::builder_from_template(&templ).build();
        Self {
            sinkpad,
            srcpad,
            settings: Mutex::new(Settings::default()),
            loaded: Mutex::new(None),
            serial: Serial::default(),
            next_pts: Mutex::new(None),
            audio_until: Mutex::new(None),
            running: Mutex::new(None),
            tentative: Mutex::new(None),
            turn_began: std::sync::atomic::AtomicBool::new(false),
            speaking_ahead: Mutex::new(None),
            decisions: Decisions::default(),
        }
    }
}

impl ObjectImpl for KokoroTts {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("Kokoro model: a name from `vox models list` or a path to an .onnx file")
                    .default_value(Some(DEFAULT_MODEL))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("voices")
                    .nick("Voices file")
                    .blurb("Voices: a name from `vox models list` or a path to an .npz of [510,1,256] styles")
                    .default_value(Some(DEFAULT_VOICES))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("vocab")
                    .nick("Vocabulary")
                    .blurb("Phoneme vocabulary: a name from `vox models list` or a path to vocab.json")
                    .default_value(Some(DEFAULT_VOCAB))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("voice")
                    .nick("Voice")
                    .blurb("Voice name in the voices file (jf_alpha, jf_gongitsune, jf_nezumi, jf_tebukuro, jm_kumo; af_heart etc. with kokoro-onnx's English file)")
                    .default_value(Some(DEFAULT_VOICE))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("language")
                    .nick("Language")
                    .blurb("espeak-ng language used for phonemes (en-us, en-gb, ...)")
                    .default_value(Some(DEFAULT_LANGUAGE))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecFloat::builder("speed")
                    .nick("Speed")
                    .blurb("Speaking rate (1 = normal)")
                    .minimum(0.5)
                    .maximum(2.0)
                    .default_value(DEFAULT_SPEED)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("threads")
                    .nick("Threads")
                    .blurb("ONNX Runtime threads for synthesis")
                    .minimum(1)
                    .maximum(64)
                    .default_value(DEFAULT_THREADS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("int8-convolutions")
                    .nick("8-bit convolutions")
                    .blurb("Run an int8 model's convolutions as ONNX Runtime's 8-bit matrix products (MatMulInteger: the CPU's 8-bit dot products) of the model's own 8-bit values, on CPUs with exact 8-bit dot products (x86: AVX512-VNNI or AVX-VNNI): synthesis ~2x as fast as with float-convolutions (a three-sentence reply on 2 cores: 1.41 s against 2.78 s), half the memory, sooner loaded, as intelligible (tiny.en word error rate on 30 sentences: 3.4% against 4.1%); float-convolutions then applies to the convolutions it does not take")
                    .default_value(true)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("float-convolutions")
                    .nick("Float convolutions")
                    .blurb("Run an int8 model's convolutions that int8-convolutions does not take in float with their dequantised weights: 9–13% faster synthesis than the file's graph for ~200 MiB more memory and ~0.5 s more to load; as intelligible (tiny.en word error rate on 30 sentences: 4.1% with the fused operators against 4.5%)")
                    .default_value(true)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("fused-operators")
                    .nick("Fused operators")
                    .blurb("Run the generator's AdaIN + Snake chains and its STFT as our own ONNX Runtime operators: ~24% faster synthesis; the speech differs from the graph's in the last bits (tiny.en word error rate on 30 sentences: 3.4% with all the rewrites, 4.5% with none)")
                    .default_value(true)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("first-words")
                    .nick("First words")
                    .blurb("When none of the stream's audio is playing, speak a sentence's opening (to a clause mark, or this many words) on its own for sooner first audio; 0: whole sentences")
                    .maximum(64)
                    .default_value(DEFAULT_FIRST_WORDS)
                    .mutable_playing()
                    .build(),
            ]
            .into_iter()
            .chain(std::iter::once(
                glib::ParamSpecEnum::builder_with_default("backend", super::Backend::Auto)
                    .nick("Backend")
                    .blurb("local (the model in-process), remote (the speech service at url), or auto: remote when url is set")
                    .mutable_ready()
                    .build(),
            ))
            .chain(vox_common::remote::Settings::param_specs("speech"))
            .collect()
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let string = |default: &str| {
            value
                .get::<Option<String>>()
                .expect("type checked upstream")
                .unwrap_or_else(|| default.into())
        };
        if pspec.name() == "backend" {
            s.service.backend = value
                .get::<super::Backend>()
                .expect("type checked upstream")
                .into();
            return;
        }
        if s.service.set(pspec.name(), value) {
            return;
        }
        match pspec.name() {
            "model" => s.model = string(DEFAULT_MODEL),
            "voices" => s.voices = string(DEFAULT_VOICES),
            "vocab" => s.vocab = string(DEFAULT_VOCAB),
            "voice" => s.voice = string(DEFAULT_VOICE),
            "language" => s.language = string(DEFAULT_LANGUAGE),
            "speed" => s.speed = value.get().expect("type checked upstream"),
            "threads" => s.threads = value.get().expect("type checked upstream"),
            "int8-convolutions" => {
                s.int8_convolutions = value.get().expect("type checked upstream")
            }
            "float-convolutions" => {
                s.float_convolutions = value.get().expect("type checked upstream")
            }
            "fused-operators" => s.fused_operators = value.get().expect("type checked upstream"),
            "first-words" => s.first_words = value.get().expect("type checked upstream"),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings();
        if pspec.name() == "backend" {
            return super::Backend::from(s.service.backend).to_value();
        }
        if let Some(v) = s.service.get(pspec.name()) {
            return v;
        }
        match pspec.name() {
            "model" => s.model.to_value(),
            "voices" => s.voices.to_value(),
            "vocab" => s.vocab.to_value(),
            "voice" => s.voice.to_value(),
            "language" => s.language.to_value(),
            "speed" => s.speed.to_value(),
            "threads" => s.threads.to_value(),
            "int8-convolutions" => s.int8_convolutions.to_value(),
            "float-convolutions" => s.float_convolutions.to_value(),
            "fused-operators" => s.fused_operators.to_value(),
            "first-words" => s.first_words.to_value(),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn constructed(&self) {
        self.parent_constructed();
        let obj = self.obj();
        obj.add_pad(&self.sinkpad).expect("new pad");
        obj.add_pad(&self.srcpad).expect("new pad");
    }
}

impl GstObjectImpl for KokoroTts {}

impl ElementImpl for KokoroTts {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Kokoro text to speech",
                "Filter/Converter/Audio/Text",
                "Speaks text with Kokoro-82M (ONNX) and espeak-ng phonemes, sentence by sentence, \
                 24 kHz mono. Example: gst-launch-1.0 filesrc location=hello.txt blocksize=1048576 ! \
                 text/x-raw,format=utf8 ! kokorotts ! audioconvert ! wavenc ! filesink location=hello.wav",
                "Local Voice AI",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let text = vox_common::TEXT_CAPS
                .parse::<gst::Caps>()
                .expect("valid caps");
            vec![
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &text,
                )
                .expect("valid template"),
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &audio_caps(),
                )
                .expect("valid template"),
            ]
        });
        TEMPLATES.as_ref()
    }

    fn change_state(
        &self,
        transition: gst::StateChange,
    ) -> Result<gst::StateChangeSuccess, gst::StateChangeError> {
        match transition {
            gst::StateChange::NullToReady => match self.load() {
                Ok(l) => *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(l)),
                Err(e) => {
                    self.post_error_message(gst::error_msg!(
                        gst::ResourceError::OpenRead,
                        ("{}", e)
                    ));
                    return Err(gst::StateChangeError);
                }
            },
            gst::StateChange::ReadyToPaused => {
                *self.next_pts.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *self.audio_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
                *self.tentative.lock().unwrap_or_else(|p| p.into_inner()) = None;
                if let Err(err) = self.start_worker() {
                    self.post_error_message(err);
                    return Err(gst::StateChangeError);
                }
            }
            gst::StateChange::PausedToReady => self.serial.stop(),
            _ => {}
        }
        let ret = self.parent_change_state(transition);
        if ret.is_err() && transition == gst::StateChange::ReadyToPaused {
            self.serial.stop();
        }
        if transition == gst::StateChange::ReadyToNull {
            *self.loaded.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        ret
    }
}
