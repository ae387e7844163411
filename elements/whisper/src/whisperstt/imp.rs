//! # whisperstt
//!
//! Speech to text with Whisper (whisper.cpp). Audio in (16 kHz mono F32), one text buffer out
//! per utterance: PTS = utterance start, duration = its length, content = the text. Before each
//! buffer a serialized `vox-transcript` custom event carries the structured result (segments,
//! words when `word-timestamps=true`, `partial`), and the same structure is posted as an
//! element message.
//!
//! With `silerovad` upstream, utterances are the spans between its speech-start and speech-end
//! events (silence is never transcribed). When the VAD reports a pause (`speculate-ms`), the
//! utterance is transcribed at once, up to where its end will be: if the end follows with no
//! speech in between, that transcript (of exactly the same audio) goes out the moment the end
//! arrives (marked `ahead`), instead of starting the work then; if speech resumes, it is dropped. Without a VAD, audio is cut every `max-utterance-ms`.
//!
//! With `send-ahead=true`, that transcript goes downstream at once, after a serialized
//! `vox-turn` event (`state=tentative`, `id` counted per stream), so that `llmchat` and
//! `kokorotts` start the reply during the pause and hold its audio; at the end of speech an
//! out-of-band `vox-turn` (`confirmed`) lets it out, and if speech resumes one (`withdrawn`)
//! drops it. The transcript message is posted when the turn is confirmed.
//!
//! Inference runs on a worker thread, never on the streaming thread; the encoder window is sized
//! to each utterance (`audio-ctx=-1`), so a 3 s utterance does not pay for Whisper's 30 s
//! window. All instances in a process share one loaded model.
//!
//! With `url` set to a speech service (OpenAI's audio API, e.g. `vox serve stt`), each utterance
//! is transcribed there instead (a 16 kHz WAV up, `verbose_json` back): no model is loaded. A
//! service fault costs that utterance, with a warning naming the cause, never the pipeline:
//! each request has `timeout-ms`, is retried `retries` times with back-off, and after repeated
//! faults the service is skipped for a while (a circuit breaker). Partial results are not asked
//! of a service.
//!
//! ```sh
//! gst-launch-1.0 -m filesrc location=speech.wav ! decodebin ! audioconvert ! audioresample ! \
//!     audio/x-raw,format=F32LE,rate=16000,channels=1 ! silerovad ! whisperstt ! fakesink
//! ```

use crossbeam_channel::{Receiver, Sender};
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::engine::{self, Engine, Options};
use crate::remote;
use crate::utterance::{Utterance, UtteranceBuffer};
use vox_common::events::{SpeechBoundary, SpeechPause, Transcript, TurnMark, TurnState};
use vox_common::remote::Remote;

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "whisperstt",
        gst::DebugColorFlags::empty(),
        Some("Whisper speech to text"),
    )
});

const DEFAULT_MODEL: &str = vox_common::models::DEFAULT_WHISPER;
const DEFAULT_LANGUAGE: &str = "en";
const DEFAULT_BEAM_SIZE: u32 = 1;
const DEFAULT_MAX_UTTERANCE_MS: u32 = 30_000;
const DEFAULT_AUDIO_CTX: i32 = -1;
const DEFAULT_INTERIM_MS: u32 = 0;
const DEFAULT_LATENCY_MS: u32 = 0;
const DEFAULT_CONTEXT_PAD_MS: u32 = 200;
const DEFAULT_BATCH_MS: u32 = 0;
/// Audio kept before the current position for speech starts that refer back in time.
const LOOKBACK_MS: u64 = 2_000;

#[derive(Debug, Clone)]
struct Settings {
    model: String,
    options: Options,
    max_utterance_ms: u32,
    interim_ms: u32,
    latency_ms: u32,
    context_pad_ms: u32,
    batch_ms: u32,
    send_ahead: bool,
    service: vox_common::remote::Settings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.into(),
            options: Options::default(),
            max_utterance_ms: DEFAULT_MAX_UTTERANCE_MS,
            interim_ms: DEFAULT_INTERIM_MS,
            latency_ms: DEFAULT_LATENCY_MS,
            context_pad_ms: DEFAULT_CONTEXT_PAD_MS,
            batch_ms: DEFAULT_BATCH_MS,
            send_ahead: false,
            service: Default::default(),
        }
    }
}

struct Job {
    utterance: Utterance,
    pts: gst::ClockTime,
    id: u64,
    partial: bool,
}

enum Work {
    /// One utterance, or several transcribed together (batch-ms > 0).
    Transcribe(Vec<Job>, u64),
    /// An utterance whose speech paused: transcribed and held for its end.
    Speculate(Job, u64),
    /// The utterance ended where it paused: the held transcript goes out (or, if none is held
    /// for it, this job is transcribed).
    Commit(Job, u64),
    /// Speech resumed: the held transcript is dropped.
    Discard,
    Event(gst::Event, u64),
    Stop,
}

