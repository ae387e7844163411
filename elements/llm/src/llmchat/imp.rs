//! # llmchat
//!
//! Chat with a language model: each final transcript (a text buffer; interim ones, marked by
//! whisperstt's `vox-transcript` event, are ignored) is one user turn, and the reply goes out
//! as text buffers, one per sentence as soon as it is complete, so speech can start before the
//! reply is finished; with `first-clause` (the default) the reply's opening clause ("Sure,") goes
//! out on its own first.
//!
//! Backends: `openai` streams `/v1/chat/completions` from any OpenAI-compatible server (Ollama,
//! llama.cpp's `llama-server`, vLLM, hosted APIs; key from `$VOX_LLM_API_KEY`,
//! `$OPENAI_API_KEY` or `api-key-file`, never logged); `embedded` runs a GGUF model with
//! llama.cpp in-process (SmolLM2-135M by default), loaded once per process. `auto` (the
//! default) is `openai` when `url` is set, else `embedded`.
//!
//! A backend fault (connection refused, HTTP error, a stalled stream, malformed events, no first
//! token in time) never fails the pipeline: a warning names the cause, the `fallback` sentence is
//! spoken, and the next turn tries again; after `breaker-failures` faults in a row the backend
//! is skipped for `breaker-backoff-ms` (doubling while it keeps failing). FlushStart cancels the
//! generation in flight (the reply so far is kept in the history, marked as cut off); a reply
//! whose text was all out before it is marked cut off too, since downstream drops the speech
//! not heard yet (a barge-in while it is spoken).
//!
//! A transcript after a `vox-turn` event (`state=tentative`; whisperstt `send-ahead`) was made
//! at a pause, before the caller's turn ended: its reply is made at once, after a `vox-turn`
//! event of its own (kokorotts holds its audio), and goes into the history only when the turn
//! is `confirmed`; when it is `withdrawn` (the caller spoke on), the generation stops, nothing
//! is kept, and the turn ends with `outcome` `withdrawn`. Both decisions go on downstream.
//!
//! Each turn posts `vox-llm-first-token` and `vox-llm-first-sentence` (`elapsed` ns since the
//! transcript arrived) as they happen, and a `vox-llm-turn` message at its end: `outcome` (ok,
//! fallback, cancelled, withdrawn), `backend`, `time-to-first-token` (ns), `tokens-per-second`,
//! `tokens-in`, `tokens-cached` (of those, the ones kept evaluated from earlier turns: the
//! embedded backend keeps its context between turns, servers report theirs), `tokens-out`,
//! `reply`, `circuit` (`open` while the breaker skips the backend, else `closed`).
//!
//! ```sh
//! echo "What is the capital of France?" > q.txt
//! gst-launch-1.0 -m filesrc location=q.txt ! text/x-raw,format=utf8 ! llmchat ! fakesink
//! ```

use crossbeam_channel::Receiver;
use gst::glib;
use gst::prelude::*;
use gst::subclass::prelude::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use super::LlmBackend;
use crate::chat::{Breaker, History, Message, Role, Usage};
use crate::embedded::{Embedded, Session};
use crate::openai::{LlmError, OpenAi, Params};
use vox_common::events::{Decisions, Transcript, TurnMark, TurnState};
use vox_common::text::SentenceSplitter;
use vox_common::worker::{Serial, Work};

static CAT: LazyLock<gst::DebugCategory> = LazyLock::new(|| {
    gst::DebugCategory::new("llmchat", gst::DebugColorFlags::empty(), Some("LLM chat"))
});

const DEFAULT_MODEL: &str = "";
const DEFAULT_SYSTEM: &str = "You are a helpful voice assistant. Answer in one to three short \
                              spoken sentences, without lists, markup or emoji.";
