//! `vox agent`: the live voice agent. One pipeline per session (a caller, or a LiveKit job),
//! built from a ready graph (`agent-webrtc`, `agent-livekit`); all sessions share the models
//! loaded in the process. A session that fails is logged and torn down without touching the
//! others. On the first interrupt (SIGTERM, Ctrl-C) the agent stops taking callers (and tells
//! the LiveKit server it is full) and lets active sessions finish, up to the drain timeout; a
//! second interrupt or the timeout ends them.

use crate::graph::{self, GraphError};
use crate::livekit::{self, Assignment, Credentials, JobOutcome, LivekitError, Reporter, Worker};
use crate::metrics::{HttpError, HttpServer, Metrics};
use crate::runner::{self, RunError};
use crate::webrtc::{self, ProducerEvent, Signalling, Watch, WebrtcError};
use gst::glib;
use gst::prelude::*;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};
use vox_common::events;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Webrtc(#[from] WebrtcError),
    #[error("cannot load the models: {0}")]
    Models(String),
    #[error(transparent)]
    Http(#[from] HttpError),
    #[error(transparent)]
    Livekit(#[from] LivekitError),
}

/// How callers reach the agent.
#[derive(Debug, Clone)]
pub enum Transport {
    /// Plain WebRTC: callers publish on a signalling server, run in-process on `listen` unless
    /// `url` names one that already runs.
    Webrtc { listen: String, url: Option<String> },
    /// LiveKit: the agent registers as a worker with the server's agent service and joins the
    /// rooms of the jobs it is given.
    Livekit {
        url: String,
        agent_name: String,
        credentials: Credentials,
    },
}

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub transport: Transport,
    /// The session graph and its parameters (besides those the transport sets: `signalling`,
    /// `caller`, `call` for WebRTC; `livekit-url`, `room` for LiveKit).
    pub graph: String,
    pub params: Vec<(String, String)>,
    pub max_sessions: usize,
    pub drain_timeout: Duration,
    /// Barge-in needs this many transcribed words besides `min-speech-ms` of speech (0: speech
    /// alone interrupts). Shorter speech ("uh-huh") while the agent talks does not interrupt.
    pub barge_in_words: usize,
    /// Where `/healthz`, `/readyz` and `/metrics` are served (`HOST:PORT`); none when empty.
    pub http_listen: String,
}

impl Default for AgentOptions {
    fn default() -> Self {
        Self {
            transport: Transport::Webrtc {
                listen: "0.0.0.0:8443".into(),
                url: None,
            },
            graph: "agent-webrtc".into(),
            params: Vec::new(),
            max_sessions: 4,
            drain_timeout: Duration::from_secs(30),
            barge_in_words: 0,
            http_listen: "0.0.0.0:9090".into(),
        }
    }
}

struct Session {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The running agent.
pub struct Agent {
    options: AgentOptions,
    url: String,
    _signalling: Option<Signalling>,
    sessions: Sessions,
    accepting: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
    /// Why the transport is not connected (signalling watch, LiveKit registration), if it is not.
    transport_fault: Arc<Mutex<Option<String>>>,
    worker: Option<Worker>,
    http: Option<HttpServer>,
    /// The model elements of one session, kept in READY so the models are loaded before the
    /// first caller and stay loaded between callers.
    warm: gst::Pipeline,
    _watch: Option<Watch>,
}

impl Agent {
    /// Loads the models, starts (or joins) the signalling server and waits for callers.
    pub fn start(options: AgentOptions) -> Result<Self, AgentError> {
        if let Transport::Livekit { url, .. } = &options.transport {
            livekit::ws_url(url, "/agent")?;
        }
        limit_malloc_arenas();
        runner::init()?;
        crate::metrics::Accelerator::detect().log();
        let metrics = Arc::new(Metrics::new());
        let accepting = Arc::new(AtomicBool::new(true));
        let loaded = Arc::new(AtomicBool::new(false));
        let transport_fault = Arc::new(Mutex::new(None::<String>));
        // The endpoints come first: /healthz answers while the models load, /readyz says so.
        let http = if options.http_listen.is_empty() {
            None
        } else {
            let (accepting, loaded, fault) =
                (accepting.clone(), loaded.clone(), transport_fault.clone());
            Some(HttpServer::start(
                &options.http_listen,
                metrics.clone(),
                move || {
                    if !loaded.load(Ordering::SeqCst) {
                        return Err("loading the models".into());
                    }
                    if !accepting.load(Ordering::SeqCst) {
                        return Err("draining".into());
                    }
                    match &*fault.lock().unwrap_or_else(|p| p.into_inner()) {
                        Some(why) => Err(format!("transport: {why}")),
                        None => Ok(()),
                    }
                },
            )?)
        };
        let warm = Self::load_models(&options)?;
        let (signalling, url) = match &options.transport {
            Transport::Webrtc { url: Some(url), .. } => (None, url.clone()),
            Transport::Webrtc { listen, url: None } => {
                let s = Signalling::start(listen)?;
                let url = local_url(&s);
                (Some(s), url)
            }
            Transport::Livekit { url, .. } => (None, url.clone()),
        };
        let mut agent = Self {
            options,
            url,
            _signalling: signalling,
            sessions: Arc::new(Mutex::new(HashMap::new())),
            accepting,
            metrics,
            transport_fault,
            worker: None,
            http,
            warm,
            _watch: None,
        };
        match agent.options.transport.clone() {
            Transport::Webrtc { .. } => agent._watch = Some(agent.watch()?),
            Transport::Livekit {
                url,
                agent_name,
                credentials,
            } => {
                let (reporter, outbox) = livekit::reporter();
                let jobs = Arc::new(LivekitJobs {
                    options: agent.options.clone(),
                    credentials: credentials.clone(),
                    sessions: agent.sessions.clone(),
                    accepting: agent.accepting.clone(),
                    metrics: agent.metrics.clone(),
                    reporter: reporter.clone(),
                });
                agent.worker = Some(Worker::start(
                    livekit::WorkerOptions {
                        url,
                        agent_name,
                        status_interval: Duration::from_millis(2500),
                    },
                    credentials,
                    jobs,
                    (reporter, outbox),
                    agent.transport_fault.clone(),
                )?);
            }
        }
        loaded.store(true, Ordering::SeqCst);
        Ok(agent)
    }

    /// Where the HTTP endpoints are served, if they are.
    pub fn http_addr(&self) -> Option<std::net::SocketAddr> {
        self.http.as_ref().map(HttpServer::addr)
    }

    /// Where callers reach the agent: the signalling server's URL, or the LiveKit server's.
    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn active_sessions(&self) -> usize {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    fn load_models(options: &AgentOptions) -> Result<gst::Pipeline, AgentError> {
        let transport: &[(&str, &str)] = match options.transport {
            Transport::Webrtc { .. } => &[
                ("signalling", "ws://127.0.0.1:1"),
                ("caller", "none"),
                ("call", "none"),
            ],
            Transport::Livekit { .. } => &[("livekit-url", "ws://127.0.0.1:1"), ("room", "none")],
        };
        let description = render(options, transport)?;
        let pipeline = runner::launch(&description)?;
        for name in ["vad", "stt", "llm", "tts"] {
            let Some(element) = pipeline.by_name(name) else {
                continue;
            };
            if element.set_state(gst::State::Ready).is_err() {
                let bus = pipeline.bus().expect("a pipeline has a bus");
                let why = first_error(&bus).unwrap_or_else(|| format!("{name} failed to start"));
                return Err(AgentError::Models(why));
            }
        }
        Ok(pipeline)
    }

    /// Watches the signalling server for callers, connecting again whenever the connection is
    /// lost (`/readyz` names the fault meanwhile).
    fn watch(&self) -> Result<Watch, AgentError> {
        let sessions = self.sessions.clone();
        let accepting = self.accepting.clone();
        let metrics = self.metrics.clone();
        let fault = self.transport_fault.clone();
        let options = self.options.clone();
        let url = self.url.clone();
        let on_event = move |event| match event {
            ProducerEvent::Added(p) if p.meta_str("vox-role").as_deref() == Some("caller") => {
                let call = p.meta_str("call").unwrap_or_else(|| p.id.clone());
                let mut map = sessions.lock().unwrap_or_else(|e| e.into_inner());
                // A new connection reports the callers present again.
                if map.contains_key(&p.id) {
                    return;
                }
                if !accepting.load(Ordering::SeqCst) || map.len() >= options.max_sessions {
                    metrics.sessions_refused.inc();
                    tracing::warn!(
                        "caller {} refused: {}",
                        p.id,
                        if accepting.load(Ordering::SeqCst) {
                            "all sessions are busy"
                        } else {
                            "draining"
                        }
                    );
                    return;
                }
                let stop = Arc::new(AtomicBool::new(false));
                let started = render(
                    &options,
                    &[("signalling", &url), ("caller", &p.id), ("call", &call)],
                )
                .map_err(|e| e.to_string())
                .and_then(|d| runner::launch(&d).map_err(|e| e.to_string()))
                .and_then(|pipeline| {
                    spawn_session(
                        p.id.clone(),
                        call,
                        pipeline,
                        stop.clone(),
                        sessions.clone(),
                        metrics.clone(),
                        options.barge_in_words,
                        Box::new(|_| {}),
                    )
                    .map_err(|e| format!("cannot start a session thread: {e}"))
                });
                match started {
                    Ok(thread) => {
                        map.insert(
                            p.id.clone(),
                            Session {
                                stop,
                                thread: Some(thread),
                            },
                        );
                    }
                    Err(e) => {
                        metrics.sessions_failed.inc();
                        metrics.error("session");
                        tracing::error!("session for caller {} not started: {e}", p.id);
                    }
                }
            }
            ProducerEvent::Added(_) | ProducerEvent::Connected => {}
            ProducerEvent::Removed(id) => {
                if let Some(s) = sessions.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
                    tracing::info!("caller {id} left");
                    s.stop.store(true, Ordering::SeqCst);
                }
            }
            ProducerEvent::Error(e) => {
                tracing::error!("signalling: {e}; connecting again");
                metrics.error("transport");
                *fault.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
            }
        };
        let fault = self.transport_fault.clone();
        let connected = move || {
            if fault
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
                .is_some()
            {
                tracing::info!("signalling: connected again");
            }
        };
        Ok(Watch::start(&self.url, on_event, connected)?)
    }

    /// Stops taking callers; waits for active sessions to end, up to `timeout` (or until
    /// `give_up()`), then ends those left.
    pub fn drain(&self, timeout: Duration, give_up: impl Fn() -> bool) {
        self.accepting.store(false, Ordering::SeqCst);
        if let Some(worker) = &self.worker {
            worker.reporter().status();
        }
        let started = Instant::now();
        while self.active_sessions() > 0 && started.elapsed() < timeout && !give_up() {
            std::thread::sleep(Duration::from_millis(100));
        }
        self.stop_all();
    }

    fn stop_all(&self) {
        let threads: Vec<_> = {
            let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
            map.values_mut()
                .filter_map(|s| {
                    s.stop.store(true, Ordering::SeqCst);
                    s.thread.take()
                })
                .collect()
        };
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self._watch = None;
        self.stop_all();
        self.worker = None;
        let _ = self.warm.set_state(gst::State::Null);
    }
}

/// Each session runs a dozen threads (streaming, WebRTC, models); glibc gives busy threads
/// malloc arenas of their own (up to 8 per core) and keeps what they freed, so an agent's memory
/// would creep up caller after caller (measured: +21 MB per call). Two arenas, and trimming
/// after each session, keep it flat (+1 MB per call over six calls).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets an allocator parameter.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// A URL for the local signalling server that other processes on this host can use.
fn local_url(s: &Signalling) -> String {
    let addr = s.addr();
    if addr.ip().is_unspecified() {
        format!("ws://127.0.0.1:{}", addr.port())
    } else {
        s.url()
    }
}

type Sessions = Arc<Mutex<HashMap<String, Session>>>;

/// Told how a session ended (the LiveKit job status).
type Ended = Box<dyn FnOnce(&Result<(), String>) + Send>;

/// The session graph with the user's parameters and the transport's `values`.
fn render(options: &AgentOptions, values: &[(&str, &str)]) -> Result<String, GraphError> {
    let mut all: Vec<(&str, String)> = options
        .params
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    all.extend(values.iter().map(|(k, v)| (*k, v.to_string())));
    graph::render_named(&options.graph, &all)
}

/// The agent's side of the LiveKit worker: its load, and a session per job.
struct LivekitJobs {
    options: AgentOptions,
    credentials: Credentials,
    sessions: Sessions,
    accepting: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    reporter: Reporter,
}

impl livekit::Jobs for LivekitJobs {
    fn load(&self) -> (usize, usize, bool) {
        let active = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        (
            active,
            self.options.max_sessions,
            self.accepting.load(Ordering::SeqCst),
        )
    }

    fn assign(&self, job: Assignment) -> Result<(), String> {
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&job.job_id) {
            return Err("job already running".into());
        }
        let pipeline = render(
            &self.options,
            &[("livekit-url", &job.url), ("room", &job.room)],
        )
        .map_err(|e| e.to_string())
        .and_then(|d| runner::launch(&d).map_err(|e| e.to_string()))
        .and_then(|p| self.join(&p, &job).map(|()| p));
        let pipeline = match pipeline {
            Ok(p) => p,
            Err(e) => {
                self.metrics.sessions_failed.inc();
                self.metrics.error("session");
                return Err(e);
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let reporter = self.reporter.clone();
        let id = job.job_id.clone();
        let thread = spawn_session(
            job.job_id.clone(),
            job.room.clone(),
            pipeline,
            stop.clone(),
            self.sessions.clone(),
            self.metrics.clone(),
            self.options.barge_in_words,
            Box::new(move |result| {
                reporter.job(
                    &id,
                    match result {
                        Ok(()) => JobOutcome::Done,
                        Err(e) => JobOutcome::Failed(e.clone()),
                    },
                )
            }),
        )
        .map_err(|e| format!("cannot start a session thread: {e}"))?;
        map.insert(
            job.job_id,
            Session {
                stop,
                thread: Some(thread),
            },
        );
        Ok(())
    }

    fn terminate(&self, job_id: &str) {
        if let Some(s) = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(job_id)
        {
            s.stop.store(true, Ordering::SeqCst);
        }
    }
}

impl LivekitJobs {
    /// Gives the session's LiveKit elements their tokens: the job's own (the agent's
    /// participant, publishing the voice) to `agent`, and to `caller` a hidden, listen-only
    /// participant's, which subscribes to the job's participant (or anyone but the agent).
    fn join(&self, pipeline: &gst::Pipeline, job: &Assignment) -> Result<(), String> {
        let signaller = |name: &str| {
            pipeline
                .by_name(name)
                .filter(|e| e.has_property("signaller"))
                .map(|e| e.property::<glib::Object>("signaller"))
                .filter(|s| s.has_property("auth-token"))
                .ok_or_else(|| format!("the session graph has no LiveKit element named {name:?}"))
        };
        let (voice, ears) = (signaller("agent")?, signaller("caller")?);
        let listener = format!("{}-ears", job.identity);
        let token = self
            .credentials
            .room_token(
                &job.room,
                &listener,
                "vox agent (listening)",
                livekit::Role::AgentListener,
                Duration::from_secs(24 * 3600),
            )
            .map_err(|e| e.to_string())?;
        voice.set_property("auth-token", &job.token);
        ears.set_property("auth-token", &token);
        match &job.participant {
            Some(p) => ears.set_property("producer-peer-id", p),
            None => ears.set_property(
                "excluded-producer-peer-ids",
                gst::Array::new([job.identity.as_str()]),
            ),
        }
        Ok(())
    }
}

/// Runs one session's pipeline on a thread of its own until it ends, fails or is stopped;
/// `ended` hears how.
#[allow(clippy::too_many_arguments)]
fn spawn_session(
    caller: String,
    call: String,
    pipeline: gst::Pipeline,
    stop: Arc<AtomicBool>,
    sessions: Sessions,
    metrics: Arc<Metrics>,
    words: usize,
    ended: Ended,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let short: String = call.chars().take(8).collect();
    std::thread::Builder::new()
        .name(format!("session-{short}"))
        .spawn(move || {
            metrics.sessions.inc();
            metrics.sessions_active.inc();
            tracing::info!("session {call}: caller {caller}");
            let result = run_session(&call, &pipeline, &stop, &metrics, words);
            if !webrtc::stop_within(&pipeline, Duration::from_secs(10)) {
                // Its threads stay stuck; the session is over for everyone else.
                tracing::error!(
                    "session {call}: its WebRTC elements did not stop within 10 s \
                     (gst-plugin-webrtc's signaller can hang when both sides end the session \
                     at once); left behind"
                );
            }
            match &result {
                Ok(()) => tracing::info!("session {call} ended"),
                Err(e) => {
                    metrics.sessions_failed.inc();
                    tracing::error!("session {call} failed: {e}");
                }
            }
            metrics.sessions_active.dec();
            // What the session freed goes back to the system, so the agent's memory returns to
            // its baseline between callers.
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only walks the allocator's own free lists.
            unsafe {
                libc::malloc_trim(0);
            }
            sessions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&caller);
            ended(&result);
        })
}

fn run_session(
    call: &str,
    pipeline: &gst::Pipeline,
    stop: &AtomicBool,
    metrics: &Metrics,
    words: usize,
) -> Result<(), String> {
    webrtc::no_public_stun(pipeline.upcast_ref());
    webrtc::low_latency(pipeline.upcast_ref());
    let voice = Voice::new(pipeline, metrics.voice_underrun_seconds.clone(), call).map(Arc::new);
    let judge = Arc::new(Mutex::new(Judge {
        rule: BargeIn::new(words),
        interim: (words > 0).then(|| Interim::new(pipeline)).flatten(),
    }));
    if let Some(voice) = &voice {
        judge_in_stream(call, pipeline, voice, &judge);
    }

    let mut clock = TurnClock::default();
    let on_board = Waiting::join(call, pipeline);
    let bus = pipeline.bus().expect("a pipeline has a bus");
    if pipeline.set_state(gst::State::Playing).is_err() {
        return Err(
            first_error(&bus).unwrap_or_else(|| "the session pipeline failed to start".to_string())
        );
    }
    while !stop.load(Ordering::SeqCst) {
        // Looked at every turn of the loop, whatever the bus brings.
        if let Some(voice) = &voice {
            let mut j = judge.lock().unwrap_or_else(|p| p.into_inner());
            if j.rule.overdue().is_some() {
                tracing::info!(
                    "session {call}: no transcript of the speech {} s after it, resuming",
                    JUDGE_LIMIT.as_secs()
                );
                voice.mute(false);
                j.sync();
            }
        }
        let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else {
            continue;
        };
        match msg.view() {
            gst::MessageView::Error(e) => {
                // livekitwebrtcsrc's room timeout: everyone else left the room.
                if e.error().message().contains("Room timeout reached") {
                    tracing::info!("session {call}: the room is empty");
                    return Ok(());
                }
                metrics.error(stage_of(msg.src()));
                return Err(runner::describe_error(e));
            }
            gst::MessageView::Eos(_) => return Ok(()),
            gst::MessageView::Warning(w) => {
                metrics.error(stage_of(msg.src()));
                tracing::warn!("session {call}: {}", w.error());
            }
            gst::MessageView::Latency(_) => {
                let _ = pipeline.recalculate_latency();
                let mut q = gst::query::Latency::new();
                if pipeline.query(&mut q) {
                    tracing::debug!("session {call}: latency {:?}", q.result());
                }
            }
            gst::MessageView::Element(_) => {
                let Some(s) = msg.structure() else { continue };
                log_message(call, s);
                clock.mark(call, s, pipeline, metrics);
                if let Some(board) = &on_board {
                    board.heard(s.name().as_str());
                }
                // What the stream decided about speech over the agent (`judge_in_stream`).
                if s.name() == BARGE_IN {
                    match s.get::<&str>("act") {
                        Ok("interrupt") => {
                            tracing::info!("session {call}: interrupted by the caller");
                            metrics.interruptions.inc();
                        }
                        Ok("resume") => {
                            clock.not_a_turn();
                            tracing::info!("session {call}: not an interruption, resuming");
                        }
                        _ => clock.not_a_turn(),
                    }
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// How long after the end of a caller's speech its answer's first audio is awaited at most
/// (a turn with nothing to answer ends without audio), and after its start.
const AWAITED_AFTER_END: Duration = Duration::from_secs(5);
const AWAITED_AFTER_START: Duration = Duration::from_secs(30);

/// The callers of the process's sessions who wait for an answer's first audio, and what that
/// does to the others' speech. `kokorotts first-words` speaks a sentence's opening on its own
/// for sooner first audio; that costs the cores ~0.35 s more than the sentence whole, which a
/// lone caller's answer can spare and two at once cannot: two callers who end their questions
/// together on 2 cores either heard the first answer stop for ~1 s in mid-sentence, or the
/// second answer start 2.3× later than alone. So while another caller waits for their first
/// audio, a session speaks whole sentences: the first answer is a little later (its whole first
/// sentence at once), and the second caller's stages and opening fit in the first answer's
/// audio. The cores are the process's ([`vox_common::cpu::Cores`]), so is this board.
struct Waiting {
    /// Each session's waiter, by a key of its own (a call name may come twice: two LiveKit jobs
    /// in one room).
    sessions: Mutex<HashMap<u64, Waiter>>,
    next: AtomicU64,
}

struct Waiter {
    /// The session, for the log.
    call: String,
    /// Sets the session's `first-words`.
    set: Box<dyn Fn(u32) + Send>,
    /// The graph's `first-words`.
    first_words: u32,
    /// Until when this caller waits for first audio (None: not waiting).
    until: Option<Instant>,
    /// Whether whole sentences were asked for.
    whole: bool,
}

static WAITING: LazyLock<Waiting> = LazyLock::new(Waiting::default);

impl Default for Waiting {
    fn default() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
        }
    }
}

/// A session's place on the board, left when dropped.
struct OnBoard<'a>(&'a Waiting, u64);

impl OnBoard<'_> {
    /// What the session's bus message `name` says about its caller's waiting.
    fn heard(&self, name: &str) {
        self.0.heard(self.1, name);
    }
}

impl Drop for OnBoard<'_> {
    fn drop(&mut self) {
        let mut map = self.0.sessions.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&self.1);
        Waiting::update(&mut map);
    }
}

impl Waiting {
    /// Puts the session `call` on the process's board, if its graph has a `tts` with
    /// `first-words`.
    fn join(call: &str, pipeline: &gst::Pipeline) -> Option<OnBoard<'static>> {
        let tts = pipeline
            .by_name("tts")
            .filter(|t| t.has_property("first-words"))?;
        let first_words = tts.property("first-words");
        let tts = tts.downgrade();
        let set = move |words: u32| {
            if let Some(tts) = tts.upgrade() {
                tts.set_property("first-words", words);
            }
        };
        Some(WAITING.put(call, first_words, Box::new(set)))
    }

    fn put(&self, call: &str, first_words: u32, set: Box<dyn Fn(u32) + Send>) -> OnBoard<'_> {
        let key = self.next.fetch_add(1, Ordering::SeqCst);
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let waiter = Waiter {
            call: call.to_string(),
            set,
            first_words,
            until: None,
            whole: false,
        };
        map.insert(key, waiter);
        Waiting::update(&mut map);
        OnBoard(self, key)
    }

    fn heard(&self, key: u64, name: &str) {
        let now = Instant::now();
        let until = match name {
            events::SPEECH_START | events::SPEECH_RESUME => Some(now + AWAITED_AFTER_START),
            events::SPEECH_END => Some(now + AWAITED_AFTER_END),
            "vox-tts-first-audio" => None,
            _ => return,
        };
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = map.get_mut(&key) {
            w.until = until;
        }
        Waiting::update(&mut map);
    }

    /// Whole sentences for each session while another's caller waits; its openings otherwise.
    fn update(map: &mut HashMap<u64, Waiter>) {
        let now = Instant::now();
        let waiting: Vec<u64> = map
            .iter()
            .filter(|(_, w)| w.until.is_some_and(|u| u > now))
            .map(|(key, _)| *key)
            .collect();
        for (key, w) in map.iter_mut() {
            let whole = waiting.iter().any(|k| k != key);
            if whole == w.whole || w.first_words == 0 {
                continue;
            }
            w.whole = whole;
            (w.set)(if whole { 0 } else { w.first_words });
            tracing::debug!("session {}: whole sentences: {whole}", w.call);
        }
    }
}