struct Worker {
    tx: Sender<Work>,
    handle: JoinHandle<()>,
}

/// Shared between the streaming thread and the worker.
#[derive(Default)]
struct Shared {
    /// Bumped on flush: work queued before it is dropped, inference in flight is aborted.
    generation: AtomicU64,
    /// The worker is transcribing (interim results are only queued when it is idle).
    busy: AtomicBool,
}

struct State {
    /// Sample positions follow the audio: position p is at (p - offset) / 16000 s of stream
    /// time (see `sink_chain`).
    buffer: UtteranceBuffer,
    /// Samples the stream delivered beyond its timestamps (a live source's clock stepping
    /// back): kept, because a transcription needs the audio, not the clock.
    offset: u64,
    /// Whether audio arrived since the start (or the last flush).
    started: bool,
    utterance_id: u64,
    last_interim_len: usize,
    worker: Option<Worker>,
    /// Final utterances waiting to be transcribed together (batch-ms > 0).
    batch: Vec<Job>,
    /// The open utterance paused: transcribe it ahead once audio reaches this position.
    speculate_at: Option<u64>,
    /// The utterance (id) transcribed ahead, held by the worker.
    speculating: Option<u64>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            buffer: UtteranceBuffer::new(0, 1),
            offset: 0,
            started: false,
            utterance_id: 0,
            last_interim_len: 0,
            worker: None,
            batch: Vec::new(),
            speculate_at: None,
            speculating: None,
        }
    }
}

impl State {
    /// The buffer position of a timestamp.
    fn position_of(&self, pts: gst::ClockTime) -> u64 {
        time_to_samples(pts) + self.offset
    }

    /// The timestamp of a buffer position, by the current mapping, as silerovad maps its
    /// samples: a transcript's time and end agree with the VAD's events and the stream's
    /// time now (a step back can make consecutive transcripts overlap by its size).
    fn time_of(&self, position: u64) -> gst::ClockTime {
        samples_to_time(position.saturating_sub(self.offset))
    }
}

/// Stream time in samples of a timestamp.
fn time_to_samples(pts: gst::ClockTime) -> u64 {
    (u128::from(pts.nseconds()) * engine::SAMPLE_RATE as u128 / 1_000_000_000) as u64
}

fn samples_to_time(n: u64) -> gst::ClockTime {
    gst::ClockTime::from_nseconds(
        (u128::from(n) * 1_000_000_000 / engine::SAMPLE_RATE as u128) as u64,
    )
}

pub struct WhisperStt {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    settings: Mutex<Settings>,
    state: Mutex<State>,
    shared: Arc<Shared>,
    model: Mutex<Option<Arc<whisper_rs::WhisperContext>>>,
    /// The speech service, when `url` names one (then no model is loaded).
    remote: Mutex<Option<Arc<Remote>>>,
    /// Held by the worker from its generation check to the end of a push, and by FlushStop:
    /// output of work from before a flush never slips out after the flush has ended.
    push_lock: Mutex<()>,
}

