//! # silerovad
//!
//! Voice activity detection with Silero VAD v6 (a native Rust forward pass over the weights in
//! the model's ONNX file, or ONNX Runtime with `engine=onnxruntime`). Audio passes through
//! unchanged; speech is marked with serialized custom downstream events `vox-speech-start` and
//! `vox-speech-end` (fields `pts`, `running-time`, `probability`, `utterance`), which travel in
//! order with the audio, and the same structures are posted as element messages.
//!
//! Speech opens once it has lasted `min-speech-ms` above `threshold` and closes after
//! `min-silence-ms` below `negative-threshold`; both boundaries are padded by `speech-pad-ms`, so
//! a speech-start event refers back in time (downstream keeps a short look-back). In
//! `mode=drop-silence` only speech is passed on, and the element adds `min-speech-ms +
//! speech-pad-ms` plus one chunk of latency, which it reports in the latency query.
//!
//! Before speech is confirmed, its first chunk above `threshold` posts `vox-speech-onset`
//! (`pts`, `running-time`, `probability`), and an onset that falls back to silence posts
//! `vox-speech-cancel` (`pts`, `running-time`, `since`): messages only, for applications that
//! must react at once — a live agent pauses its voice at an onset (barge-in) and resumes it on
//! a cancel (a cough).
//!
//! With `speculate-ms` (shorter than `min-silence-ms`), speech followed by that much silence
//! sends `vox-speech-pause` (`pts` where the end will be if speech does not come back,
//! `running-time`, `utterance`), and speech coming back after it `vox-speech-resume`: serialized
//! events and messages, on which whisperstt transcribes an utterance ahead of its end, so that
//! its transcript is ready when `min-silence-ms` confirms the end.
//!
//! ```sh
//! gst-launch-1.0 -m filesrc location=speech.wav ! decodebin ! audioconvert ! audioresample ! \
//!     audio/x-raw,format=F32LE,rate=16000,channels=1 ! silerovad min-silence-ms=300 ! fakesink
//! ```

use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use std::collections::VecDeque;
use std::sync::{LazyLock, Mutex};

use super::{VadEngine, VadMode};
use crate::detector::{Boundary, Detector, DetectorConfig};
use crate::silero::SileroVad as SileroModel;
use vox_common::events::{SPEECH_CANCEL, SPEECH_ONSET, SpeechBoundary, SpeechPause};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new(
        "silerovad",
        gst::DebugColorFlags::empty(),
        Some("Silero voice activity detection"),
    )
});

const DEFAULT_MODEL: &str = "silero-vad";
const DEFAULT_THRESHOLD: f32 = 0.5;
const DEFAULT_NEG_THRESHOLD: f32 = -1.0;
const DEFAULT_MIN_SPEECH_MS: u32 = 250;
const DEFAULT_MIN_SILENCE_MS: u32 = 500;
const DEFAULT_SPEECH_PAD_MS: u32 = 30;
const DEFAULT_SPECULATE_MS: u32 = 0;
const DEFAULT_MODE: VadMode = VadMode::PassThrough;
const DEFAULT_ENGINE: VadEngine = VadEngine::Auto;

#[derive(Debug, Clone)]
struct Settings {
    model: String,
    threshold: f32,
    neg_threshold: f32,
    min_speech_ms: u32,
    min_silence_ms: u32,
    speech_pad_ms: u32,
    speculate_ms: u32,
    mode: VadMode,
    engine: VadEngine,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: DEFAULT_MODEL.into(),
            threshold: DEFAULT_THRESHOLD,
            neg_threshold: DEFAULT_NEG_THRESHOLD,
            min_speech_ms: DEFAULT_MIN_SPEECH_MS,
            min_silence_ms: DEFAULT_MIN_SILENCE_MS,
            speech_pad_ms: DEFAULT_SPEECH_PAD_MS,
            speculate_ms: DEFAULT_SPECULATE_MS,
            mode: DEFAULT_MODE,
            engine: DEFAULT_ENGINE,
        }
    }
}