/// Which stage an element belongs to, for the error counter.
fn stage_of(src: Option<&gst::Object>) -> &'static str {
    let Some(src) = src else { return "session" };
    // The element itself or the bin it is inside (webrtcsrc/webrtcsink internals).
    let mut object = Some(src.clone());
    while let Some(o) = object {
        match o.name().as_str() {
            "vad" => return "vad",
            "stt" => return "stt",
            "llm" => return "llm",
            "tts" => return "tts",
            "caller" | "agent" => return "transport",
            _ => object = o.parent(),
        }
    }
    "session"
}

/// A turn's marks as the messages come, observed into the latency histograms; each answered
/// turn's breakdown goes to the log (info). With replies made ahead (whisperstt `send-ahead`)
/// the LLM's first piece may come before the turn ends: the stages count from the later of
/// their start and the end of the turn, so a stage done ahead counts 0.
#[derive(Default)]
struct TurnClock {
    /// The VAD's end of speech: when its message came, and the boundary's running time.
    speech_end: Option<(Instant, gst::ClockTime)>,
    /// When this turn's final transcript came.
    transcript_at: Option<Instant>,
    /// When the LLM's first piece of text came since the caller last spoke.
    first_piece_at: Option<Instant>,
    /// The turn whose first audio is awaited.
    awaiting_audio: Option<Breakdown>,
}