impl WhisperStt {
    fn settings(&self) -> Settings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::SeqCst)
    }

    fn queue(&self, state: &State, work: Work) {
        if let Some(worker) = &state.worker {
            let _ = worker.tx.send(work);
        }
    }

    /// Sends a serialized event downstream in order with the transcripts: through the worker's
    /// queue, or straight on when no worker runs (element not started).
    fn forward_serialized(
        &self,
        state: std::sync::MutexGuard<'_, State>,
        event: gst::Event,
    ) -> bool {
        if state.worker.is_some() {
            self.queue(&state, Work::Event(event, self.generation()));
            true
        } else {
            drop(state);
            self.srcpad.push_event(event)
        }
    }

    fn queue_utterance(&self, state: &mut State, utterance: Utterance, partial: bool) {
        let job = Job {
            pts: state.time_of(utterance.start),
            id: state.utterance_id,
            utterance,
            partial,
        };
        if !partial {
            state.utterance_id += 1;
            state.last_interim_len = 0;
            state.speculate_at = None;
            if state.speculating.take() == Some(job.id) {
                gst::debug!(
                    CAT,
                    imp = self,
                    "utterance {} ended where it paused",
                    job.id
                );
                let generation = self.generation();
                self.queue(state, Work::Commit(job, generation));
                return;
            }
        }
        gst::debug!(
            CAT,
            imp = self,
            "queueing {} utterance {} at {} ({} samples)",
            if partial { "partial" } else { "final" },
            job.id,
            job.pts,
            job.utterance.samples.len()
        );
        let batch_ms = self.settings().batch_ms as usize;
        if batch_ms > 0 && !partial {
            let limit = batch_ms * engine::SAMPLE_RATE / 1000;
            let len = |b: &[Job]| {
                b.iter()
                    .map(|j| j.utterance.samples.len() + engine::BATCH_GAP)
                    .sum::<usize>()
            };
            if !state.batch.is_empty() && len(&state.batch) + job.utterance.samples.len() > limit {
                self.flush_batch(state);
            }
            state.batch.push(job);
            return;
        }
        let generation = self.generation();
        self.queue(state, Work::Transcribe(vec![job], generation));
    }

    fn flush_batch(&self, state: &mut State) {
        if state.batch.is_empty() {
            return;
        }
        let jobs = std::mem::take(&mut state.batch);
        let generation = self.generation();
        self.queue(state, Work::Transcribe(jobs, generation));
    }

    fn start_worker(&self) -> Result<(), gst::ErrorMessage> {
        let remote = self
            .remote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let engine = match remote {
            Some(remote) => Backend::Remote(remote, self.settings().model),
            None => {
                let ctx = self
                    .model
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .ok_or_else(|| {
                        gst::error_msg!(gst::CoreError::StateChange, ("model not loaded"))
                    })?;
                Backend::Local(
                    Engine::new(ctx)
                        .map_err(|e| gst::error_msg!(gst::LibraryError::Init, ("{}", e)))?,
                )
            }
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let element = self.obj().downgrade();
        let handle = std::thread::Builder::new()
            .name("whisperstt".into())
            .spawn(move || worker_loop(element, engine, rx))
            .map_err(|e| gst::error_msg!(gst::CoreError::Thread, ("cannot start worker: {}", e)))?;
        self.lock_state().worker = Some(Worker { tx, handle });
        Ok(())
    }

    fn stop_worker(&self) {
        self.shared.busy.store(false, Ordering::SeqCst);
        let worker = self.lock_state().worker.take();
        if let Some(worker) = worker {
            self.shared.generation.fetch_add(1, Ordering::SeqCst);
            let _ = worker.tx.send(Work::Stop);
            let _ = worker.handle.join();
        }
    }

    fn sink_chain(
        &self,
        _pad: &gst::Pad,
        buffer: gst::Buffer,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let settings = self.settings();
        let map = buffer.map_readable().map_err(|_| {
            gst::element_imp_error!(self, gst::StreamError::Decode, ("unreadable buffer"));
            gst::FlowError::Error
        })?;
        let samples: Vec<f32> = map
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        drop(map);
        let mut state = self.lock_state();
        // Keep sample positions in step with stream time: fill short gaps with silence and
        // jump over long ones. Where the timestamps step back (a live source's clock: WebRTC
        // does this at speech onsets), keep the samples and move the mapping instead, as
        // silerovad upstream does: dropping them cut tens of milliseconds out of words
        // ("France" became "friends"). A later step forward takes that back first.
        if let Some(pts) = buffer.pts() {
            let position = state.buffer.position();
            let at = state.position_of(pts);
            let tolerance = engine::SAMPLE_RATE as u64 / 50;
            if !state.started {
                state.offset = 0;
                state.buffer.seek(time_to_samples(pts));
            } else if at > position + tolerance {
                let back = (at - position).min(state.offset);
                state.offset -= back;
                let at = at - back;
                let gap = at - position;
                if gap <= tolerance {
                    gst::debug!(CAT, imp = self, "the stream's time caught up at {pts}");
                } else if gap
                    <= u64::from(settings.max_utterance_ms) * engine::SAMPLE_RATE as u64 / 1000
                {
                    gst::debug!(
                        CAT,
                        imp = self,
                        "{gap} samples missing before {pts}: silence"
                    );
                    let cut = state.buffer.push(&vec![0.0; gap as usize]);
                    for utterance in cut {
                        self.queue_utterance(&mut state, utterance, false);
                    }
                } else {
                    if let Some(u) = state.buffer.finish() {
                        self.queue_utterance(&mut state, u, false);
                    }
                    state.buffer.seek(at);
                }
            } else if at + tolerance < position {
                gst::debug!(
                    CAT,
                    imp = self,
                    "the stream's time stepped back {} samples at {pts}: samples kept",
                    position - at
                );
                state.offset = position - time_to_samples(pts);
            }
        }
        state.started = true;
        let cut = state.buffer.push(&samples);
        for utterance in cut {
            self.queue_utterance(&mut state, utterance, false);
        }
        self.speculate(&mut state);
        if settings.interim_ms > 0
            && settings.batch_ms == 0
            && !settings.service.is_remote()
            && !self.shared.busy.load(Ordering::SeqCst)
        {
            let interval = settings.interim_ms as usize * engine::SAMPLE_RATE / 1000;
            let due = state
                .buffer
                .current()
                .filter(|u| u.samples.len() >= state.last_interim_len + interval)
                .cloned();
            if let Some(current) = due {
                state.last_interim_len = current.samples.len();
                self.shared.busy.store(true, Ordering::SeqCst);
                self.queue_utterance(&mut state, current, true);
            }
        }
        Ok(gst::FlowSuccess::Ok)
    }

    /// Transcribes the paused utterance ahead once the audio up to its end is in.
    fn speculate(&self, state: &mut State) {
        let Some(at) = state.speculate_at else { return };
        if state.buffer.position() < at || self.settings().batch_ms > 0 {
            return;
        }
        state.speculate_at = None;
        let Some(mut utterance) = state.buffer.current().cloned() else {
            return;
        };
        utterance
            .samples
            .truncate(at.saturating_sub(utterance.start) as usize);
        if utterance.samples.is_empty() {
            return;
        }
        let job = Job {
            pts: state.time_of(utterance.start),
            id: state.utterance_id,
            utterance,
            partial: false,
        };
        gst::debug!(
            CAT,
            imp = self,
            "utterance {} paused: transcribing ahead",
            job.id
        );
        state.speculating = Some(job.id);
        let generation = self.generation();
        self.queue(state, Work::Speculate(job, generation));
    }

    fn sink_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        use gst::EventView;
        if let Some(pause) = SpeechPause::from_event(&event) {
            let pad = u64::from(self.settings().context_pad_ms) * engine::SAMPLE_RATE as u64 / 1000;
            let mut state = self.lock_state();
            if pause.resume {
                state.speculate_at = None;
                if state.speculating.take().is_some() {
                    self.queue(&state, Work::Discard);
                }
            } else if state.buffer.in_utterance() {
                // Where the utterance will be cut if the end comes at the pause (see below).
                state.speculate_at = Some(state.position_of(pause.pts) + pad);
                self.speculate(&mut state);
            }
            return true;
        }
        if let Some(boundary) = SpeechBoundary::from_event(&event) {
            let pad = u64::from(self.settings().context_pad_ms) * engine::SAMPLE_RATE as u64 / 1000;
            let mut state = self.lock_state();
            state.buffer.set_gated();
            let at = state.position_of(boundary.pts);
            if boundary.start {
                // Half the padding before: more leading audio made tiny.en stumble on jfk.wav.
                state.buffer.start(at.saturating_sub(pad / 2));
                state.last_interim_len = 0;
            } else if let Some(u) = state.buffer.end(at + pad) {
                self.queue_utterance(&mut state, u, false);
            }
            return true;
        }
        match event.view() {
            EventView::FlushStart(_) => {
                self.shared.generation.fetch_add(1, Ordering::SeqCst);
                self.srcpad.push_event(event)
            }
            EventView::FlushStop(_) => {
                let _push = self.push_lock.lock().unwrap_or_else(|p| p.into_inner());
                {
                    let mut state = self.lock_state();
                    state.buffer.reset();
                    state.started = false;
                    state.offset = 0;
                    state.batch.clear();
                    state.last_interim_len = 0;
                    state.speculate_at = None;
                    state.speculating = None;
                }
                self.shared.busy.store(false, Ordering::SeqCst);
                self.srcpad.push_event(event)
            }
            EventView::Caps(_) => {
                let caps = gst::Caps::builder("text/x-raw")
                    .field("format", "utf8")
                    .build();
                self.forward_serialized(self.lock_state(), gst::event::Caps::new(&caps))
            }
            EventView::Eos(_) => {
                let mut state = self.lock_state();
                if let Some(u) = state.buffer.finish() {
                    self.queue_utterance(&mut state, u, false);
                }
                self.flush_batch(&mut state);
                self.forward_serialized(state, event)
            }
            EventView::Gap(_) => true,
            _ if event.is_serialized() => self.forward_serialized(self.lock_state(), event),
            _ => gst::Pad::event_default(pad, Some(&*self.obj()), event),
        }
    }

    fn src_query(&self, pad: &gst::Pad, query: &mut gst::QueryRef) -> bool {
        if let gst::QueryViewMut::Latency(q) = query.view_mut() {
            if !self.sinkpad.peer_query(q.query_mut()) {
                return false;
            }
            let (live, min, max) = q.result();
            let ours = gst::ClockTime::from_mseconds(u64::from(self.settings().latency_ms));
            q.set(live, min + ours, max.map(|m| m + ours));
            return true;
        }
        gst::Pad::query_default(pad, Some(&*self.obj()), query)
    }

    /// Posts and pushes one transcript, and returns its structure; with `tentative` (a reply
    /// ahead's id), pushes it after a `vox-turn` event and leaves the message to be posted when
    /// the turn is confirmed.
    fn deliver(
        &self,
        job: &Job,
        out: engine::Output,
        took: std::time::Duration,
        ahead: bool,
        tentative: Option<u64>,
    ) -> gst::Structure {
        let duration = samples_to_time(job.utterance.samples.len() as u64);
        let ms = |m: u64| job.pts + gst::ClockTime::from_mseconds(m);
        let transcript = Transcript {
            text: out.text,
            pts: job.pts,
            duration,
            partial: job.partial,
            language: out.language,
            utterance: job.id,
            inference_time: gst::ClockTime::from_nseconds(took.as_nanos() as u64),
            ahead,
            segments: out
                .segments
                .into_iter()
                .map(|s| vox_common::events::Segment {
                    start: ms(s.start_ms),
                    end: ms(s.end_ms),
                    text: s.text,
                    words: s
                        .words
                        .into_iter()
                        .map(|w| vox_common::events::Word {
                            start: ms(w.start_ms),
                            end: ms(w.end_ms),
                            text: w.text,
                            probability: f64::from(w.probability),
                        })
                        .collect(),
                })
                .collect(),
        };
        gst::debug!(
            CAT,
            imp = self,
            "utterance {} ({}{}) in {:?}: {:?}",
            job.id,
            duration,
            if job.partial { ", partial" } else { "" },
            took,
            transcript.text
        );
        let structure = transcript.to_structure();
        match tentative {
            Some(id) => {
                self.srcpad.push_event(
                    TurnMark {
                        state: TurnState::Tentative,
                        id,
                    }
                    .to_event(),
                );
            }
            None => self.post_transcript(structure.clone()),
        }
        self.srcpad.push_event(transcript.to_event());
        if transcript.text.is_empty() {
            // Nothing was said (noise, a cough): downstream learns the span is covered.
            if !job.partial {
                self.srcpad
                    .push_event(gst::event::Gap::builder(job.pts).duration(duration).build());
            }
            return structure;
        }
        let mut buffer = gst::Buffer::from_mut_slice(transcript.text.clone().into_bytes());
        {
            let b = buffer.get_mut().expect("new buffer");
            b.set_pts(job.pts);
            b.set_duration(duration);
        }
        if let Err(err) = self.srcpad.push(buffer) {
            gst::debug!(CAT, imp = self, "downstream returned {err:?}");
        }
        structure
    }

    fn post_transcript(&self, transcript: gst::Structure) {
        let _ = self.obj().post_message(
            gst::message::Element::builder(transcript)
                .src(&*self.obj())
                .build(),
        );
    }

    /// Decides the reply ahead `id`: an out-of-band `vox-turn` downstream.
    fn decide(&self, id: u64, confirmed: bool) {
        let state = if confirmed {
            TurnState::Confirmed
        } else {
            TurnState::Withdrawn
        };
        gst::debug!(CAT, imp = self, "reply ahead {id}: {state:?}");
        self.srcpad.push_event(TurnMark { state, id }.to_event());
    }
}