impl Settings {
    fn detector_config(&self, rate: u32) -> DetectorConfig {
        let samples = |ms: u32| u64::from(ms) * u64::from(rate) / 1000;
        DetectorConfig {
            threshold: self.threshold,
            neg_threshold: if self.neg_threshold < 0.0 {
                (self.threshold - 0.15).max(0.01)
            } else {
                self.neg_threshold
            },
            min_speech: samples(self.min_speech_ms),
            min_silence: samples(self.min_silence_ms),
            speech_pad: samples(self.speech_pad_ms),
            // A pause at or after the end would never be seen.
            early_silence: if self.speculate_ms < self.min_silence_ms {
                samples(self.speculate_ms)
            } else {
                0
            },
        }
    }

    /// Latency added by the element: none when passing audio through, else the time it holds
    /// audio back before it knows that speech started.
    fn latency(&self, chunk: gst::ClockTime) -> gst::ClockTime {
        match self.mode {
            VadMode::PassThrough => gst::ClockTime::ZERO,
            VadMode::DropSilence => {
                gst::ClockTime::from_mseconds(u64::from(self.min_speech_ms + self.speech_pad_ms))
                    + chunk
            }
        }
    }
}

#[derive(Default)]
struct State {
    model: Option<SileroModel>,
    detector: Detector,
    rate: u32,
    /// Samples not yet scored (less than one chunk).
    pending: Vec<f32>,
    /// Samples seen since the stream started (the detector's clock).
    samples: u64,
    /// A known (sample, pts) pair, re-anchored on discontinuities.
    anchor: Option<(u64, gst::ClockTime)>,
    segment: gst::FormattedSegment<gst::ClockTime>,
    utterance: u64,
    /// drop-silence: buffers held back while it is not yet known whether they hold speech.
    held: VecDeque<gst::Buffer>,
    /// drop-silence: the next pushed buffer starts after dropped audio.
    discont: bool,
}

impl State {
    fn sample_pts(&self, sample: u64) -> gst::ClockTime {
        let (s0, pts0) = self.anchor.unwrap_or((0, gst::ClockTime::ZERO));
        let rate = u64::from(self.rate.max(1));
        if sample >= s0 {
            pts0 + gst::ClockTime::from_nseconds((sample - s0) * 1_000_000_000 / rate)
        } else {
            pts0.saturating_sub(gst::ClockTime::from_nseconds(
                (s0 - sample) * 1_000_000_000 / rate,
            ))
        }
    }

    fn reset_stream(&mut self) {
        self.detector.reset();
        if let Some(model) = self.model.as_mut() {
            model.reset();
        }
        self.pending.clear();
        self.samples = 0;
        self.anchor = None;
        self.held.clear();
        self.discont = true;
    }
}

pub struct SileroVad {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    settings: Mutex<Settings>,
    state: Mutex<State>,
}

/// What a chain call found, to act on after the state lock is released.
enum Output {
    Event(SpeechBoundary),
    Pause(SpeechPause),
    /// A message only (speech onset, cancelled onset).
    Message(gst::Structure),
    Buffer(gst::Buffer),
    Gap(gst::ClockTime, Option<gst::ClockTime>),
}

impl SileroVad {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn settings(&self) -> Settings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn load_model(&self, rate: u32) -> Result<SileroModel, gst::ErrorMessage> {
        let settings = self.settings();
        let model = SileroModel::load_with(&settings.model, rate, settings.engine.into())
            .map_err(|e| gst::error_msg!(gst::ResourceError::OpenRead, ("{}", e)))?;
        gst::debug!(
            CAT,
            imp = self,
            "Silero VAD at {rate} Hz on the {} engine",
            model.engine()
        );
        Ok(model)
    }

    /// A message naming a moment: `pts` and `running-time` of `sample`.
    fn mark(state: &State, name: &str, sample: u64) -> gst::structure::Builder {
        let pts = state.sample_pts(sample);
        let running_time = state.segment.to_running_time(pts).unwrap_or(pts);
        gst::Structure::builder(name)
            .field("pts", pts)
            .field("running-time", running_time)
    }

    fn boundary(&self, state: &mut State, b: Boundary) -> SpeechBoundary {
        let (start, sample, probability) = match b {
            Boundary::Start {
                sample,
                probability,
            } => (true, sample, probability),
            Boundary::End {
                sample,
                probability,
            } => (false, sample, probability),
            Boundary::Onset { .. }
            | Boundary::Cancel { .. }
            | Boundary::Pause { .. }
            | Boundary::Resume { .. } => {
                unreachable!("not a speech boundary")
            }
        };
        let pts = state.sample_pts(sample);
        let running_time = state.segment.to_running_time(pts).unwrap_or(pts);
        let boundary = SpeechBoundary {
            start,
            pts,
            running_time,
            probability: f64::from(probability),
            utterance: state.utterance,
        };
        if !start {
            state.utterance += 1;
        }
        boundary
    }