/// Where a turn's voice to voice went, in the agent: from the end of the caller's speech (the
/// VAD's boundary) to the first answer audio leaving kokorotts.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Breakdown {
    /// The end of speech's running time.
    end: gst::ClockTime,
    /// The silence that ends the turn, and the VAD's chunk: boundary → its message.
    end_of_turn: Duration,
    /// The end of the turn → the final transcript.
    transcript: Duration,
    /// The transcript → the reply's first piece of text.
    llm: Duration,
    /// That text → its first audio.
    tts: Duration,
}

impl Breakdown {
    /// The line logged for a turn whose first audio left at `voice_to_voice` after the end of
    /// speech: the stages, and what they leave (queues, messages, scheduling).
    fn line(&self, voice_to_voice: Duration) -> String {
        let ms = |d: Duration| d.as_millis();
        let stages = self.end_of_turn + self.transcript + self.llm + self.tts;
        format!(
            "turn: voice to voice {} ms in the agent = end of turn {} ms + transcript {} ms + LLM first piece {} ms + Kokoro first audio {} ms + rest {} ms",
            ms(voice_to_voice),
            ms(self.end_of_turn),
            ms(self.transcript),
            ms(self.llm),
            ms(self.tts),
            ms(voice_to_voice.saturating_sub(stages)),
        )
    }
}