const DEFAULT_HISTORY: u32 = 8;
const DEFAULT_MAX_TOKENS: u32 = 160;
const DEFAULT_TEMPERATURE: f32 = 0.2;
const DEFAULT_TIMEOUT_MS: u32 = 30_000;
const DEFAULT_FIRST_TOKEN_MS: u32 = 10_000;
const DEFAULT_FALLBACK: &str = "Sorry, I can't answer right now.";
const DEFAULT_BREAKER_FAILURES: u32 = 3;
const DEFAULT_BREAKER_BACKOFF_MS: u32 = 10_000;
const DEFAULT_THREADS: u32 = 2;
/// The embedded generation runs a little below normal priority: it yields the CPU to speech
/// recognition and synthesis, whose latency the user hears, when they run at once.
const DEFAULT_NICE: i32 = 5;
/// The embedded model when `model` is empty.
const EMBEDDED_DEFAULT: &str = "smollm2-135m";

#[derive(Debug, Clone)]
struct Settings {
    backend: LlmBackend,
    url: String,
    model: String,
    system_prompt: String,
    history: u32,
    max_tokens: u32,
    temperature: f32,
    timeout_ms: u32,
    first_token_timeout_ms: u32,
    fallback: String,
    api_key_file: String,
    breaker_failures: u32,
    breaker_backoff_ms: u32,
    threads: u32,
    first_clause: bool,
    first_words: u32,
    nice: i32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            backend: LlmBackend::Auto,
            url: String::new(),
            model: DEFAULT_MODEL.into(),
            system_prompt: DEFAULT_SYSTEM.into(),
            history: DEFAULT_HISTORY,
            max_tokens: DEFAULT_MAX_TOKENS,
            temperature: DEFAULT_TEMPERATURE,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            first_token_timeout_ms: DEFAULT_FIRST_TOKEN_MS,
            fallback: DEFAULT_FALLBACK.into(),
            api_key_file: String::new(),
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_backoff_ms: DEFAULT_BREAKER_BACKOFF_MS,
            threads: DEFAULT_THREADS,
            first_clause: true,
            first_words: 0,
            nice: DEFAULT_NICE,
        }
    }
}

impl Settings {
    /// The server's URL; none when `url` is empty or `embedded` (llama.cpp in-process).
    fn server_url(&self) -> Option<&str> {
        Some(self.url.trim()).filter(|u| !u.is_empty() && *u != "embedded")
    }

    fn uses_openai(&self) -> bool {
        match self.backend {
            LlmBackend::Auto => self.server_url().is_some(),
            LlmBackend::Openai => true,
            LlmBackend::Embedded => false,
        }
    }

    fn params(&self) -> Params {
        Params {
            model: self.model.clone(),
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            timeout: Duration::from_millis(u64::from(self.timeout_ms)),
            first_token_timeout: Duration::from_millis(u64::from(self.first_token_timeout_ms)),
        }
    }
}

/// The backend, ready at start.
enum Backend {
    OpenAi(OpenAi),
    Embedded(Arc<Embedded>),
}

/// What one worker generates with: the shared HTTP client, or a conversation of its own on the
/// shared model (which keeps the evaluated prompt between turns).
enum Generator<'b> {
    OpenAi(&'b OpenAi),
    Embedded(Session<'b>),
}

impl Generator<'_> {
    fn name(&self) -> &'static str {
        match self {
            Self::OpenAi(_) => "openai",
            Self::Embedded(_) => "embedded",
        }
    }
}

struct TurnJob {
    text: String,
    pts: Option<gst::ClockTime>,
    duration: Option<gst::ClockTime>,
    /// The id of the reply ahead this turn is (its transcript was made at a pause).
    tentative: Option<u64>,
}

pub struct LlmChat {
    sinkpad: gst::Pad,
    srcpad: gst::Pad,
    settings: Mutex<Settings>,
    backend: Mutex<Option<Arc<Backend>>>,
    /// The generation worker; a flush drops queued turns and cancels the one in flight.
    serial: Serial<TurnJob>,
    /// The next buffer follows a `vox-transcript` event marked partial.
    next_partial: Mutex<bool>,
    /// The next buffer follows a `vox-turn` event: it is the reply ahead with this id.
    next_tentative: Mutex<Option<u64>>,
    /// Replies ahead confirmed or withdrawn.
    decisions: Decisions,
    history: Mutex<History>,
    breaker: Mutex<Breaker>,
    turns: AtomicU64,
}