/// Results of one transcription run, with the time it took per utterance.
type Run = (
    Result<Vec<engine::Output>, engine::Error>,
    std::time::Duration,
);

/// Where utterances are transcribed: whisper.cpp in-process, or a speech service (with the
/// model name to ask it for).
enum Backend {
    Local(Engine),
    Remote(Arc<Remote>, String),
}

/// Transcribes `jobs` in `generation`; `None` when a flush came before or during the work.
fn run(imp: &WhisperStt, engine: &mut Backend, jobs: &[Job], generation: u64) -> Option<Run> {
    if generation != imp.generation() || jobs.is_empty() {
        return None;
    }
    let options = imp.settings().options;
    let shared = imp.shared.clone();
    let cancelled = move || shared.generation.load(Ordering::SeqCst) != generation;
    let started = Instant::now();
    imp.shared.busy.store(true, Ordering::SeqCst);
    let result = match (engine, jobs) {
        (Backend::Remote(service, model), _) => jobs
            .iter()
            .map(|job| {
                remote::transcribe(service, model, &job.utterance.samples, &options, &cancelled)
            })
            .collect(),
        (Backend::Local(engine), [job]) => engine
            .transcribe(&job.utterance.samples, &options, cancelled)
            .map(|out| vec![out]),
        (Backend::Local(engine), _) => {
            let pieces: Vec<&[f32]> = jobs
                .iter()
                .map(|j| j.utterance.samples.as_slice())
                .collect();
            engine.transcribe_batch(&pieces, &options, cancelled)
        }
    };
    imp.shared.busy.store(false, Ordering::SeqCst);
    (generation == imp.generation()).then(|| (result, started.elapsed() / jobs.len() as u32))
}