impl TurnClock {
    /// The last final transcript is not answered (a backchannel heard over the agent).
    fn not_a_turn(&mut self) {
        self.awaiting_audio = None;
        self.transcript_at = None;
    }

    fn mark(
        &mut self,
        call: &str,
        s: &gst::StructureRef,
        pipeline: &gst::Pipeline,
        metrics: &Metrics,
    ) {
        let ns = |field: &str| Duration::from_nanos(s.get::<u64>(field).unwrap_or(0));
        let now = Instant::now();
        match s.name().as_str() {
            events::SPEECH_END => {
                if let Some(b) = events::SpeechBoundary::from_structure(s) {
                    self.speech_end = Some((now, b.running_time));
                }
            }
            // A piece made before speech went on belongs to a reply withdrawn.
            events::SPEECH_START | events::SPEECH_RESUME => {
                self.first_piece_at = None;
                self.transcript_at = None;
            }
            "vox-llm-first-sentence" => {
                self.first_piece_at = Some(now);
                if let (Some(turn), Some(at)) = (self.awaiting_audio.as_mut(), self.transcript_at) {
                    turn.llm = now.saturating_duration_since(at);
                }
            }
            "vox-llm-turn" => {
                let outcome = s.get::<&str>("outcome").unwrap_or_default();
                if outcome != "cancelled" && outcome != "withdrawn" {
                    metrics.turns.inc();
                }
                if outcome == "fallback" {
                    metrics.error("llm");
                }
                let first = ns("time-to-first-token");
                if !first.is_zero() {
                    metrics.first_token_seconds.observe(first.as_secs_f64());
                }
                let open = s.get::<&str>("circuit").is_ok_and(|c| c == "open");
                metrics.llm_circuit_open.set(i64::from(open));
            }
            "vox-tts-first-audio" => {
                metrics
                    .first_audio_seconds
                    .observe(ns("time-to-first-audio").as_secs_f64());
                if let (Some(mut turn), Some(running)) =
                    (self.awaiting_audio.take(), pipeline.current_running_time())
                {
                    let voice_to_voice = running.saturating_sub(turn.end);
                    metrics
                        .voice_to_voice_seconds
                        .observe(voice_to_voice.seconds_f64());
                    let from = self.transcript_at.max(self.first_piece_at);
                    turn.tts = from.map_or_else(
                        || ns("time-to-first-audio"),
                        |from| now.saturating_duration_since(from),
                    );
                    tracing::info!(
                        "session {call}: {}",
                        turn.line(Duration::from_nanos(voice_to_voice.nseconds()))
                    );
                }
            }
            _ => {
                if events::Transcript::from_structure(s).is_some_and(|t| !t.partial)
                    && let Some((at, end)) = self.speech_end.take()
                {
                    let transcript = now.saturating_duration_since(at);
                    metrics.transcript_seconds.observe(transcript.as_secs_f64());
                    let end_of_turn = pipeline
                        .current_running_time()
                        .map(|running| running.saturating_sub(end).nseconds())
                        .map(Duration::from_nanos)
                        .unwrap_or_default()
                        .saturating_sub(transcript);
                    self.transcript_at = Some(now);
                    // The first piece, if it came already, was made ahead.
                    self.awaiting_audio = Some(Breakdown {
                        end,
                        end_of_turn,
                        transcript,
                        ..Breakdown::default()
                    });
                }
            }
        }
    }
}

/// A word of speech heard while the agent talks counts for the barge-in word rule when Whisper
/// gave it at least this probability (its letters' least). What tiny.en makes of the end of
/// audio cut mid-word, or of a murmur, comes at 0.05–0.1 ("Oof.", "the...", "Lotho" for
/// "uh-huh"); real words over Opus at 0.25 and up. It cannot tell a word added to a short
/// utterance: "Okay." came out as "Okay, sir." (0.30, 0.49), as sure as "Wait, stop." heard as
/// "We stop!" (0.36, 0.25), so a rule of 2 words cannot tell those apart with tiny.en.
const SURE: f64 = 0.2;

/// The words of `t` that count for barge-in ([`BargeIn`]), lowercased, without punctuation:
/// those Whisper was sure of ([`SURE`]), or all of the text's words when the transcript carries
/// none (a speech service that gives no words).
pub fn sure_words(t: &events::Transcript) -> Vec<String> {
    let norm = |w: &str| -> String {
        w.chars()
            .filter(|c| c.is_alphanumeric() || *c == '\'')
            .flat_map(char::to_lowercase)
            .collect()
    };
    let mut words = t.segments.iter().flat_map(|s| &s.words).peekable();
    let texts: Vec<String> = if words.peek().is_none() {
        t.text.split_whitespace().map(norm).collect()
    } else {
        words
            .filter(|w| w.probability >= SURE)
            .map(|w| norm(&w.text))
            .collect()
    };
    texts.into_iter().filter(|w| !w.is_empty()).collect()
}

/// With the barge-in word rule, whisperstt's partial transcripts, made only while speech heard
/// over the agent awaits its words (each is a Whisper run, on the cores the reply being made
/// needs too; the interval is the graph's `interim-ms`), and its words with their probability
/// ([`sure_words`]).
///
/// `send-ahead` is off meanwhile: a transcript made at a pause would reach llmchat as a reply
/// ahead before the words are counted; the final one is decided before it goes on
/// ([`judge_in_stream`]).
struct Interim {
    /// Weak: the probes on `stt`'s pads hold the [`Judge`] that holds this.
    stt: glib::WeakRef<gst::Element>,
    interval: u32,
    send_ahead: bool,
    on: std::cell::Cell<bool>,
}

impl Interim {
    fn new(pipeline: &gst::Pipeline) -> Option<Self> {
        let stt = pipeline.by_name("stt")?;
        let interval = stt.property::<u32>("interim-interval-ms");
        let send_ahead = stt.property::<bool>("send-ahead");
        stt.set_property("interim-interval-ms", 0u32);
        Some(Self {
            stt: stt.downgrade(),
            interval,
            send_ahead,
            on: std::cell::Cell::new(false),
        })
    }

    fn set(&self, on: bool) {
        if let Some(stt) = self.stt.upgrade()
            && self.on.replace(on) != on
        {
            let interval = if on { self.interval } else { 0 };
            stt.set_property("interim-interval-ms", interval);
            stt.set_property("word-timestamps", on);
            stt.set_property("send-ahead", self.send_ahead && !on);
        }
    }
}