/// The API key from the environment or a file; never logged.
fn api_key(file: &str) -> Result<Option<String>, String> {
    if !file.is_empty() {
        let key = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read the API key file {file}: {e}"))?;
        let key = key.trim().to_string();
        return Ok((!key.is_empty()).then_some(key));
    }
    Ok(["VOX_LLM_API_KEY", "OPENAI_API_KEY"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|k| !k.trim().is_empty())))
}

impl LlmChat {
    fn settings(&self) -> Settings {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn load(&self) -> Result<Backend, String> {
        let s = self.settings();
        if s.uses_openai() {
            if s.server_url().is_none() {
                return Err("backend=openai needs a url (e.g. http://127.0.0.1:11434/v1)".into());
            }
            let key = api_key(&s.api_key_file)?;
            let client = OpenAi::new(&s.url, key).map_err(|e| e.to_string())?;
            gst::info!(
                CAT,
                imp = self,
                "OpenAI-compatible backend at {}",
                client.endpoint()
            );
            Ok(Backend::OpenAi(client))
        } else {
            let model = if s.model.is_empty() {
                EMBEDDED_DEFAULT
            } else {
                &s.model
            };
            let path = vox_common::models::resolve(model, vox_common::models::ModelKind::Llm)
                .map_err(|e| e.to_string())?;
            let m = Embedded::shared(&path, s.threads).map_err(|e| e.to_string())?;
            Ok(Backend::Embedded(m))
        }
    }

    fn start_worker(&self) -> Result<(), gst::ErrorMessage> {
        let backend = self
            .backend
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| gst::error_msg!(gst::CoreError::StateChange, ("backend not ready")))?;
        let element = self.obj().downgrade();
        let settings = self.settings();
        let (system, nice) = (settings.system_prompt, settings.nice);
        let (ready_tx, ready) = crossbeam_channel::bounded(1);
        self.serial
            .start("llmchat", move |rx| {
                worker_loop(element, backend, &system, nice, ready_tx, rx)
            })
            .map_err(|e| gst::error_msg!(gst::CoreError::Thread, ("cannot start worker: {}", e)))?;
        // Until the worker is ready (the system prompt evaluated), so that this does not compete
        // for the CPU with the stages upstream once data flows.
        let _ = ready.recv();
        Ok(())
    }

    fn sink_chain(
        &self,
        _pad: &gst::Pad,
        buffer: gst::Buffer,
    ) -> Result<gst::FlowSuccess, gst::FlowError> {
        let partial =
            std::mem::take(&mut *self.next_partial.lock().unwrap_or_else(|p| p.into_inner()));
        if partial {
            return Ok(gst::FlowSuccess::Ok);
        }
        let tentative = self
            .next_tentative
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let map = buffer.map_readable().map_err(|_| gst::FlowError::Error)?;
        let text = String::from_utf8_lossy(map.as_slice()).trim().to_string();
        if text.is_empty() {
            return Ok(gst::FlowSuccess::Ok);
        }
        let job = TurnJob {
            text,
            pts: buffer.pts(),
            duration: buffer.duration(),
            tentative,
        };
        if self.serial.queue(job) {
            Ok(gst::FlowSuccess::Ok)
        } else {
            Err(gst::FlowError::Flushing)
        }
    }