/// Pushes the results of `jobs` (unless a flush came since `generation`).
fn deliver_all(imp: &WhisperStt, jobs: &[Job], (result, took): Run, generation: u64, ahead: bool) {
    let _push = imp.push_lock.lock().unwrap_or_else(|p| p.into_inner());
    if generation != imp.generation() {
        return;
    }
    match result {
        Ok(outputs) => {
            for (job, out) in jobs.iter().zip(outputs) {
                imp.deliver(job, out, took, ahead, None);
            }
        }
        // One bad utterance never stops the stream.
        Err(e) => gst::element_imp_warning!(
            imp,
            gst::StreamError::Failed,
            ("utterance {} at {}: {}", jobs[0].id, jobs[0].pts, e)
        ),
    }
}

/// The transcript of a paused utterance, made ahead of its end.
struct Held {
    generation: u64,
    /// The utterance id and its length in samples: a commit is of the very same audio or not.
    id: u64,
    len: usize,
    ahead: Ahead,
}

enum Ahead {
    /// Kept here until the end comes.
    Kept(Run),
    /// Sent downstream as the reply ahead `turn` (`send-ahead`); the message is posted when
    /// it is confirmed.
    Sent { turn: u64, message: gst::Structure },
}

/// With `send-ahead`, pushes a paused utterance's transcript as the reply ahead `turn`;
/// otherwise (or when nothing was said, or the run failed) keeps it for the end.
fn hold(imp: &WhisperStt, job: &Job, r: Run, generation: u64, turn: u64) -> Ahead {
    let (Ok(mut outputs), took) = r else {
        return Ahead::Kept(r);
    };
    let said = outputs.len() == 1 && !outputs[0].text.is_empty();
    if !imp.settings().send_ahead || !said {
        return Ahead::Kept((Ok(outputs), took));
    }
    let _push = imp.push_lock.lock().unwrap_or_else(|p| p.into_inner());
    if generation != imp.generation() {
        return Ahead::Kept((Ok(outputs), took));
    }
    let out = outputs.remove(0);
    let message = imp.deliver(job, out, took, true, Some(turn));
    Ahead::Sent { turn, message }
}