/// What barge-in does about the caller's speech while the agent has the turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Possible speech: silence the agent at once (its reply goes on, unheard).
    Pause,
    /// It was not speech (a cough, a click): let the agent be heard again.
    Resume,
    /// Confirmed speech (it lasted the VAD's min-speech-ms, and had the words asked for): stop
    /// the reply for good.
    Interrupt,
    /// Confirmed speech, silenced, waiting for enough words to interrupt.
    Wait,
}

/// The barge-in rule (no GStreamer types): an onset while the agent speaks pauses it; the
/// onset confirmed as speech interrupts it; an onset cancelled resumes it. With `words`, the
/// speech must also be transcribed to that many words: the agent stays silent while that is
/// decided, and speaks on if the utterance ends with fewer. Only the words Whisper is sure of
/// count ([`sure_words`]), and of a partial transcript only those the partial before it had
/// too: Whisper guesses at the end of audio cut mid-word, and a guess is rarely the same
/// twice.
#[derive(Debug, Default)]
pub struct BargeIn {
    paused: bool,
    words: usize,
    /// Speech confirmed while the agent spoke; its words are awaited.
    waiting: bool,
    /// The sure words of the last partial transcript of that speech.
    partial: Vec<String>,
    /// The caller is speaking (the VAD's start, not yet its end).
    speaking: bool,
    /// When the speech awaiting its words ended (see [`BargeIn::overdue`]).
    ended: Option<Instant>,
    /// Its final is overdue: the agent speaks on, and the final is judged if it comes.
    late: bool,
}

/// How long after the end of speech heard over the agent its final transcript is awaited at
/// most (a transcription that failed, or never came): then the agent speaks on.
const JUDGE_LIMIT: Duration = Duration::from_secs(4);

impl BargeIn {
    pub fn new(words: usize) -> Self {
        Self {
            words,
            ..Self::default()
        }
    }

    pub fn onset(&mut self, agent_busy: bool) -> Option<Act> {
        (agent_busy && !std::mem::replace(&mut self.paused, true)).then_some(Act::Pause)
    }

    pub fn cancel(&mut self) -> Option<Act> {
        if self.waiting && !self.late {
            return None;
        }
        std::mem::take(&mut self.paused).then_some(Act::Resume)
    }

    pub fn start(&mut self, agent_busy: bool) -> Option<Act> {
        self.speaking = true;
        self.ended = None;
        if !(self.paused || agent_busy) {
            // A normal turn: no longer awaiting the words of speech that was overdue.
            (self.waiting, self.late) = (false, false);
            return None;
        }
        self.late = false;
        if self.words == 0 {
            self.paused = false;
            return Some(Act::Interrupt);
        }
        self.waiting = true;
        self.partial.clear();
        Some(if std::mem::replace(&mut self.paused, true) {
            Act::Wait
        } else {
            Act::Pause
        })
    }

    /// The VAD's end of speech.
    pub fn end(&mut self) {
        self.speaking = false;
        if self.waiting {
            self.ended = Some(Instant::now());
        }
    }

    /// Speech heard over the agent whose final transcript has not come [`JUDGE_LIMIT`] after
    /// it ended: the agent speaks on. Its final, if it comes after all (a machine so loaded
    /// that transcription takes longer), is still judged by its words: with too few it is not
    /// answered, with enough it interrupts then.
    pub fn overdue(&mut self) -> Option<Act> {
        let late = self.ended.is_some_and(|at| at.elapsed() > JUDGE_LIMIT);
        (self.waiting && !self.late && !self.speaking && late).then(|| {
            (self.late, self.paused, self.ended) = (true, false, None);
            Act::Resume
        })
    }

    /// Speech heard while the agent spoke awaits its words.
    pub fn awaiting_words(&self) -> bool {
        self.waiting
    }

    /// Partial transcripts help: the agent is silent while speech over it awaits its words
    /// (not once it spoke on, [`BargeIn::overdue`]).
    pub fn wants_partials(&self) -> bool {
        self.waiting && !self.late
    }

    /// A transcript's sure `words` ([`sure_words`]; `partial`: while the speech goes on).
    pub fn transcript(&mut self, words: Vec<String>, partial: bool) -> Option<Act> {
        if !self.waiting {
            return None;
        }
        let count = if partial {
            let agreed = words
                .iter()
                .zip(&self.partial)
                .take_while(|(a, b)| a == b)
                .count();
            self.partial = words;
            agreed
        } else {
            words.len()
        };
        if count >= self.words {
            self.decided();
            return Some(Act::Interrupt);
        }
        if partial {
            return None;
        }
        if self.speaking {
            // The final of an earlier utterance while the caller speaks again: kept from the
            // LLM, and the agent stays silent for the speech going on.
            self.partial.clear();
            return Some(Act::Wait);
        }
        self.decided();
        Some(Act::Resume)
    }

    fn decided(&mut self) {
        (self.waiting, self.paused, self.late) = (false, false, false);
        self.partial.clear();
        self.ended = None;
    }
}

/// The agent's voice in a session: when it is busy (replying or still playing), muting it, and
/// interrupting the reply.
struct Voice {
    pipeline: glib::WeakRef<gst::Pipeline>,
    /// The mixer's pad for the speech (muted while paused).
    mix_pad: gst::Pad,
    /// Where flushes go in: llmchat's sink pad (the flush travels down through kokorotts).
    llm_sink: gst::Pad,
    /// End of the speech pushed so far, in running time (ns).
    speaking_until: Arc<AtomicU64>,
    /// A reply is being generated (a final transcript went in, its turn has not ended).
    replying: AtomicBool,
}

impl Voice {
    /// The session's voice, when the graph has `llm`, `tts` and the queue `voice` into a mixer.
    fn new(pipeline: &gst::Pipeline, underruns: Histogram, call: &str) -> Option<Self> {
        let tts = pipeline.by_name("tts")?;
        let llm_sink = pipeline.by_name("llm")?.static_pad("sink")?;
        let mix_pad = pipeline.by_name("voice")?.static_pad("src")?.peer()?;
        let speaking_until = Arc::new(AtomicU64::new(0));
        live_timestamps(
            pipeline,
            &tts,
            speaking_until.clone(),
            underruns,
            call.to_string(),
        );
        Some(Self {
            pipeline: pipeline.downgrade(),
            mix_pad,
            llm_sink,
            speaking_until,
            replying: AtomicBool::new(false),
        })
    }

    fn busy(&self) -> bool {
        let now = self
            .pipeline
            .upgrade()
            .and_then(|p| p.current_running_time())
            .map(|t| t.nseconds())
            .unwrap_or(0);
        self.replying.load(Ordering::SeqCst) || now < self.speaking_until.load(Ordering::SeqCst)
    }

    fn mute(&self, mute: bool) {
        self.mix_pad.set_property("mute", mute);
    }

    /// Cancels the reply: a flush from llmchat down to the mixer drops the generation, the
    /// sentences waiting for speech and the audio not yet played; the stream then goes on.
    fn interrupt(&self) {
        let segment = self.llm_sink.sticky_event::<gst::event::Segment>(0);
        self.llm_sink.send_event(gst::event::FlushStart::new());
        self.llm_sink.send_event(gst::event::FlushStop::new(false));
        if let Some(segment) = segment {
            self.llm_sink.send_event(segment);
        }
        self.speaking_until.store(0, Ordering::SeqCst);
        self.replying.store(false, Ordering::SeqCst);
        self.mute(false);
    }
}

/// The message a session's [`judge_in_stream`] posts (from `stt`) when it decided speech heard
/// over the agent: `act` "interrupt" (the reply was flushed: at the start of speech without a
/// word rule, `final` false, `utterance` the VAD's count; or on a transcript, `final` true when
/// that went on to llmchat to be answered, `utterance` whisperstt's count), "resume" (a final
/// with too few words, kept from llmchat: the agent speaks on) or "wait" (such a final while the
/// caller speaks again: kept from llmchat, the agent stays silent).
const BARGE_IN: &str = "vox-barge-in";

/// A session's barge-in rule, and the partial transcripts it needs while it awaits words.
struct Judge {
    rule: BargeIn,
    interim: Option<Interim>,
}

impl Judge {
    /// Partial transcripts on while the agent is silent for speech that awaits its words.
    fn sync(&self) {
        if let Some(interim) = &self.interim {
            interim.set(self.rule.wants_partials());
        }
    }
}