    fn sink_event(&self, pad: &gst::Pad, event: gst::Event) -> bool {
        use gst::EventView;
        if let Some(t) = event.structure().and_then(Transcript::from_structure) {
            *self.next_partial.lock().unwrap_or_else(|p| p.into_inner()) = t.partial;
        }
        if let Some(mark) = TurnMark::from_event(&event) {
            let mut next = self
                .next_tentative
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match mark.state {
                TurnState::Tentative => *next = Some(mark.id),
                TurnState::Final => *next = None,
                TurnState::Confirmed | TurnState::Withdrawn => {
                    // Its text never came (the application dropped it): nothing to mark.
                    if *next == Some(mark.id) {
                        *next = None;
                    }
                    drop(next);
                    self.decisions
                        .decide(mark.id, mark.state == TurnState::Confirmed);
                    return self.srcpad.push_event(event);
                }
            }
            // This element marks the turns it answers itself (see `turn`).
            return true;
        }
        match event.view() {
            EventView::FlushStart(_) => {
                self.serial.bump();
                // Downstream drops the speech not heard yet: a reply whose text was all out
                // is cut off too (a turn in flight sees the flush and marks its own).
                self.history
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .interrupted();
                self.srcpad.push_event(event)
            }
            EventView::FlushStop(_) => {
                let _push = self
                    .serial
                    .push_lock
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                *self.next_partial.lock().unwrap_or_else(|p| p.into_inner()) = false;
                *self
                    .next_tentative
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()) = None;
                self.srcpad.push_event(event)
            }
            EventView::Caps(_) => {
                let caps = vox_common::TEXT_CAPS
                    .parse::<gst::Caps>()
                    .expect("valid caps");
                self.serial
                    .forward(&self.srcpad, gst::event::Caps::new(&caps))
            }
            _ if event.is_serialized() => self.serial.forward(&self.srcpad, event),
            _ => gst::Pad::event_default(pad, Some(&*self.obj()), event),
        }
    }

    fn push_text(&self, text: &str, pts: gst::ClockTime, duration: gst::ClockTime) {
        let mut buffer = gst::Buffer::from_mut_slice(text.as_bytes().to_vec());
        {
            let b = buffer.get_mut().expect("new buffer");
            b.set_pts(pts);
            b.set_duration(duration);
        }
        if let Err(err) = self.srcpad.push(buffer) {
            gst::debug!(CAT, imp = self, "downstream returned {err:?}");
        }
    }

    fn post(&self, structure: gst::Structure) {
        let _ = self.obj().post_message(
            gst::message::Element::builder(structure)
                .src(&*self.obj())
                .build(),
        );
    }

    /// One user turn: generate, push sentences as they complete, handle faults.
    fn turn(
        &self,
        backend: &mut Generator,
        rt: &tokio::runtime::Runtime,
        job: TurnJob,
        generation: u64,
    ) {
        let settings = self.settings();
        let turn = self.turns.fetch_add(1, Ordering::SeqCst);
        let started = Instant::now();
        // Reply text is stamped from the end of what the user said, plus the time it took to
        // produce; each sentence lasts until the next one was ready.
        let base = match (job.pts, job.duration) {
            (Some(p), Some(d)) => p + d,
            (Some(p), None) => p,
            _ => gst::ClockTime::ZERO,
        };
        let mut last = base;
        let mut reply = String::new();
        let mut splitter = if settings.first_clause {
            SentenceSplitter::first_words(settings.first_words as usize)
        } else {
            SentenceSplitter::default()
        };
        let withdrawn = || job.tentative.is_some_and(|id| self.decisions.withdrawn(id));
        let cancelled = || self.serial.generation() != generation || withdrawn();
        // Downstream learns whether the text that follows is a reply ahead (held until the
        // turn is confirmed) or not.
        {
            let _push = self
                .serial
                .push_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let mark = match job.tentative {
                Some(id) => TurnMark {
                    state: TurnState::Tentative,
                    id,
                },
                None => TurnMark {
                    state: TurnState::Final,
                    id: 0,
                },
            };
            // (A turn withdrawn already still ends with its message, below.)
            if !cancelled() {
                self.srcpad.push_event(mark.to_event());
            }
        }
        let mut first_sentence = true;
        let mut emit = |sentence: &str, reply_so_far: &mut String| {
            let _push = self
                .serial
                .push_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if cancelled() {
                return;
            }
            if std::mem::take(&mut first_sentence) {
                self.post(
                    gst::Structure::builder("vox-llm-first-sentence")
                        .field("turn", turn)
                        .field("text", sentence)
                        .field("elapsed", started.elapsed().as_nanos() as u64)
                        .build(),
                );
            }
            let now = base + gst::ClockTime::from_nseconds(started.elapsed().as_nanos() as u64);
            let pts = last.min(now);
            self.push_text(sentence, pts, now.saturating_sub(pts));
            last = now;
            if !reply_so_far.is_empty() {
                reply_so_far.push(' ');
            }
            reply_so_far.push_str(sentence);
        };

        let now = Instant::now();
        let open = self
            .breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_open(now);
        let messages = {
            let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
            // A reply made ahead at a pause may be withdrawn: until its turn is confirmed, the
            // reply before it may still be the one being spoken (and cut off).
            if job.tentative.is_none() {
                history.begin_turn();
            }
            history.messages(&settings.system_prompt, &job.text)
        };
        let result: Result<Usage, LlmError> = if open {
            Err(LlmError::Backend(
                "skipped: the circuit breaker is open after repeated failures".into(),
            ))
        } else {
            let params = settings.params();
            let mut first_token = true;
            let mut on_delta = |delta: &str| {
                if std::mem::take(&mut first_token) {
                    self.post(
                        gst::Structure::builder("vox-llm-first-token")
                            .field("turn", turn)
                            .field("elapsed", started.elapsed().as_nanos() as u64)
                            .build(),
                    );
                }
                for sentence in splitter.push(delta) {
                    emit(&sentence, &mut reply);
                }
            };
            match backend {
                Generator::OpenAi(client) => rt.block_on(async {
                    tokio::select! {
                        r = client.stream(&messages, &params, &mut on_delta) => r,
                        _ = until_cancelled(&cancelled) => Err(LlmError::Cancelled),
                    }
                }),
                Generator::Embedded(session) => {
                    session.generate(&messages, &params, &cancelled, &mut on_delta)
                }
            }
        };
        let outcome = match &result {
            Ok(_) if !cancelled() => {
                for sentence in splitter.finish() {
                    emit(&sentence, &mut reply);
                }
                self.breaker
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .success();
                "ok"
            }
            Ok(_) | Err(LlmError::Cancelled) => "cancelled",
            Err(e) => {
                gst::element_imp_warning!(
                    self,
                    gst::ResourceError::Read,
                    ("LLM backend {} failed: {}", backend.name(), e)
                );
                if !open
                    && let Some(backoff) = self
                        .breaker
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .failure(Instant::now())
                {
                    gst::element_imp_warning!(
                        self,
                        gst::ResourceError::Read,
                        (
                            "LLM backend {} skipped for {:?} after repeated failures",
                            backend.name(),
                            backoff
                        )
                    );
                }
                // What was said this turn is the fallback (not kept in the history).
                reply.clear();
                if !settings.fallback.trim().is_empty() {
                    emit(settings.fallback.trim(), &mut reply);
                }
                "fallback"
            }
        };
        // A reply ahead is kept only once its turn is confirmed (its text is all out by now, so
        // downstream can make its audio meanwhile).
        let confirmed = match job.tentative {
            None => true,
            Some(id) => self
                .decisions
                .wait(id, &|| self.serial.generation() != generation)
                .is_some_and(|(confirmed, _)| confirmed),
        };
        let outcome = match job.tentative {
            Some(_) if withdrawn() => "withdrawn",
            Some(_) if !confirmed => "cancelled",
            _ => outcome,
        };
        {
            let mut history = self.history.lock().unwrap_or_else(|p| p.into_inner());
            history.set_max_turns(settings.history as usize);
            match outcome {
                // A flush since the text was all out (before this lock) cut its speech off.
                "ok" => history.record(&job.text, &reply, self.serial.generation() != generation),
                // A reply ahead that was never confirmed was never heard.
                "cancelled" if confirmed => history.record(&job.text, &reply, true),
                _ => {}
            }
        }
        let usage = result.unwrap_or_default();
        gst::info!(
            CAT,
            imp = self,
            "turn {turn}: {outcome}, first token {:?}, {:.1} tokens/s, {} in ({} cached) / {} out",
            usage.first_token,
            usage.tokens_per_second(),
            usage.tokens_in,
            usage.tokens_cached,
            usage.tokens_out
        );
        self.post(
            gst::Structure::builder("vox-llm-turn")
                .field("turn", turn)
                .field("outcome", outcome)
                .field("backend", backend.name())
                .field(
                    "time-to-first-token",
                    usage.first_token.map(|d| d.as_nanos() as u64).unwrap_or(0),
                )
                .field("tokens-per-second", usage.tokens_per_second())
                .field("tokens-in", usage.tokens_in)
                .field("tokens-cached", usage.tokens_cached)
                .field("tokens-out", usage.tokens_out)
                .field("reply", reply.as_str())
                .field(
                    "circuit",
                    if self
                        .breaker
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_open(Instant::now())
                    {
                        "open"
                    } else {
                        "closed"
                    },
                )
                .build(),
        );
    }
}