fn worker_loop(
    element: glib::WeakRef<super::WhisperSttElement>,
    mut engine: Backend,
    rx: Receiver<Work>,
) {
    let mut held: Option<Held> = None;
    // Replies ahead sent so far (their ids).
    let mut turns = 0u64;
    for work in rx {
        let Some(obj) = element.upgrade() else { return };
        let imp = obj.imp();
        // A reply ahead that this work ends without confirming it is withdrawn (after a flush,
        // downstream has dropped it already).
        let withdraw = |held: Option<Held>| {
            if let Some(Held {
                generation,
                ahead: Ahead::Sent { turn, .. },
                ..
            }) = held
                && generation == imp.generation()
            {
                imp.decide(turn, false);
            }
        };
        match work {
            Work::Stop => return,
            Work::Discard => withdraw(held.take()),
            Work::Speculate(job, generation) => {
                withdraw(held.take());
                if let Some(r) = run(imp, &mut engine, std::slice::from_ref(&job), generation) {
                    turns += 1;
                    held = Some(Held {
                        generation,
                        id: job.id,
                        len: job.utterance.samples.len(),
                        ahead: hold(imp, &job, r, generation, turns),
                    });
                }
            }
            Work::Commit(job, generation) => {
                let jobs = std::slice::from_ref(&job);
                // Held only when it is of the very same audio (an end of stream or a cut at the
                // maximum length closes an utterance elsewhere than where it paused).
                match held.take() {
                    Some(h)
                        if h.generation == generation
                            && h.id == job.id
                            && h.len == job.utterance.samples.len() =>
                    {
                        match h.ahead {
                            Ahead::Kept(r) => deliver_all(imp, jobs, r, generation, true),
                            Ahead::Sent { turn, message } => {
                                let _push = imp.push_lock.lock().unwrap_or_else(|p| p.into_inner());
                                if generation == imp.generation() {
                                    imp.post_transcript(message);
                                    imp.decide(turn, true);
                                }
                            }
                        }
                    }
                    other => {
                        withdraw(other);
                        if let Some(r) = run(imp, &mut engine, jobs, generation) {
                            deliver_all(imp, jobs, r, generation, false);
                        }
                    }
                }
            }
            Work::Event(event, generation) => {
                let _push = imp.push_lock.lock().unwrap_or_else(|p| p.into_inner());
                // Sticky events (stream-start, caps, tags) still hold after a flush; a segment
                // from before it does not.
                let keep = event.is_sticky() && event.type_() != gst::EventType::Segment;
                if generation == imp.generation() || keep {
                    imp.srcpad.push_event(event);
                }
            }
            Work::Transcribe(jobs, generation) => {
                if jobs.iter().any(|j| !j.partial) {
                    withdraw(held.take());
                }
                if let Some(result) = run(imp, &mut engine, &jobs, generation) {
                    deliver_all(imp, &jobs, result, generation, false);
                }
            }
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for WhisperStt {
    const NAME: &'static str = "GstWhisperStt";
    type Type = super::WhisperSttElement;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let templ = klass.pad_template("sink").expect("sink template");
        let sinkpad = gst::Pad::builder_from_template(&templ)
            .chain_function(|pad, parent, buffer| {
                WhisperStt::catch_panic_pad_function(
                    parent,
                    || Err(gst::FlowError::Error),
                    |imp| imp.sink_chain(pad, buffer),
                )
            })
            .event_function(|pad, parent, event| {
                WhisperStt::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.sink_event(pad, event),
                )
            })
            .build();
        let templ = klass.pad_template("src").expect("src template");
        let srcpad = gst::Pad::builder_from_template(&templ)
            .query_function(|pad, parent, query| {
                WhisperStt::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.src_query(pad, query),
                )
            })
            .build();
        Self {
            sinkpad,
            srcpad,
            settings: Mutex::new(Settings::default()),
            state: Mutex::new(State::default()),
            shared: Arc::new(Shared::default()),
            model: Mutex::new(None),
            remote: Mutex::new(None),
            push_lock: Mutex::new(()),
        }
    }
}