/// Decides barge-in where the VAD's and whisperstt's findings are made, in their order: the
/// start and end of speech on `stt`'s sink pad, its transcripts on its source pad before llmchat
/// sees them, and the VAD's onsets and cancels, whisperstt's transcript messages and llmchat's
/// end of a reply in the bus's sync handler (on the thread that posts them). Speech that starts
/// while the agent speaks silences it, and interrupts it at once without a word rule. With one,
/// a partial or final transcript with enough words interrupts the reply (flushed before
/// anything after it goes on; a final one then goes on to be answered); a final with fewer is
/// kept from llmchat ("uh-huh" is not answered). Partial transcripts stop here.
///
/// Decided on the session's bus thread instead, a transcript could be judged before the start
/// of its speech: that thread was once more than a second behind the stream in CI (a
/// backchannel's final went to llmchat and was answered); a late onset could silence the
/// agent after its speech was decided; and a flush could come after the transcript had gone in
/// (or between a partial's event and its text, which llmchat would then answer), and cancel its
/// answer too. The bus thread only logs and counts what was decided ([`BARGE_IN`]), and lets the
/// agent speak on when a transcript never comes ([`BargeIn::overdue`]).
fn judge_in_stream(
    call: &str,
    pipeline: &gst::Pipeline,
    voice: &Arc<Voice>,
    judge: &Arc<Mutex<Judge>>,
) {
    let Some(stt_src) = voice.llm_sink.peer() else {
        return;
    };
    let Some(stt) = stt_src.parent_element() else {
        return;
    };
    fn lock(judge: &Mutex<Judge>) -> std::sync::MutexGuard<'_, Judge> {
        judge.lock().unwrap_or_else(|p| p.into_inner())
    }
    let post = |element: &gst::Element, act: &str, last: bool, utterance: u64| {
        let _ = element.post_message(
            gst::message::Element::builder(
                gst::Structure::builder(BARGE_IN)
                    .field("act", act)
                    .field("final", last)
                    .field("utterance", utterance)
                    .build(),
            )
            .src(element)
            .build(),
        );
    };

    // Messages only (onsets, cancels), or whose order with the stream matters.
    if let Some(bus) = pipeline.bus() {
        let (call, voice, judge) = (call.to_string(), Arc::downgrade(voice), judge.clone());
        bus.set_sync_handler(move |_, msg| {
            let (Some(s), Some(voice)) = (msg.structure(), voice.upgrade()) else {
                return gst::BusSyncReply::Pass;
            };
            match s.name().as_str() {
                events::SPEECH_ONSET => {
                    if lock(&judge).rule.onset(voice.busy()) == Some(Act::Pause) {
                        voice.mute(true);
                    }
                }
                events::SPEECH_CANCEL => {
                    if lock(&judge).rule.cancel() == Some(Act::Resume) {
                        tracing::info!("session {call}: not an interruption, resuming");
                        voice.mute(false);
                    }
                }
                // A reply made ahead and withdrawn was never this session's reply; one
                // cancelled by a barge-in was over at the flush (`Voice::interrupt`), and its
                // message may come after the answer to the interruption has begun.
                "vox-llm-turn" if !(withdrawn(s) || cancelled(s)) => {
                    voice.replying.store(false, Ordering::SeqCst);
                }
                // Posted before its event reaches the probe below; one of speech over the
                // agent is decided there.
                _ => {
                    if let Some(t) = events::Transcript::from_structure(s)
                        && !t.partial
                        && !t.text.is_empty()
                        && !lock(&judge).rule.awaiting_words()
                    {
                        voice.replying.store(true, Ordering::SeqCst);
                    }
                }
            }
            gst::BusSyncReply::Pass
        });
    }

    if let Some(stt_sink) = stt.static_pad("sink") {
        let (voice, judge) = (Arc::downgrade(voice), judge.clone());
        stt_sink.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |pad, info| {
            let Some(gst::PadProbeData::Event(e)) = &info.data else {
                return gst::PadProbeReturn::Ok;
            };
            let (Some(boundary), Some(voice)) =
                (events::SpeechBoundary::from_event(e), voice.upgrade())
            else {
                return gst::PadProbeReturn::Ok;
            };
            let mut j = lock(&judge);
            if !boundary.start {
                j.rule.end();
                return gst::PadProbeReturn::Ok;
            }
            let act = j.rule.start(voice.busy());
            j.sync();
            match act {
                Some(Act::Pause) => voice.mute(true),
                Some(Act::Interrupt) => {
                    voice.interrupt();
                    drop(j);
                    if let Some(stt) = pad.parent_element() {
                        post(&stt, "interrupt", false, boundary.utterance);
                    }
                }
                _ => {}
            }
            gst::PadProbeReturn::Ok
        });
    }

    let (voice, judge) = (Arc::downgrade(voice), judge.clone());
    // The text buffer after a transcript kept from llmchat.
    let drop_next = AtomicBool::new(false);
    stt_src.add_probe(
        gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_DOWNSTREAM,
        move |pad, info| {
            match &info.data {
                Some(gst::PadProbeData::Event(e)) => {
                    let Some(t) = e.structure().and_then(events::Transcript::from_structure) else {
                        return gst::PadProbeReturn::Ok;
                    };
                    let Some(voice) = voice.upgrade() else {
                        return gst::PadProbeReturn::Ok;
                    };
                    // Each transcript event comes before its text buffer, if it has text.
                    drop_next.store(false, Ordering::SeqCst);
                    let mut j = lock(&judge);
                    // Partial transcripts stop here (llmchat ignores them), and so do the
                    // finals of backchannels; the final of an interruption goes on.
                    let (act, keep) = match j.rule.transcript(sure_words(&t), t.partial) {
                        Some(Act::Interrupt) => {
                            voice.interrupt();
                            if !t.partial {
                                // Its message came while its words were awaited.
                                voice.replying.store(true, Ordering::SeqCst);
                            }
                            ("interrupt", !t.partial)
                        }
                        Some(Act::Resume) => {
                            voice.mute(false);
                            ("resume", false)
                        }
                        // An earlier utterance's final, while the caller speaks again: the
                        // agent stays silent for the new speech.
                        Some(Act::Wait) => ("wait", false),
                        _ => ("", !t.partial),
                    };
                    j.sync();
                    drop(j);
                    if let (false, Some(element)) = (act.is_empty(), pad.parent_element()) {
                        post(&element, act, !t.partial, t.utterance);
                    }
                    if !keep {
                        drop_next.store(!t.text.is_empty(), Ordering::SeqCst);
                        return gst::PadProbeReturn::Drop;
                    }
                }
                Some(gst::PadProbeData::Buffer(_)) if drop_next.swap(false, Ordering::SeqCst) => {
                    return gst::PadProbeReturn::Drop;
                }
                _ => {}
            }
            gst::PadProbeReturn::Ok
        },
    );
}

/// A `vox-llm-turn` of a reply made ahead and withdrawn (the caller spoke on): never heard.
fn withdrawn(s: &gst::StructureRef) -> bool {
    s.get::<&str>("outcome").is_ok_and(|o| o == "withdrawn")
}

/// A `vox-llm-turn` of a reply cut off by a flush (barge-in).
fn cancelled(s: &gst::StructureRef) -> bool {
    s.get::<&str>("outcome").is_ok_and(|o| o == "cancelled")
}

/// What a session heard and said goes to the log (info); the rest of our messages to debug.
fn log_message(call: &str, s: &gst::StructureRef) {
    if let Some(t) = vox_common::events::Transcript::from_structure(s) {
        if !t.partial {
            tracing::info!("session {call}: heard {:?}", t.text);
        }
        if tracing::enabled!(tracing::Level::DEBUG) {
            let words: Vec<String> = t
                .segments
                .iter()
                .flat_map(|s| &s.words)
                .map(|w| format!("{} {:.2}", w.text.trim(), w.probability))
                .collect();
            tracing::debug!(
                "session {call}: {} transcript, words and their probability: {}",
                if t.partial { "partial" } else { "final" },
                words.join(", ")
            );
        }
        return;
    }
    match s.name().as_str() {
        "vox-llm-turn" if withdrawn(s) => {
            tracing::info!("session {call}: withdrew a reply made ahead (the caller spoke on)")
        }
        "vox-llm-turn" => tracing::info!(
            "session {call}: replied {:?} ({})",
            s.get::<&str>("reply").unwrap_or_default(),
            s.get::<&str>("outcome").unwrap_or_default()
        ),
        name if name.starts_with("vox-") => tracing::debug!("session {call}: {s}"),
        _ => {}
    }
}