/// Resolves when `cancelled()` turns true (checked every 10 ms).
async fn until_cancelled(cancelled: &impl Fn() -> bool) {
    while !cancelled() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn worker_loop(
    element: glib::WeakRef<super::LlmChatElement>,
    backend: Arc<Backend>,
    system: &str,
    nice: i32,
    ready: crossbeam_channel::Sender<()>,
    rx: Receiver<Work<TurnJob>>,
) {
    // A runtime thread of its own, so HTTP connections keep being driven (and closed at once
    // when a generation is cancelled) between turns.
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("llmchat-io")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            if let Some(obj) = element.upgrade() {
                gst::element_error!(obj, gst::CoreError::Thread, ("cannot start tokio: {}", e));
            }
            return;
        }
    };
    let mut generator = match &*backend {
        Backend::OpenAi(client) => Generator::OpenAi(client),
        Backend::Embedded(model) => {
            // This thread and the compute threads llama.cpp starts from it (they inherit it).
            if nice > 0 {
                // SAFETY: setpriority on the calling thread (who = 0), no pointers involved.
                let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
                if r != 0 {
                    gst::debug!(CAT, "cannot lower the LLM's priority to nice {nice}");
                }
            }
            Generator::Embedded(model.session())
        }
    };
    // The system prompt is evaluated before the first question arrives, so the first turn
    // evaluates only the question. A failure here shows again, as a warning, on the first turn.
    if let Generator::Embedded(session) = &mut generator
        && !system.trim().is_empty()
        && let Err(e) = session.prefill(&[Message::new(Role::System, system)])
    {
        gst::debug!(CAT, "cannot evaluate the system prompt ahead: {e}");
    }
    let _ = ready.send(());
    for work in rx {
        let Some(obj) = element.upgrade() else { return };
        let imp = obj.imp();
        match work {
            Work::Stop => return,
            Work::Event(event, generation) => imp.serial.push_event(&imp.srcpad, event, generation),
            Work::Job(job, generation) => {
                if generation == imp.serial.generation() {
                    imp.turn(&mut generator, &rt, job, generation);
                }
            }
        }
    }
}