    fn sink_chain(
        &self,
        _pad: &gst::Pad,
        buffer: gst::Buffer,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let settings = self.settings();
        let mut outputs = Vec::new();
        {
            let mut state = self.lock_state();
            if state.model.is_none() {
                // Only after a failed model load on a rate change (already reported).
                return Err(gst::FlowError::NotNegotiated);
            }
            let rate = u64::from(state.rate);
            if let Some(pts) = buffer.pts() {
                let next = state.samples + state.pending.len() as u64;
                let expected = state.anchor.map(|_| state.sample_pts(next));
                let drift = expected.map(|e| e.absdiff(pts));
                if state.anchor.is_none()
                    || buffer.flags().contains(gst::BufferFlags::DISCONT)
                    || drift.is_some_and(|d| d > gst::ClockTime::from_mseconds(20))
                {
                    let at = state.samples + state.pending.len() as u64;
                    state.anchor = Some((at, pts));
                }
            }
            let map = buffer.map_readable().map_err(|_| {
                gst::element_imp_error!(self, gst::StreamError::Decode, ("unreadable buffer"));
                gst::FlowError::Error
            })?;
            state.pending.extend(
                map.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            drop(map);

            let chunk = state.model.as_ref().map(|m| m.chunk_len()).unwrap_or(512);
            let mut consumed = 0;
            while state.pending.len() - consumed >= chunk {
                let state = &mut *state;
                let model = state.model.as_mut().expect("checked above");
                let p = model
                    .process(&state.pending[consumed..consumed + chunk])
                    .map_err(|e| {
                        gst::element_imp_error!(self, gst::StreamError::Failed, ("{}", e));
                        gst::FlowError::Error
                    })?;
                gst::trace!(CAT, imp = self, "sample {} p={p:.3}", state.samples);
                match state.detector.push(state.samples, chunk as u64, p) {
                    Some(Boundary::Onset {
                        sample,
                        probability,
                    }) => outputs.push(Output::Message(
                        Self::mark(state, SPEECH_ONSET, sample)
                            .field("probability", f64::from(probability))
                            .build(),
                    )),
                    Some(Boundary::Cancel { since, sample }) => {
                        let since = state.sample_pts(since);
                        outputs.push(Output::Message(
                            Self::mark(state, SPEECH_CANCEL, sample)
                                .field("since", since)
                                .build(),
                        ))
                    }
                    Some(b @ (Boundary::Pause { sample } | Boundary::Resume { sample })) => {
                        let pts = state.sample_pts(sample);
                        outputs.push(Output::Pause(SpeechPause {
                            resume: matches!(b, Boundary::Resume { .. }),
                            pts,
                            running_time: state.segment.to_running_time(pts).unwrap_or(pts),
                            utterance: state.utterance,
                        }))
                    }
                    Some(b) => {
                        let boundary = self.boundary(state, b);
                        outputs.push(Output::Event(boundary));
                    }
                    None => {}
                }
                state.samples += chunk as u64;
                consumed += chunk;
            }
            state.pending.drain(..consumed);

            match settings.mode {
                VadMode::PassThrough => outputs.push(Output::Buffer(buffer)),
                VadMode::DropSilence => {
                    self.drop_silence(&mut state, &settings, buffer, rate, &mut outputs)
                }
            }
        }
        self.emit(outputs)
    }

    /// drop-silence: decide which held buffers go downstream and which become gaps.
    fn drop_silence(
        &self,
        state: &mut State,
        settings: &Settings,
        buffer: gst::Buffer,
        rate: u64,
        outputs: &mut Vec<Output>,
    ) {
        let last_start = outputs.iter().rev().find_map(|o| match o {
            Output::Event(b) if b.start => Some(b.pts),
            _ => None,
        });
        let ended_here = outputs
            .iter()
            .any(|o| matches!(o, Output::Event(b) if !b.start));
        state.held.push_back(buffer);
        if state.detector.in_speech() || ended_here {
            let from = last_start.unwrap_or(gst::ClockTime::ZERO);
            while let Some(buf) = state.held.pop_front() {
                let end = buf.pts().map(|p| p + buf.duration().unwrap_or_default());
                if last_start.is_some() && end.is_some_and(|e| e <= from) {
                    outputs.push(Output::Gap(buf.pts().unwrap_or_default(), buf.duration()));
                    state.discont = true;
                    continue;
                }
                let mut buf = buf;
                if state.discont {
                    buf.make_mut().set_flags(gst::BufferFlags::DISCONT);
                    state.discont = false;
                }
                outputs.push(Output::Buffer(buf));
            }
            return;
        }
        // Keep only what a speech start could still reach back to.
        let keep = gst::ClockTime::from_mseconds(u64::from(
            settings.min_speech_ms + settings.speech_pad_ms,
        )) + gst::ClockTime::from_nseconds(512 * 1_000_000_000 / rate.max(1));
        let newest_end = state
            .held
            .back()
            .and_then(|b| b.pts().map(|p| p + b.duration().unwrap_or_default()));
        while state.held.len() > 1 {
            let front = &state.held[0];
            let front_end = front
                .pts()
                .map(|p| p + front.duration().unwrap_or_default());
            match (front_end, newest_end) {
                (Some(fe), Some(ne)) if ne.saturating_sub(fe) > keep => {
                    let buf = state.held.pop_front().expect("len > 1");
                    outputs.push(Output::Gap(buf.pts().unwrap_or_default(), buf.duration()));
                    state.discont = true;
                }
                _ => break,
            }
        }
    }

    fn emit(&self, outputs: Vec<Output>) -> Result<gst::FlowSuccess, gst::FlowError> {
        let mut flow = Ok(gst::FlowSuccess::Ok);
        for output in outputs {
            match output {
                Output::Event(boundary) => {
                    gst::debug!(CAT, imp = self, "{:?}", boundary);
                    let _ = self.obj().post_message(
                        gst::message::Element::builder(boundary.to_structure())
                            .src(&*self.obj())
                            .build(),
                    );
                    self.srcpad.push_event(boundary.to_event());
                }
                Output::Pause(pause) => {
                    gst::debug!(CAT, imp = self, "{:?}", pause);
                    let _ = self.obj().post_message(
                        gst::message::Element::builder(pause.to_structure())
                            .src(&*self.obj())
                            .build(),
                    );
                    self.srcpad.push_event(pause.to_event());
                }
                Output::Message(s) => {
                    gst::debug!(CAT, imp = self, "{s}");
                    let _ = self
                        .obj()
                        .post_message(gst::message::Element::builder(s).src(&*self.obj()).build());
                }
                Output::Buffer(buffer) => flow = Ok(self.srcpad.push(buffer)?),
                Output::Gap(pts, duration) => {
                    self.srcpad
                        .push_event(gst::event::Gap::builder(pts).duration(duration).build());
                }
            }
        }
        flow
    }

    fn sink_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        use gst::EventView;
        match event.view() {
            EventView::Caps(c) => {
                let rate = gst_audio::AudioInfo::from_caps(c.caps())
                    .map(|info| info.rate())
                    .unwrap_or(0);
                let needs_load = {
                    let state = self.lock_state();
                    state.rate != rate || state.model.is_none()
                };
                if needs_load {
                    match self.load_model(rate) {
                        Ok(model) => {
                            let settings = self.settings();
                            let mut state = self.lock_state();
                            state.model = Some(model);
                            state.rate = rate;
                            state.detector = Detector::new(settings.detector_config(rate));
                            state.reset_stream();
                        }
                        Err(err) => {
                            self.lock_state().model = None;
                            self.post_error_message(err);
                            return false;
                        }
                    }
                }
                self.srcpad.push_event(event)
            }
            EventView::Segment(s) => {
                if let Ok(segment) = s.segment().clone().downcast::<gst::ClockTime>() {
                    self.lock_state().segment = segment;
                }
                self.srcpad.push_event(event)
            }
            EventView::FlushStop(_) => {
                self.lock_state().reset_stream();
                self.srcpad.push_event(event)
            }
            EventView::Eos(_) => {
                let outputs = {
                    let mut state = self.lock_state();
                    let end = state.samples + state.pending.len() as u64;
                    let mut outputs = Vec::new();
                    if let Some(b) = state.detector.finish(end) {
                        let boundary = self.boundary(&mut state, b);
                        outputs.push(Output::Event(boundary));
                    }
                    if state.detector.in_speech() || !outputs.is_empty() {
                        outputs.extend(state.held.drain(..).map(Output::Buffer));
                    }
                    state.held.clear();
                    outputs
                };
                let _ = self.emit(outputs);
                gst::Pad::event_default(pad, Some(&*self.obj()), event)
            }
            _ => gst::Pad::event_default(pad, Some(&*self.obj()), event),
        }
    }