impl ObjectImpl for WhisperStt {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("Whisper model: a name from `vox models list` (tiny.en-q8_0, tiny.en, base) or a path to a ggml file")
                    .default_value(Some(DEFAULT_MODEL))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("language")
                    .nick("Language")
                    .blurb("Spoken language (ISO code such as en, de), or auto to detect it (multilingual models)")
                    .default_value(Some(DEFAULT_LANGUAGE))
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("translate")
                    .nick("Translate")
                    .blurb("Translate into English instead of transcribing (multilingual models)")
                    .default_value(false)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("threads")
                    .nick("Threads")
                    .blurb("Threads used for inference")
                    .minimum(1)
                    .maximum(64)
                    .default_value(engine::default_threads())
                    .mutable_playing()
                    .build(),
                glib::ParamSpecString::builder("initial-prompt")
                    .nick("Initial prompt")
                    .blurb("Text given to the decoder before each utterance (names, vocabulary)")
                    .default_value(Some(""))
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("beam-size")
                    .nick("Beam size")
                    .blurb("1 decodes greedily; more uses beam search of that width")
                    .minimum(1)
                    .maximum(16)
                    .default_value(DEFAULT_BEAM_SIZE)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecFloat::builder("temperature")
                    .nick("Temperature")
                    .blurb("Sampling temperature: 0 takes the likeliest token (greedy or beam search); above 0 tokens are sampled")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(0.0)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("max-utterance-ms")
                    .nick("Maximum utterance")
                    .blurb("Longest audio transcribed at once; without a VAD upstream, audio is cut at this length")
                    .minimum(1_000)
                    .maximum(30_000)
                    .default_value(DEFAULT_MAX_UTTERANCE_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecInt::builder("audio-ctx")
                    .nick("Audio context")
                    .blurb("Encoder window in frames (50 per second): -1 sized to each utterance, 0 the full 30 s window")
                    .minimum(-1)
                    .maximum(1500)
                    .default_value(DEFAULT_AUDIO_CTX)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecBoolean::builder("word-timestamps")
                    .nick("Word timestamps")
                    .blurb("Add per-word times to the transcript structure")
                    .default_value(false)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("interim-interval-ms")
                    .nick("Interim interval")
                    .blurb("While speech continues, post a partial transcript this often (0: final results only)")
                    .maximum(60_000)
                    .default_value(DEFAULT_INTERIM_MS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("context-pad-ms")
                    .nick("Context padding")
                    .blurb("Audio added after each VAD utterance, half of it before (Whisper loses word endings cut too tightly)")
                    .maximum(2_000)
                    .default_value(DEFAULT_CONTEXT_PAD_MS)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("batch-ms")
                    .nick("Batch")
                    .blurb("Offline use: transcribe utterances together, up to this much audio (0: each utterance as soon as it ends, for live use)")
                    .maximum(29_000)
                    .default_value(DEFAULT_BATCH_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("send-ahead")
                    .nick("Send ahead")
                    .blurb("Send the transcript made at a pause downstream at once, marked tentative (vox-turn), then confirm or withdraw it at the end of speech: llmchat and kokorotts make the reply ahead and hold its audio until confirmed")
                    .default_value(false)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("latency-ms")
                    .nick("Latency")
                    .blurb("Latency added in the latency query, for pipelines that sync text to a clock (subtitles)")
                    .maximum(120_000)
                    .default_value(DEFAULT_LATENCY_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecString::builder("matrix-kernels")
                    .nick("Matrix kernels")
                    .blurb("Which kernels do whisper.cpp's matrix products on the CPU in this process: ours (AVX-512, AVX-VNNI or AVX2, chosen from the CPU) or llamafile's tinyBLAS (VOX_WHISPER_GEMM=tinyblas|avx2|avx2-no-vnni restricts ours)")
                    .read_only()
                    .build(),
            ]
            .into_iter()
            .chain(std::iter::once(
                glib::ParamSpecEnum::builder_with_default("backend", super::Backend::Auto)
                    .nick("Backend")
                    .blurb("local (the model in-process), remote (the transcription service at url), or auto: remote when url is set")
                    .mutable_ready()
                    .build(),
            ))
            .chain(vox_common::remote::Settings::param_specs("transcription"))
            .collect()
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let string = |v: &glib::Value| v.get::<Option<String>>().ok().flatten().unwrap_or_default();
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
            "model" => {
                let m = string(value);
                s.model = if m.is_empty() {
                    DEFAULT_MODEL.into()
                } else {
                    m
                };
            }
            "language" => {
                let l = string(value);
                s.options.language = if l.is_empty() {
                    DEFAULT_LANGUAGE.into()
                } else {
                    l
                };
            }
            "translate" => s.options.translate = value.get().expect("type checked upstream"),
            "threads" => s.options.threads = value.get().expect("type checked upstream"),
            "initial-prompt" => s.options.initial_prompt = string(value),
            "beam-size" => s.options.beam_size = value.get().expect("type checked upstream"),
            "temperature" => s.options.temperature = value.get().expect("type checked upstream"),
            "max-utterance-ms" => s.max_utterance_ms = value.get().expect("type checked upstream"),
            "audio-ctx" => s.options.audio_ctx = value.get().expect("type checked upstream"),
            "word-timestamps" => {
                s.options.word_timestamps = value.get().expect("type checked upstream")
            }
            "interim-interval-ms" => s.interim_ms = value.get().expect("type checked upstream"),
            "latency-ms" => s.latency_ms = value.get().expect("type checked upstream"),
            "context-pad-ms" => s.context_pad_ms = value.get().expect("type checked upstream"),
            "batch-ms" => s.batch_ms = value.get().expect("type checked upstream"),
            "send-ahead" => s.send_ahead = value.get().expect("type checked upstream"),
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
            "language" => s.options.language.to_value(),
            "translate" => s.options.translate.to_value(),
            "threads" => s.options.threads.to_value(),
            "initial-prompt" => s.options.initial_prompt.to_value(),
            "beam-size" => s.options.beam_size.to_value(),
            "temperature" => s.options.temperature.to_value(),
            "max-utterance-ms" => s.max_utterance_ms.to_value(),
            "audio-ctx" => s.options.audio_ctx.to_value(),
            "word-timestamps" => s.options.word_timestamps.to_value(),
            "interim-interval-ms" => s.interim_ms.to_value(),
            "latency-ms" => s.latency_ms.to_value(),
            "context-pad-ms" => s.context_pad_ms.to_value(),
            "batch-ms" => s.batch_ms.to_value(),
            "send-ahead" => s.send_ahead.to_value(),
            "matrix-kernels" => crate::gemm::describe().to_value(),
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

impl GstObjectImpl for WhisperStt {}

impl ElementImpl for WhisperStt {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Whisper speech to text",
                "Filter/Audio/Text",
                "Transcribes each utterance (between silerovad's speech events) with Whisper. \
                 Example: gst-launch-1.0 -m filesrc location=speech.wav ! decodebin ! \
                 audioconvert ! audioresample ! audio/x-raw,format=F32LE,rate=16000,channels=1 ! \
                 silerovad ! whisperstt ! fakesink",
                "Local Voice AI developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let sink_caps = gst::Caps::builder("audio/x-raw")
                .field("format", "F32LE")
                .field("layout", "interleaved")
                .field("channels", 1i32)
                .field("rate", engine::SAMPLE_RATE as i32)
                .build();
            let src_caps = gst::Caps::builder("text/x-raw")
                .field("format", "utf8")
                .build();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &src_caps,
                )
                .expect("valid template"),
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &sink_caps,
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
            gst::StateChange::NullToReady => {
                let settings = self.settings();
                match settings.service.remote() {
                    Ok(Some(remote)) => {
                        gst::info!(CAT, imp = self, "transcribing on {}", remote.endpoint(""));
                        *self.remote.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(Arc::new(remote));
                        return self.parent_change_state(transition);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        self.post_error_message(gst::error_msg!(
                            gst::ResourceError::Settings,
                            ("{}", e)
                        ));
                        return Err(gst::StateChangeError);
                    }
                }
                match engine::load_model(&settings.model) {
                    Ok(ctx) => *self.model.lock().unwrap_or_else(|p| p.into_inner()) = Some(ctx),
                    Err(e) => {
                        self.post_error_message(gst::error_msg!(
                            gst::ResourceError::OpenRead,
                            ("{}", e)
                        ));
                        return Err(gst::StateChangeError);
                    }
                }
            }
            gst::StateChange::ReadyToPaused => {
                let settings = self.settings();
                {
                    let mut state = self.lock_state();
                    let per_ms = engine::SAMPLE_RATE / 1000;
                    state.buffer = UtteranceBuffer::new(
                        LOOKBACK_MS as usize * per_ms,
                        settings.max_utterance_ms as usize * per_ms,
                    );
                    state.started = false;
                    state.offset = 0;
                    state.utterance_id = 0;
                    state.last_interim_len = 0;
                    state.batch.clear();
                }
                if let Err(err) = self.start_worker() {
                    self.post_error_message(err);
                    return Err(gst::StateChangeError);
                }
            }
            gst::StateChange::PausedToReady => self.stop_worker(),
            _ => {}
        }
        let ret = self.parent_change_state(transition);
        if ret.is_err() && transition == gst::StateChange::ReadyToPaused {
            self.stop_worker();
        }
        if transition == gst::StateChange::ReadyToNull {
            *self.model.lock().unwrap_or_else(|p| p.into_inner()) = None;
            *self.remote.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        ret
    }
}