#[glib::object_subclass]
impl ObjectSubclass for LlmChat {
    const NAME: &'static str = "GstLlmChat";
    type Type = super::LlmChatElement;
    type ParentType = gst::Element;

    fn with_class(klass: &Self::Class) -> Self {
        let templ = klass.pad_template("sink").expect("sink template");
        let sinkpad = gst::Pad::builder_from_template(&templ)
            .chain_function(|pad, parent, buffer| {
                LlmChat::catch_panic_pad_function(
                    parent,
                    || Err(gst::FlowError::Error),
                    |imp| imp.sink_chain(pad, buffer),
                )
            })
            .event_function(|pad, parent, event| {
                LlmChat::catch_panic_pad_function(
                    parent,
                    || false,
                    |imp| imp.sink_event(pad, event),
                )
            })
            .build();
        let templ = klass.pad_template("src").expect("src template");
        let srcpad = gst::Pad::builder_from_template(&templ).build();
        let s = Settings::default();
        Self {
            sinkpad,
            srcpad,
            history: Mutex::new(History::new(s.history as usize)),
            breaker: Mutex::new(Breaker::new(
                s.breaker_failures,
                Duration::from_millis(u64::from(s.breaker_backoff_ms)),
            )),
            settings: Mutex::new(s),
            backend: Mutex::new(None),
            serial: Serial::default(),
            next_partial: Mutex::new(false),
            next_tentative: Mutex::new(None),
            decisions: Decisions::default(),
            turns: AtomicU64::new(0),
        }
    }
}