fn first_error(bus: &gst::Bus) -> Option<String> {
    while let Some(msg) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) {
        if let gst::MessageView::Error(e) = msg.view() {
            return Some(runner::describe_error(e));
        }
    }
    None
}

/// Re-stamps the agent's speech for the live mix: a reply starts now (its text was stamped when
/// the user stopped speaking, which is in the past by the time the audio exists), and the
/// buffers of one reply stay contiguous. `until` gets the end of what was pushed.
///
/// Audio of a reply that comes after what went before it has played out leaves a gap in the
/// voice (synthesis fell behind playback: an underrun). Each gap of 20 ms or more goes into
/// `underruns`. A reply's first audio, which kokorotts flags MARKER, leaves no such gap. (The
/// flag travels with the audio: a reply made ahead is let out when its turn is confirmed, which
/// can be before the agent has read the transcript's message.)
fn live_timestamps(
    pipeline: &gst::Pipeline,
    element: &gst::Element,
    until: Arc<AtomicU64>,
    underruns: Histogram,
    call: String,
) {
    let Some(pad) = element.static_pad("src") else {
        return;
    };
    let pipeline = pipeline.downgrade();
    let next = Mutex::new(None::<gst::ClockTime>);
    pad.add_probe(
        gst::PadProbeType::BUFFER | gst::PadProbeType::EVENT_FLUSH,
        move |_, info| {
            if let Some(gst::PadProbeData::Event(e)) = &info.data
                && e.type_() == gst::EventType::FlushStop
            {
                *next.lock().unwrap_or_else(|p| p.into_inner()) = None;
                return gst::PadProbeReturn::Ok;
            }
            let Some(pipeline) = pipeline.upgrade() else {
                return gst::PadProbeReturn::Ok;
            };
            let Some(now) = pipeline.current_running_time() else {
                return gst::PadProbeReturn::Ok;
            };
            if let Some(buffer) = info.buffer_mut() {
                let mut next = next.lock().unwrap_or_else(|p| p.into_inner());
                let pts = match *next {
                    Some(n) if n >= now => n,
                    _ => now,
                };
                if !buffer.flags().contains(gst::BufferFlags::MARKER)
                    && let Some(gap) = next.map(|n| now.saturating_sub(n))
                    && gap >= gst::ClockTime::from_mseconds(20)
                {
                    underruns.observe(gap.seconds_f64());
                    tracing::info!(
                        "session {call}: the voice ran dry for {} ms (synthesis behind playback)",
                        gap.mseconds()
                    );
                }
                let b = buffer.make_mut();
                b.set_pts(pts);
                *next = b.duration().map(|d| pts + d);
                if let Some(end) = *next {
                    until.store(end.nseconds(), Ordering::SeqCst);
                }
            }
            gst::PadProbeReturn::Ok
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A board of its own, and the `first-words` each session was last set to.
    fn board() -> (Waiting, Arc<Mutex<HashMap<&'static str, u32>>>) {
        (Waiting::default(), Arc::new(Mutex::new(HashMap::new())))
    }

    fn setter(
        set: &Arc<Mutex<HashMap<&'static str, u32>>>,
        call: &'static str,
    ) -> Box<dyn Fn(u32) + Send> {
        let set = set.clone();
        Box::new(move |words| {
            set.lock().unwrap().insert(call, words);
        })
    }

    #[test]
    fn sessions_speak_whole_sentences_while_another_caller_waits_for_first_audio() {
        let (board, set) = board();
        let a = board.put("a", 2, setter(&set, "a"));
        let b = board.put("b", 2, setter(&set, "b"));
        let c = board.put("c", 0, setter(&set, "c"));
        // Nobody waits: openings as the graph says (nothing set).
        assert!(set.lock().unwrap().is_empty());
        // a speaks: b speaks whole sentences, a itself keeps its openings; c has none anyway.
        a.heard(events::SPEECH_START);
        assert_eq!(*set.lock().unwrap(), HashMap::from([("b", 0)]));
        // b speaks too: both whole.
        b.heard(events::SPEECH_START);
        assert_eq!(set.lock().unwrap()["a"], 0);
        // a's first audio came: b's opening is back, a still whole while b waits.
        a.heard("vox-tts-first-audio");
        assert_eq!(set.lock().unwrap()["b"], 2);
        assert_eq!(set.lock().unwrap()["a"], 0);
        // Other messages change nothing.
        b.heard(events::TRANSCRIPT);
        assert_eq!(set.lock().unwrap()["a"], 0);
        // b leaves while waiting: a gets its openings back.
        drop(b);
        assert_eq!(set.lock().unwrap()["a"], 2);
        assert!(!set.lock().unwrap().contains_key("c"));
        drop((a, c));
        assert!(board.sessions.lock().unwrap().is_empty());
    }

    #[test]
    fn two_sessions_of_one_name_are_two_waiters() {
        // Two LiveKit jobs in one room: the session name is the room's.
        let (board, set) = board();
        let first = board.put("room", 2, setter(&set, "first"));
        let second = board.put("room", 2, setter(&set, "second"));
        first.heard(events::SPEECH_START);
        assert_eq!(*set.lock().unwrap(), HashMap::from([("second", 0)]));
        drop(first);
        assert_eq!(set.lock().unwrap()["second"], 2);
        drop(second);
        assert!(board.sessions.lock().unwrap().is_empty());
    }

    #[test]
    fn a_caller_waits_for_first_audio_only_so_long() {
        let (board, set) = board();
        let a = board.put("a", 2, setter(&set, "a"));
        let b = board.put("b", 2, setter(&set, "b"));
        a.heard(events::SPEECH_END);
        assert_eq!(set.lock().unwrap()["b"], 0);
        // A turn that ended with nothing to answer: past the wait, the next update frees b.
        board.sessions.lock().unwrap().get_mut(&a.1).unwrap().until =
            Some(Instant::now() - Duration::from_millis(1));
        b.heard(events::SPEECH_START);
        assert_eq!(set.lock().unwrap()["b"], 2);
        assert_eq!(set.lock().unwrap()["a"], 0);
    }

    #[test]
    fn a_turns_breakdown_names_each_stage_and_the_rest() {
        let ms = Duration::from_millis;
        let turn = Breakdown {
            end: gst::ClockTime::ZERO,
            end_of_turn: ms(520),
            transcript: ms(3),
            llm: ms(240),
            tts: ms(1080),
        };
        assert_eq!(
            turn.line(ms(1900)),
            "turn: voice to voice 1900 ms in the agent = end of turn 520 ms + transcript 3 ms + \
             LLM first piece 240 ms + Kokoro first audio 1080 ms + rest 57 ms"
        );
        // Stages that overlap (a piece spoken while the LLM still writes) leave no rest.
        assert!(turn.line(ms(1500)).ends_with("rest 0 ms"));
    }

    #[test]
    fn barge_in_pauses_at_an_onset_and_interrupts_when_it_is_speech() {
        let mut b = BargeIn::default();
        // The agent is quiet: the caller's speech is a normal turn.
        assert_eq!(b.onset(false), None);
        assert_eq!(b.start(false), None);
        // The agent speaks: an onset pauses it, confirmed speech interrupts it.
        assert_eq!(b.onset(true), Some(Act::Pause));
        assert_eq!(b.onset(true), None);
        assert_eq!(b.start(true), Some(Act::Interrupt));
        // A cough: paused, then resumed.
        assert_eq!(b.onset(true), Some(Act::Pause));
        assert_eq!(b.cancel(), Some(Act::Resume));
        assert_eq!(b.cancel(), None);
        // Paused when the reply ended: the confirmed speech still stops what is left.
        assert_eq!(b.onset(true), Some(Act::Pause));
        assert_eq!(b.start(false), Some(Act::Interrupt));
        // Confirmed at once (no onset first) while speaking.
        assert_eq!(b.start(true), Some(Act::Interrupt));
        // Transcripts change nothing without a word rule.
        assert_eq!(b.transcript(vec!["yes".into()], false), None);
    }

    /// Words as [`sure_words`] gives them.
    fn words(text: &str) -> Vec<String> {
        sure_words(&events::Transcript {
            text: text.into(),
            ..Default::default()
        })
    }

    #[test]
    fn barge_in_with_words_waits_for_them_and_lets_a_backchannel_pass() {
        let mut b = BargeIn::new(3);
        // "Uh-huh" while the agent speaks: paused, confirmed as speech, too few words: resumed.
        assert_eq!(b.onset(true), Some(Act::Pause));
        assert_eq!(b.start(true), Some(Act::Wait));
        assert_eq!(b.cancel(), None, "confirmed speech is decided by its words");
        assert_eq!(b.transcript(words("Uh-huh"), true), None);
        b.end();
        assert_eq!(b.transcript(words("Uh-huh."), false), Some(Act::Resume));
        // A real interruption: partial transcripts agree on three words.
        assert_eq!(b.onset(true), Some(Act::Pause));
        assert_eq!(b.start(true), Some(Act::Wait));
        assert_eq!(b.transcript(words("Wait, what"), true), None);
        assert_eq!(b.transcript(words("Wait, what is"), true), None);
        assert_eq!(
            b.transcript(words("wait what is the"), true),
            Some(Act::Interrupt)
        );
        b.end();
        assert_eq!(
            b.transcript(words("Wait, what is the"), false),
            None,
            "decided already"
        );
        // Confirmed without an onset first: silenced at once, then decided by the final one.
        assert_eq!(b.start(true), Some(Act::Pause));
        b.end();
        assert_eq!(
            b.transcript(words("What is it then?"), false),
            Some(Act::Interrupt)
        );
        // The agent quiet: a normal turn.
        assert_eq!(b.start(false), None);
        b.end();
        assert_eq!(b.transcript(words("Yes"), false), None);
    }

    /// "Uh-huh", then at once "wait, stop": the first's final comes while the caller speaks
    /// again; it is kept from the LLM and the agent stays silent for the second.
    #[test]
    fn a_backchannels_final_does_not_decide_the_speech_after_it() {
        let mut b = BargeIn::new(2);
        assert_eq!(b.start(true), Some(Act::Pause));
        b.end();
        assert_eq!(b.start(true), Some(Act::Wait));
        assert_eq!(b.transcript(words("Uh-huh."), false), Some(Act::Wait));
        assert!(b.awaiting_words());
        b.end();
        assert_eq!(
            b.transcript(words("Wait, stop."), false),
            Some(Act::Interrupt)
        );
    }

    /// Speech heard over the agent whose transcript never comes does not keep it silent.
    #[test]
    fn speech_without_a_transcript_lets_the_agent_speak_on() {
        let mut b = BargeIn::new(2);
        assert_eq!(b.start(true), Some(Act::Pause));
        assert_eq!(b.overdue(), None, "still speaking");
        b.end();
        assert_eq!(b.overdue(), None, "just ended");
        b.ended = Some(Instant::now() - JUDGE_LIMIT - Duration::from_millis(1));
        assert_eq!(b.overdue(), Some(Act::Resume));
        assert_eq!(b.overdue(), None, "once");
        assert!(!b.wants_partials());
        // A cough meanwhile silences the agent for a moment only.
        assert_eq!(b.onset(true), Some(Act::Pause));
        assert_eq!(b.cancel(), Some(Act::Resume));
        // Its final, late after all, is still judged: too few words are not answered.
        assert_eq!(b.transcript(words("Okay."), false), Some(Act::Resume));
        assert!(!b.awaiting_words());
        assert_eq!(b.onset(true), Some(Act::Pause), "no longer paused");
        // Enough words interrupt, late.
        assert_eq!(b.start(true), Some(Act::Wait));
        b.end();
        b.ended = Some(Instant::now() - JUDGE_LIMIT - Duration::from_millis(1));
        assert_eq!(b.overdue(), Some(Act::Resume));
        assert_eq!(
            b.transcript(words("What is the capital?"), false),
            Some(Act::Interrupt)
        );
        // A late final that never comes does not make the next turn's words count.
        assert_eq!(b.start(true), Some(Act::Pause));
        b.end();
        b.ended = Some(Instant::now() - JUDGE_LIMIT - Duration::from_millis(1));
        assert_eq!(b.overdue(), Some(Act::Resume));
        assert_eq!(b.start(false), None);
        assert!(!b.awaiting_words());
        assert_eq!(b.transcript(words("Yes."), false), None, "a normal turn");
    }

    /// A partial transcript's last words are a guess at audio cut mid-word: three words in one
    /// partial do not interrupt unless the next partial has them too, and a guess that changes
    /// counts only up to where the two differ.
    #[test]
    fn barge_in_counts_the_words_two_partials_agree_on() {
        let mut b = BargeIn::new(3);
        assert_eq!(b.start(true), Some(Act::Pause));
        assert_eq!(b.transcript(words("Okay, so then"), true), None);
        assert_eq!(b.transcript(words("Okay, sir."), true), None);
        assert_eq!(b.transcript(words("Okay, sir, yes"), true), None);
        // Agreement starts again with each utterance heard over the agent.
        b.end();
        assert_eq!(b.transcript(words("Okay."), false), Some(Act::Resume));
        assert_eq!(b.start(true), Some(Act::Pause));
        assert_eq!(b.transcript(words("sir yes"), true), None);
        assert_eq!(b.transcript(words("Sir, yes, sir."), true), None);
        assert_eq!(
            b.transcript(words("Sir, yes, sir. Now"), true),
            Some(Act::Interrupt)
        );
    }

    /// Words Whisper was unsure of do not count; without words (a speech service), the text's.
    #[test]
    fn only_the_words_whisper_is_sure_of_count() {
        let word = |text: &str, probability: f64| events::Word {
            text: text.into(),
            probability,
            ..Default::default()
        };
        let t = events::Transcript {
            text: "Okay, sir.".into(),
            segments: vec![events::Segment {
                words: vec![word("Okay,", 0.91), word("sir.", 0.18), word("...", 0.9)],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(sure_words(&t), ["okay"]);
        assert_eq!(
            words("Don't stop, it's 5 o'clock!"),
            ["don't", "stop", "it's", "5", "o'clock"]
        );
        assert!(words(" ... ").is_empty());
    }

    /// The voice's audio as the agent re-stamps it: a buffer that comes after the one before
    /// has played out is a gap (an underrun), counted with its length; the first of a reply
    /// is not. (appsrc stands in for kokorotts: a real synthesis cannot be made late on cue.)
    #[test]
    fn audio_that_comes_after_the_voice_ran_dry_is_counted_as_an_underrun() {
        gst::init().unwrap();
        let pipeline = runner::launch(
            "appsrc name=src is-live=true format=time \
             caps=audio/x-raw,format=F32LE,rate=24000,channels=1,layout=interleaved ! \
             identity name=tts ! fakesink sync=false",
        )
        .unwrap();
        let tts = pipeline.by_name("tts").unwrap();
        let underruns = Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
            0.02, 2.0, 10,
        ));
        live_timestamps(
            &pipeline,
            &tts,
            Arc::new(AtomicU64::new(0)),
            underruns.clone(),
            "test".into(),
        );
        pipeline.set_state(gst::State::Playing).unwrap();
        let src = pipeline.by_name("src").unwrap();
        // 100 ms of audio; a reply's first is flagged MARKER (as kokorotts does).
        let push = |first: bool| {
            let mut b = gst::Buffer::from_slice(vec![0u8; 2400 * 4]);
            let m = b.get_mut().unwrap();
            m.set_duration(gst::ClockTime::from_mseconds(100));
            if first {
                m.set_flags(gst::BufferFlags::MARKER);
            }
            let flow = src.emit_by_name::<gst::FlowReturn>("push-buffer", &[&b]);
            assert_eq!(flow, gst::FlowReturn::Ok);
        };
        // (count, sum) of the histogram.
        let count = |h: &Histogram| {
            let mut text = String::new();
            let mut registry = prometheus_client::registry::Registry::default();
            registry.register("u", "", h.clone());
            prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
            let value = |name: &str| {
                text.lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(-1.0)
            };
            (value("u_count "), value("u_sum "))
        };
        push(true); // a reply's first audio
        push(false); // right after: contiguous
        std::thread::sleep(Duration::from_millis(500));
        push(false); // ~300 ms after the audio before it ended
        std::thread::sleep(Duration::from_millis(100));
        let (n, gap) = count(&underruns);
        assert_eq!(n, 1.0);
        assert!((0.25..0.45).contains(&gap), "a gap of {gap} s");
        // A new reply later on: its first audio is no gap.
        std::thread::sleep(Duration::from_millis(300));
        push(true);
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(count(&underruns).0, 1.0);
        pipeline.set_state(gst::State::Null).unwrap();
    }
}