    fn src_query(&self, pad: &gst::Pad, query: &mut gst::QueryRef) -> bool {
        if let gst::QueryViewMut::Latency(q) = query.view_mut() {
            if !self.sinkpad.peer_query(q.query_mut()) {
                return false;
            }
            let (live, min, max) = q.result();
            let chunk_len = {
                let state = self.lock_state();
                state.model.as_ref().map(|m| m.chunk_len()).unwrap_or(512) as u64
            };
            let rate = u64::from(self.lock_state().rate.max(8000));
            let ours = self.settings().latency(gst::ClockTime::from_nseconds(
                chunk_len * 1_000_000_000 / rate,
            ));
            gst::debug!(CAT, imp = self, "adding {ours} latency");
            q.set(live, min + ours, max.map(|m| m + ours));
            return true;
        }
        gst::Pad::query_default(pad, Some(&*self.obj()), query)
    }
}

#[glib::object_subclass]
impl ObjectSubclass for SileroVad {
    const NAME: &'static str = "GstSileroVad";
    type Type = super::SileroVadElement;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let templ = klass.pad_template("sink").expect("sink template");
        let sinkpad = gst::Pad::builder_from_template(&templ)
            .chain_function(|pad, parent, buffer| {
                SileroVad::catch_panic_pad_function(
                    parent,
                    || Err(gst::FlowError::Error),
                    |imp| imp.sink_chain(pad, buffer),
                )
            })
            .event_function(|pad, parent, event| {
                SileroVad::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.sink_event(pad, event),
                )
            })
            .flags(gst::PadFlags::PROXY_CAPS | gst::PadFlags::PROXY_ALLOCATION)
            .build();
        let templ = klass.pad_template("src").expect("src template");
        let srcpad = gst::Pad::builder_from_template(&templ)
            .query_function(|pad, parent, query| {
                SileroVad::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.src_query(pad, query),
                )
            })
            .flags(gst::PadFlags::PROXY_CAPS | gst::PadFlags::PROXY_ALLOCATION)
            .build();
        Self {
            sinkpad,
            srcpad,
            settings: Mutex::new(Settings::default()),
            state: Mutex::new(State::default()),
        }
    }
}