impl ObjectImpl for LlmChat {
    fn properties() -> &'static [glib::ParamSpec] {
        static PROPERTIES: LazyLock<Vec<glib::ParamSpec>> = LazyLock::new(|| {
            let string = |name: &str, nick: &str, blurb: &str, default: &str| {
                glib::ParamSpecString::builder(name)
                    .nick(nick)
                    .blurb(blurb)
                    .default_value(Some(default))
                    .mutable_ready()
                    .build()
            };
            let uint = |name: &str, nick: &str, blurb: &str, min: u32, max: u32, default: u32| {
                glib::ParamSpecUInt::builder(name)
                    .nick(nick)
                    .blurb(blurb)
                    .minimum(min)
                    .maximum(max)
                    .default_value(default)
                    .mutable_ready()
                    .build()
            };
            vec![
                glib::ParamSpecEnum::builder_with_default("backend", LlmBackend::Auto)
                    .nick("Backend")
                    .blurb("openai (an OpenAI-compatible server at url), embedded (llama.cpp in-process), or auto: openai when url is set")
                    .mutable_ready()
                    .build(),
                string("url", "URL", "Base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:11434/v1 (Ollama); empty or embedded: llama.cpp in-process", ""),
                string("model", "Model", "Model name for the server; for embedded, a GGUF name from `vox models list` or a path (empty: smollm2-135m)", DEFAULT_MODEL),
                string("system-prompt", "System prompt", "Instructions sent first in every request", DEFAULT_SYSTEM),
                uint("history", "History", "Past exchanges (user + reply) kept and sent with each turn", 0, 1000, DEFAULT_HISTORY),
                uint("max-tokens", "Max tokens", "Longest reply, in tokens", 1, 32768, DEFAULT_MAX_TOKENS),
                glib::ParamSpecFloat::builder("temperature")
                    .nick("Temperature")
                    .blurb("Sampling temperature (0: always the most likely token)")
                    .minimum(0.0)
                    .maximum(2.0)
                    .default_value(DEFAULT_TEMPERATURE)
                    .mutable_ready()
                    .build(),
                uint("timeout-ms", "Timeout", "The whole reply must be done within this", 100, 3_600_000, DEFAULT_TIMEOUT_MS),
                uint("first-token-timeout-ms", "First-token timeout", "The first token must come within this, and no later gap may be longer", 50, 600_000, DEFAULT_FIRST_TOKEN_MS),
                string("fallback", "Fallback", "Said when the backend fails (empty: say nothing)", DEFAULT_FALLBACK),
                string("api-key-file", "API key file", "File holding the API key (else $VOX_LLM_API_KEY or $OPENAI_API_KEY); the key is never logged", ""),
                uint("breaker-failures", "Breaker failures", "Faults in a row after which the backend is skipped for a while", 1, 1000, DEFAULT_BREAKER_FAILURES),
                uint("breaker-backoff-ms", "Breaker back-off", "How long a failing backend is skipped (doubles while it keeps failing)", 0, 3_600_000, DEFAULT_BREAKER_BACKOFF_MS),
                uint("threads", "Threads", "Threads for the embedded backend", 1, 64, DEFAULT_THREADS),
                glib::ParamSpecInt::builder("nice")
                    .nick("Nice")
                    .blurb("Scheduling niceness of the embedded backend's threads (Linux; 0: normal priority). Above 0 the LLM yields the CPU to speech recognition and synthesis while they run at once")
                    .minimum(0)
                    .maximum(19)
                    .default_value(DEFAULT_NICE)
                    .mutable_ready()
                    .build(),
                glib::ParamSpecBoolean::builder("first-clause")
                    .nick("First clause")
                    .blurb("Push the reply's opening clause (up to a comma, semicolon, colon or dash) on its own, so speech starts sooner; sentences after that")
                    .default_value(true)
                    .mutable_playing()
                    .build(),
                glib::ParamSpecUInt::builder("first-words")
                    .nick("First words")
                    .blurb("With first-clause: end the opening piece after this many words when no clause mark came first (speech starts sooner, the first sentence's intonation suffers); 0: wait for a mark")
                    .default_value(0)
                    .mutable_playing()
                    .build(),
            ]
        });
        PROPERTIES.as_ref()
    }

    fn set_property(&self, _id: usize, value: &glib::Value, pspec: &glib::ParamSpec) {
        let mut s = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let string = || {
            value
                .get::<Option<String>>()
                .expect("type checked upstream")
                .unwrap_or_default()
        };
        match pspec.name() {
            "backend" => s.backend = value.get().expect("type checked upstream"),
            "url" => s.url = string(),
            "model" => s.model = string(),
            "system-prompt" => s.system_prompt = string(),
            "history" => s.history = value.get().expect("type checked upstream"),
            "max-tokens" => s.max_tokens = value.get().expect("type checked upstream"),
            "temperature" => s.temperature = value.get().expect("type checked upstream"),
            "timeout-ms" => s.timeout_ms = value.get().expect("type checked upstream"),
            "first-token-timeout-ms" => {
                s.first_token_timeout_ms = value.get().expect("type checked upstream")
            }
            "fallback" => s.fallback = string(),
            "api-key-file" => s.api_key_file = string(),
            "breaker-failures" => s.breaker_failures = value.get().expect("type checked upstream"),
            "breaker-backoff-ms" => {
                s.breaker_backoff_ms = value.get().expect("type checked upstream")
            }
            "threads" => s.threads = value.get().expect("type checked upstream"),
            "first-clause" => s.first_clause = value.get().expect("type checked upstream"),
            "first-words" => s.first_words = value.get().expect("type checked upstream"),
            "nice" => s.nice = value.get().expect("type checked upstream"),
            other => unreachable!("unknown property {other}"),
        }
    }

    fn property(&self, _id: usize, pspec: &glib::ParamSpec) -> glib::Value {
        let s = self.settings();
        match pspec.name() {
            "backend" => s.backend.to_value(),
            "url" => s.url.to_value(),
            "model" => s.model.to_value(),
            "system-prompt" => s.system_prompt.to_value(),
            "history" => s.history.to_value(),
            "max-tokens" => s.max_tokens.to_value(),
            "temperature" => s.temperature.to_value(),
            "timeout-ms" => s.timeout_ms.to_value(),
            "first-token-timeout-ms" => s.first_token_timeout_ms.to_value(),
            "fallback" => s.fallback.to_value(),
            "api-key-file" => s.api_key_file.to_value(),
            "breaker-failures" => s.breaker_failures.to_value(),
            "breaker-backoff-ms" => s.breaker_backoff_ms.to_value(),
            "threads" => s.threads.to_value(),
            "first-clause" => s.first_clause.to_value(),
            "first-words" => s.first_words.to_value(),
            "nice" => s.nice.to_value(),
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

impl GstObjectImpl for LlmChat {}

impl ElementImpl for LlmChat {
    fn metadata() -> Option<&'static gst::subclass::ElementMetadata> {
        static META: LazyLock<gst::subclass::ElementMetadata> = LazyLock::new(|| {
            gst::subclass::ElementMetadata::new(
                "LLM chat",
                "Filter/Text",
                "Answers each final transcript with an LLM (OpenAI-compatible server or llama.cpp \
                 in-process), one text buffer per sentence as it completes. Example: \
                 gst-launch-1.0 -m filesrc location=q.txt ! text/x-raw,format=utf8 ! llmchat ! fakesink",
                "Local Voice AI",
            )
        });
        Some(&*META)
    }

    fn pad_templates() -> &'static [gst::PadTemplate] {
        static TEMPLATES: LazyLock<Vec<gst::PadTemplate>> = LazyLock::new(|| {
            let caps = vox_common::TEXT_CAPS
                .parse::<gst::Caps>()
                .expect("valid caps");
            vec![
                gst::PadTemplate::new(
                    "sink",
                    gst::PadDirection::Sink,
                    gst::PadPresence::Always,
                    &caps,
                )
                .expect("valid template"),
                gst::PadTemplate::new(
                    "src",
                    gst::PadDirection::Src,
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
        match transition {
            gst::StateChange::NullToReady => {
                let s = self.settings();
                *self.breaker.lock().unwrap_or_else(|p| p.into_inner()) = Breaker::new(
                    s.breaker_failures,
                    Duration::from_millis(u64::from(s.breaker_backoff_ms)),
                );
                match self.load() {
                    Ok(b) => {
                        *self.backend.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(b))
                    }
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
            *self.backend.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        ret
    }
}