impl ObjectImpl for SileroVad {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            vec![
                glib::ParamSpecString::builder("model")
                    .nick("Model")
                    .blurb("Silero VAD model: a name from `vox models list` or a path to an .onnx file")
                    .default_value(Some(DEFAULT_MODEL))
                    .mutable_ready()
                    .build(),
                glib::ParamSpecFloat::builder("threshold")
                    .nick("Threshold")
                    .blurb("Speech probability at or above which a chunk is speech")
                    .minimum(0.0)
                    .maximum(1.0)
                    .default_value(DEFAULT_THRESHOLD)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecFloat::builder("negative-threshold")
                    .nick("Negative threshold")
                    .blurb("Probability below which a chunk counts as silence (-1: threshold - 0.15)")
                    .minimum(-1.0)
                    .maximum(1.0)
                    .default_value(DEFAULT_NEG_THRESHOLD)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("min-speech-ms")
                    .nick("Minimum speech")
                    .blurb("Speech shorter than this (coughs, clicks) does not open an utterance")
                    .maximum(10_000)
                    .default_value(DEFAULT_MIN_SPEECH_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("min-silence-ms")
                    .nick("Minimum silence")
                    .blurb("Silence that ends an utterance (the hang-over)")
                    .maximum(10_000)
                    .default_value(DEFAULT_MIN_SILENCE_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("speech-pad-ms")
                    .nick("Speech padding")
                    .blurb("Padding added before speech start and after speech end")
                    .maximum(2_000)
                    .default_value(DEFAULT_SPEECH_PAD_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecUInt::builder("speculate-ms")
                    .nick("Speculate")
                    .blurb("Silence after which speech is reported paused (vox-speech-pause), so that downstream can work on it before min-silence-ms ends it (0: off)")
                    .maximum(10_000)
                    .default_value(DEFAULT_SPECULATE_MS)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("mode", DEFAULT_MODE)
                    .nick("Mode")
                    .blurb("Pass all audio through, or pass speech only")
                    .mutable_ready()
                    .build(),
                glib::ParamSpecEnum::builder_with_default("engine", DEFAULT_ENGINE)
                    .nick("Engine")
                    .blurb("Run the model natively (fast) or on ONNX Runtime (reference); auto picks native when it knows the model's layout")
                    .mutable_ready()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        match pspec.name() {
            "model" => {
                s.model = value
                    .get::<Option<String>>()
                    .expect("type checked upstream")
                    .unwrap_or_else(|| DEFAULT_MODEL.into())
            }
            "threshold" => s.threshold = value.get().expect("type checked upstream"),
            "negative-threshold" => s.neg_threshold = value.get().expect("type checked upstream"),
            "min-speech-ms" => s.min_speech_ms = value.get().expect("type checked upstream"),
            "min-silence-ms" => s.min_silence_ms = value.get().expect("type checked upstream"),
            "speech-pad-ms" => s.speech_pad_ms = value.get().expect("type checked upstream"),
            "speculate-ms" => s.speculate_ms = value.get().expect("type checked upstream"),
            "mode" => s.mode = value.get().expect("type checked upstream"),
            "engine" => s.engine = value.get().expect("type checked upstream"),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings();
        match pspec.name() {
            "model" => s.model.to_value(),
            "threshold" => s.threshold.to_value(),
            "negative-threshold" => s.neg_threshold.to_value(),
            "min-speech-ms" => s.min_speech_ms.to_value(),
            "min-silence-ms" => s.min_silence_ms.to_value(),
            "speech-pad-ms" => s.speech_pad_ms.to_value(),
            "speculate-ms" => s.speculate_ms.to_value(),
            "mode" => s.mode.to_value(),
            "engine" => s.engine.to_value(),
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

impl GstObjectImpl for SileroVad {}

impl ElementImpl for SileroVad {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static METADATA: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "Silero voice activity detector",
                "Filter/Analyzer/Audio",
                "Marks speech with vox-speech-start/-end events and messages (Silero VAD v6). \
                 Example: gst-launch-1.0 -m filesrc location=speech.wav ! decodebin ! \
                 audioconvert ! audioresample ! audio/x-raw,format=F32LE,rate=16000,channels=1 ! \
                 silerovad ! fakesink",
                "Local Voice AI developers",
            )
        });
        Some(&*METADATA)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = gst::Caps::builder("audio/x-raw")
                .field("format", "F32LE")
                .field("layout", "interleaved")
                .field("channels", 1i32)
                .field("rate", gst::List::new([16000i32, 8000i32]))
                .build();
            vec![
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid template"),
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
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
        if transition == gst::StateChange::NullToReady {
            // Load now so a missing model or runtime fails the pipeline at start, naming the file.
            match self.load_model(16000) {
                Ok(model) => {
                    let settings = self.settings();
                    let mut state = self.lock_state();
                    state.model = Some(model);
                    state.rate = 16000;
                    state.detector = Detector::new(settings.detector_config(16000));
                    state.segment = gst::FormattedSegment::new();
                    state.reset_stream();
                    state.utterance = 0;
                }
                Err(err) => {
                    self.post_error_message(err);
                    return Err(gst::StateChangeError);
                }
            }
        }
        let ret = self.parent_change_state(transition)?;
        if transition == gst::StateChange::PausedToReady {
            let mut state = self.lock_state();
            state.reset_stream();
            state.utterance = 0;
            state.segment = gst::FormattedSegment::new();
        }
        if transition == gst::StateChange::ReadyToNull {
            *self.lock_state() = State::default();
        }
        Ok(ret)
    }
}
