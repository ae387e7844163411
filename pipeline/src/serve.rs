//! `vox serve`: OpenAI's speech API over our own engines, for the agent pods, chat front ends and
//! scripts that call a shared speech service.
//!
//! - `POST /v1/audio/transcriptions` and `/v1/audio/translations` (multipart: `file`, `model`,
//!   `language`, `prompt`, `response_format` = json | text | srt | vtt | verbose_json,
//!   `temperature`, `timestamp_granularities[]`) run the `transcribe` graph over the upload;
//! - `POST /v1/audio/speech` (JSON: `model`, `input`, `voice`, `speed`, `response_format` = mp3 |
//!   opus | aac | flac | wav | pcm) runs `kokorotts` into the encoder asked for and streams the
//!   audio as it is made, first sentence first, that sentence's opening (`first_words`) on
//!   its own;
//! - `GET /v1/models`, `/healthz`, `/readyz` (models loaded), `/metrics` (Prometheus).
//!
//! No second implementation of inference: these are the graphs and elements of the command
//! line. Whisper has `threads` cores: a transcription that finds it idle and nobody waiting
//! gets them all (the fastest answer for one client); under load they run side by side on one
//! core each, which on a CPU gets more audio through than one at a time on all of them
//! (measured on 2 cores with 4 clients: 20-22 against 15.5 audio seconds per second), because
//! whisper.cpp's threads wait on each other at every layer of a model as small as tiny.en.
//! whisper.cpp has no batching across requests. Kokoro runs one sentence at a time on its one
//! session, with up to four speech requests streaming and taking turns per sentence.
//! Requests wait in a bounded queue per model; a full queue answers 429 with `Retry-After`.
//! Errors have OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

use crate::graph;
use crate::metrics::buckets;
use crate::runner;
use crate::transcribe::{self, TranscribeError};
use crate::transcript::{Document, Format};
use axum::extract::multipart::MultipartRejection;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use gst::prelude::*;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde_json::json;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

/// OpenAI's own limits, kept as defaults.
pub const MAX_UPLOAD_BYTES: usize = 25 * 1024 * 1024;
pub const MAX_INPUT_CHARS: usize = 4096;

#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub stt: bool,
    pub tts: bool,
    /// Bearer token every `/v1` request must carry (from `--api-key-file`).
    pub api_key: Option<String>,
    pub max_upload_bytes: usize,
    pub max_audio_seconds: f64,
    pub max_input_chars: usize,
    /// Requests that may wait per model, beyond those running.
    pub queue: usize,
    pub stt_model: String,
    pub voice: String,
    /// Cores per model: a transcription alone uses them all, under load each runs on one.
    pub threads: u32,
    /// Speech starts with the opening of its first sentence on its own, up to a clause mark or
    /// so many words (kokorotts `first-words`; 0: whole sentences).
    pub first_words: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8880)),
            stt: true,
            tts: true,
            api_key: None,
            max_upload_bytes: MAX_UPLOAD_BYTES,
            max_audio_seconds: 1800.0,
            max_input_chars: MAX_INPUT_CHARS,
            queue: 8,
            stt_model: vox_common::models::DEFAULT_WHISPER.into(),
            voice: "jf_alpha".into(),
            threads: 2,
            first_words: 2,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {why}")]
    Listen { addr: SocketAddr, why: String },
    #[error("cannot read the voices file: {0}")]
    Voices(String),
    #[error("cannot start the HTTP runtime: {0}")]
    Runtime(String),
    #[error(transparent)]
    Model(#[from] vox_common::models::ModelError),
    #[error("{0}")]
    WarmUp(String),
}

/// An error in OpenAI's shape, with its status (and `Retry-After` for a full queue).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
    code: Option<&'static str>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code: Some(code),
            retry_after: None,
        }
    }

    /// A bad value of request parameter `param`.
    fn param(param: &'static str, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param),
            ..Self::new(StatusCode::BAD_REQUEST, code, message)
        }
    }

    fn server(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut response = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        response
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    endpoint: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Endpoint {
    endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabel {
    model: String,
}

struct Metrics {
    registry: Registry,
    requests: Family<Outcome, Counter>,
    seconds: Family<Endpoint, Histogram>,
    first_byte: Histogram,
    queue: Family<ModelLabel, Gauge>,
    audio_seconds: Family<Endpoint, Counter<f64>>,
    real_time_factor: Family<Endpoint, Histogram>,
}

impl Metrics {
    fn new() -> Self {
        let histograms = || Histogram::new(buckets());
        let mut m = Self {
            registry: crate::metrics::registry(),
            requests: Family::default(),
            seconds: Family::new_with_constructor(histograms),
            first_byte: histograms(),
            queue: Family::default(),
            audio_seconds: Family::default(),
            real_time_factor: Family::new_with_constructor(|| {
                Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                    0.01, 1.6, 14,
                ))
            }),
        };
        let r = &mut m.registry;
        r.register(
            "serve_requests",
            "Requests answered, by endpoint and status",
            m.requests.clone(),
        );
        r.register(
            "serve_request_seconds",
            "Request to complete answer",
            m.seconds.clone(),
        );
        r.register(
            "serve_first_byte_seconds",
            "Speech request to its first audio byte",
            m.first_byte.clone(),
        );
        r.register(
            "serve_queue_depth",
            "Requests waiting for a model",
            m.queue.clone(),
        );
        r.register(
            "serve_audio_seconds",
            "Audio processed: transcribed (in) or synthesised (out)",
            m.audio_seconds.clone(),
        );
        r.register(
            "serve_real_time_factor",
            "Processing time over audio length, per request",
            m.real_time_factor.clone(),
        );
        m
    }

    fn done(&self, endpoint: &str, status: StatusCode, took: Duration, audio: f64) {
        self.requests
            .get_or_create(&Outcome {
                endpoint: endpoint.into(),
                status: status.as_u16(),
            })
            .inc();
        let e = Endpoint {
            endpoint: endpoint.into(),
        };
        self.seconds.get_or_create(&e).observe(took.as_secs_f64());
        if audio > 0.0 {
            self.audio_seconds.get_or_create(&e).inc_by(audio);
            self.real_time_factor
                .get_or_create(&e)
                .observe(took.as_secs_f64() / audio);
        }
    }
}

/// Admission to one model: a bounded number of requests wait, and they run on `slots` (cores
/// for Whisper, streams for Kokoro).
struct Lane {
    model: &'static str,
    admitted: Arc<Semaphore>,
    running: Arc<Semaphore>,
    slots: u32,
    waiting: AtomicUsize,
    queue: usize,
}

impl Lane {
    fn new(model: &'static str, slots: usize, queue: usize) -> Self {
        Self {
            model,
            admitted: Arc::new(Semaphore::new(slots + queue)),
            running: Arc::new(Semaphore::new(slots)),
            slots: slots as u32,
            waiting: AtomicUsize::new(0),
            queue,
        }
    }

    /// A place in the queue, or 429 when it is full.
    fn admit(&self) -> Result<OwnedSemaphorePermit, ApiError> {
        self.admitted.clone().try_acquire_owned().map_err(|_| {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "queue_full",
                format!(
                    "{} requests are already waiting for the {} model; retry later",
                    self.queue, self.model
                ),
            );
            e.retry_after = Some(1);
            e
        })
    }

    /// Waits for one slot, counted in the queue depth meanwhile.
    async fn turn(&self, metrics: &Metrics) -> OwnedSemaphorePermit {
        self.turn_for(metrics, false).await.0
    }

    /// Waits for the model: all its slots when it is idle and nobody waits, else one. Returns
    /// the permit and how many slots it holds.
    async fn turn_for(
        &self,
        metrics: &Metrics,
        all_when_idle: bool,
    ) -> (OwnedSemaphorePermit, u32) {
        if all_when_idle
            && self.waiting.load(Ordering::SeqCst) == 0
            && let Ok(all) = self.running.clone().try_acquire_many_owned(self.slots)
        {
            return (all, self.slots);
        }
        let depth = metrics
            .queue
            .get_or_create(&ModelLabel {
                model: self.model.into(),
            })
            .clone();
        depth.inc();
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let permit = self.running.clone().acquire_owned().await;
        self.waiting.fetch_sub(1, Ordering::SeqCst);
        depth.dec();
        (permit.expect("the semaphore is never closed"), 1)
    }
}

struct App {
    options: Options,
    voices: Vec<String>,
    /// The Whisper model knows English only (no language choice, no translation).
    english_only: bool,
    stt: Lane,
    tts: Lane,
    metrics: Metrics,
    ready: AtomicBool,
    /// Why the models could not load (the server then stops).
    failed: Mutex<Option<String>>,
}

/// Runs the service until SIGINT/SIGTERM (requests in flight are finished first).
pub fn serve(
    options: Options,
    on_ready: impl FnOnce(SocketAddr) + Send + 'static,
) -> Result<(), ServeError> {
    let voices = if options.tts {
        let path =
            vox_common::models::resolve("kokoro-voices", vox_common::models::ModelKind::Voices)?;
        vox_common::models::voice_names(&path).map_err(ServeError::Voices)?
    } else {
        Vec::new()
    };
    let english_only = if options.stt {
        let path = vox_common::models::resolve(
            &options.stt_model,
            vox_common::models::ModelKind::Whisper,
        )?;
        vox_common::models::whisper_english_only(&path).map_err(|source| {
            ServeError::Model(vox_common::models::ModelError::Io { path, source })
        })?
    } else {
        false
    };
    crate::metrics::Accelerator::detect().log();
    let app = Arc::new(App {
        // Whisper's cores: up to one transcription on each.
        stt: Lane::new("whisper", options.threads.max(1) as usize, options.queue),
        // Speech streams run side by side, their sentences taking turns on Kokoro's one session
        // by deadline (vox_common::cpu): a request's first sentence goes before later sentences
        // of streams already ahead of real time.
        tts: Lane::new("kokoro", SPEECH_STREAMS, options.queue),
        voices,
        english_only,
        metrics: Metrics::new(),
        ready: AtomicBool::new(false),
        failed: Mutex::new(None),
        options,
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vox-serve")
        .enable_all()
        .build()
        .map_err(|e| ServeError::Runtime(e.to_string()))?;
    rt.block_on(async move {
        let addr = app.options.listen;
        let listener =
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Listen {
                    addr,
                    why: e.to_string(),
                })?;
        let bound = listener.local_addr().unwrap_or(addr);
        // Models load in the background; /readyz says when they are in. A model that cannot
        // load stops the server with its error (an orchestrator sees the exit, not a server
        // that is never ready).
        let warm = app.clone();
        tokio::task::spawn_blocking(move || match warm_up(&warm) {
            Ok(()) => {
                warm.ready.store(true, Ordering::SeqCst);
                on_ready(bound);
            }
            Err(e) => *warm.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e),
        });
        let router = router(app.clone());
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown(app.clone()))
            .await
            .map_err(|e| ServeError::Runtime(e.to_string()))?;
        match app.failed.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => Err(ServeError::WarmUp(e)),
            None => Ok(()),
        }
    })
}

/// Speech requests streaming at once (Kokoro itself runs one sentence at a time).
const SPEECH_STREAMS: usize = 4;

/// Resolves on SIGINT/SIGTERM (the command line's handler notes them), or when the models
/// failed to load.
async fn shutdown(app: Arc<App>) {
    loop {
        if runner::interrupted() {
            eprintln!("vox serve: stopping after the requests in flight");
            return;
        }
        if app
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Loads the models by using them once, so the first request does not pay for it; their
/// error if they cannot.
fn warm_up(app: &App) -> Result<(), String> {
    if app.options.tts {
        synthesise_all(app, "Ready.", &app.options.voice, 1.0)
            .map_err(|e| format!("cannot load Kokoro: {e}"))?;
    }
    if app.options.stt {
        let tmp = tempfile::Builder::new()
            .suffix(".wav")
            .tempfile()
            .map_err(|e| format!("cannot make a temporary file to load Whisper with: {e}"))?;
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        hound::WavWriter::create(tmp.path(), spec)
            .and_then(|mut w| {
                for _ in 0..16000 {
                    w.write_sample(0i16)?;
                }
                w.finalize()
            })
            .map_err(|e| format!("cannot make a temporary file to load Whisper with: {e}"))?;
        let options = stt_options(app, false);
        transcribe::transcribe_file(tmp.path(), &options, |_| {}).map_err(|e| match e {
            // The element's own words (which name the model), not the warm-up file's.
            transcribe::TranscribeError::Failed { why, .. } => why,
            e => format!("cannot load Whisper: {e}"),
        })?;
    }
    Ok(())
}

fn router(app: Arc<App>) -> Router {
    let mut v1 = Router::new().route("/v1/models", get(models));
    if app.options.stt {
        v1 = v1
            .route("/v1/audio/transcriptions", post(transcriptions))
            .route("/v1/audio/translations", post(translations));
    }
    if app.options.tts {
        v1 = v1.route("/v1/audio/speech", post(speech));
    }
    let v1 = v1.route_layer(axum::middleware::from_fn_with_state(app.clone(), authorise));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_url", "no such endpoint")
        })
        // Multipart bodies are limited here (413 from the extractor, reshaped below); the
        // margin is for the form's other fields.
        .layer(DefaultBodyLimit::max(
            app.options.max_upload_bytes + 64 * 1024,
        ))
        .with_state(app)
}

/// The longest an unauthorised request's body is read for before the 401 goes out.
const UNAUTHORISED_DRAIN: Duration = Duration::from_secs(10);

async fn authorise(
    State(app): State<Arc<App>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(key) = &app.options.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            // The upload is read (and dropped) before the answer: a client still sending its
            // file when the connection closes gets a reset, not the 401 (curl: status 000).
            let limit = app.options.max_upload_bytes + 64 * 1024;
            let _ = tokio::time::timeout(
                UNAUTHORISED_DRAIN,
                axum::body::to_bytes(request.into_body(), limit),
            )
            .await;
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or incorrect API key (Authorization: Bearer KEY)",
            )
            .into_response();
        }
    }
    next.run(request).await
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.ready.load(Ordering::SeqCst) {
        "ready\n".into_response()
    } else if let Some(e) = app
        .failed
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
    {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "loading models\n").into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let mut out = String::new();
    let _ = prometheus_client::encoding::text::encode(&mut out, &app.metrics.registry);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

/// Model names accepted for transcription: OpenAI's, and the served model's own.
const STT_ALIASES: &[&str] = &["whisper-1"];
const TTS_ALIASES: &[&str] = &["tts-1", "tts-1-hd", "gpt-4o-mini-tts", "kokoro"];

async fn models(State(app): State<Arc<App>>) -> Json<serde_json::Value> {
    let mut ids: Vec<String> = Vec::new();
    if app.options.stt {
        ids.push(app.options.stt_model.clone());
        ids.extend(STT_ALIASES.iter().map(|s| s.to_string()));
    }
    if app.options.tts {
        ids.extend(TTS_ALIASES.iter().map(|s| s.to_string()));
    }
    let data: Vec<_> = ids
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "vox"}))
        .collect();
    Json(json!({"object": "list", "data": data}))
}

fn stt_options(app: &App, translate: bool) -> transcribe::Options {
    transcribe::Options {
        model: app.options.stt_model.clone(),
        threads: app.options.threads,
        translate,
        ..transcribe::Options::default()
    }
}

/// An uploaded file, written to a temporary file as it arrives (an upload is never held in
/// memory whole): its bytes.
struct Upload {
    file: tempfile::NamedTempFile,
    bytes: u64,
}

/// A transcription request's form.
#[derive(Default)]
struct Form {
    file: Option<Upload>,
    model: Option<String>,
    language: Option<String>,
    prompt: Option<String>,
    response_format: Option<String>,
    temperature: Option<String>,
    granularities: Vec<String>,
}

async fn read_form(multipart: Result<Multipart, MultipartRejection>) -> Result<Form, ApiError> {
    let mut multipart = multipart.map_err(|e| {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_content_type",
            format!("the request must be multipart/form-data: {}", e.body_text()),
        )
    })?;
    let mut form = Form::default();
    let too_big = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError {
                param: Some("file"),
                ..ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "file_too_large",
                    "the upload is larger than the server's limit (--max-upload-mb)",
                )
            }
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_multipart",
                format!("malformed multipart body: {}", e.body_text()),
            )
        }
    };
    while let Some(mut field) = multipart.next_field().await.map_err(too_big)? {
        let name = field.name().unwrap_or_default().to_string();
        if name == "file" {
            // The name's extension helps the decoder find the format.
            let suffix = std::path::Path::new(field.file_name().unwrap_or("upload"))
                .extension()
                .map(|e| format!(".{}", e.to_string_lossy()))
                .unwrap_or_default();
            let stored =
                |e: std::io::Error| ApiError::server(format!("cannot store the upload: {e}"));
            let file = tempfile::Builder::new()
                .prefix("vox-serve-")
                .suffix(&suffix)
                .tempfile()
                .map_err(stored)?;
            // Written without holding up the runtime's threads.
            let mut out = tokio::fs::File::from_std(file.reopen().map_err(stored)?);
            let mut bytes = 0u64;
            while let Some(chunk) = field.chunk().await.map_err(too_big)? {
                tokio::io::AsyncWriteExt::write_all(&mut out, &chunk)
                    .await
                    .map_err(stored)?;
                bytes += chunk.len() as u64;
            }
            tokio::io::AsyncWriteExt::flush(&mut out)
                .await
                .map_err(stored)?;
            form.file = Some(Upload { file, bytes });
            continue;
        }
        let value = field.text().await.map_err(too_big)?;
        match name.as_str() {
            "model" => form.model = Some(value),
            "language" => form.language = Some(value),
            "prompt" => form.prompt = Some(value),
            "response_format" => form.response_format = Some(value),
            "temperature" => form.temperature = Some(value),
            "timestamp_granularities[]" | "timestamp_granularities" => {
                form.granularities.push(value)
            }
            // Newer fields (stream, include[], chunking_strategy) are not used here.
            _ => {}
        }
    }
    Ok(form)
}

/// The longest an upload may take to arrive.
const UPLOAD_TIME: Duration = Duration::from_secs(120);

/// Reads a request's body and drops it, chunk by chunk, for up to 10 s.
async fn discard(multipart: Result<Multipart, MultipartRejection>) {
    let Ok(mut multipart) = multipart else { return };
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(mut field)) = multipart.next_field().await {
            while let Ok(Some(_)) = field.chunk().await {}
        }
    })
    .await;
}

async fn transcriptions(
    State(app): State<Arc<App>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let started = Instant::now();
    let result = transcribe_request(&app, multipart, false).await;
    finish(&app, "transcriptions", started, result)
}

async fn translations(
    State(app): State<Arc<App>>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    let started = Instant::now();
    let result = transcribe_request(&app, multipart, true).await;
    finish(&app, "translations", started, result)
}

/// Counts the answer (status, time, audio seconds) into the metrics.
fn finish(
    app: &App,
    endpoint: &str,
    started: Instant,
    result: Result<(Response, f64), ApiError>,
) -> Response {
    let (response, audio) = match result {
        Ok(r) => r,
        Err(e) => (e.into_response(), 0.0),
    };
    app.metrics
        .done(endpoint, response.status(), started.elapsed(), audio);
    response
}

async fn transcribe_request(
    app: &Arc<App>,
    multipart: Result<Multipart, MultipartRejection>,
    translate: bool,
) -> Result<(Response, f64), ApiError> {
    // A place in the queue first: a request beyond it is answered 429 without its upload
    // being kept (read and dropped as it comes, so that the client, still sending, gets the
    // answer and not a reset), so many clients at once cost the server no more than the
    // queue's uploads. An upload that takes too long gives its place up.
    let place = match app.stt.admit() {
        Ok(place) => place,
        Err(e) => {
            discard(multipart).await;
            return Err(e);
        }
    };
    let form = tokio::time::timeout(UPLOAD_TIME, read_form(multipart))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_timeout",
                format!(
                    "the upload did not arrive within {} s",
                    UPLOAD_TIME.as_secs()
                ),
            )
        })??;
    let Some(upload) = form.file else {
        return Err(ApiError::param(
            "file",
            "missing_file",
            "a file is required",
        ));
    };
    if upload.bytes == 0 {
        return Err(ApiError::param("file", "empty_file", "the file is empty"));
    }
    let model = form.model.unwrap_or_default();
    if !(model == app.options.stt_model || STT_ALIASES.contains(&model.as_str())) {
        return Err(ApiError {
            param: Some("model"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!(
                    "model {model:?} is not served here: use {} or whisper-1",
                    app.options.stt_model
                ),
            )
        });
    }
    let format = form.response_format.as_deref().unwrap_or("json");
    if !["json", "text", "srt", "vtt", "verbose_json"].contains(&format) {
        return Err(ApiError::param(
            "response_format",
            "invalid_value",
            format!("response_format {format:?}: use json, text, srt, vtt or verbose_json"),
        ));
    }
    let temperature = match &form.temperature {
        None => 0.0,
        Some(t) => match t.trim().parse::<f32>() {
            Ok(t) if (0.0..=1.0).contains(&t) => t,
            _ => {
                return Err(ApiError::param(
                    "temperature",
                    "invalid_value",
                    format!("temperature {t:?}: give a number from 0 to 1"),
                ));
            }
        },
    };
    let mut words = false;
    for g in &form.granularities {
        match g.as_str() {
            "word" => words = true,
            "segment" => {}
            other => {
                return Err(ApiError::param(
                    "timestamp_granularities",
                    "invalid_value",
                    format!("timestamp granularity {other:?}: use word or segment"),
                ));
            }
        }
    }
    if !form.granularities.is_empty() && format != "verbose_json" {
        return Err(ApiError::param(
            "timestamp_granularities",
            "invalid_value",
            "timestamp_granularities needs response_format=verbose_json",
        ));
    }
    let english_only = app.english_only;
    let language = form.language.unwrap_or_default().trim().to_lowercase();
    let language = match language.as_str() {
        "" if english_only => "en".to_string(),
        "" => "auto".to_string(),
        "english" => "en".to_string(),
        other => other.to_string(),
    };
    if english_only && language != "en" {
        return Err(ApiError::param(
            "language",
            "unsupported_language",
            format!(
                "model {} transcribes English only (language {language:?})",
                app.options.stt_model
            ),
        ));
    }
    if english_only && translate {
        return Err(ApiError::param(
            "model",
            "unsupported_task",
            format!(
                "model {} is English-only and cannot translate: serve a multilingual model",
                app.options.stt_model
            ),
        ));
    }

    let upload = upload.file;
    let path = upload.path().to_path_buf();
    let max = app.options.max_audio_seconds;
    let duration = tokio::task::spawn_blocking(move || probe(&path))
        .await
        .map_err(|e| ApiError::server(e.to_string()))??;
    if duration > max {
        return Err(ApiError::param(
            "file",
            "audio_too_long",
            format!("the audio is {duration:.0} s long; this server takes up to {max:.0} s"),
        ));
    }
    let mut options = stt_options(app, translate);
    options.language = language;
    options.prompt = form.prompt.unwrap_or_default();
    options.word_timestamps = words;
    options.temperature = temperature;
    let (running, cores) = app.stt.turn_for(&app.metrics, true).await;
    options.threads = cores;
    let path = upload.path().to_path_buf();
    let doc = tokio::task::spawn_blocking(move || {
        let r = transcribe::transcribe_file(&path, &options, |_| {});
        drop(running);
        r
    })
    .await
    .map_err(|e| ApiError::server(e.to_string()))?;
    drop(place);
    drop(upload);
    let doc = doc.map_err(|e| match e {
        TranscribeError::Failed { why, .. } => ApiError::param(
            "file",
            "invalid_audio",
            format!("the file could not be decoded as audio: {why}"),
        ),
        TranscribeError::TruncatedWav { why, .. } => ApiError::param(
            "file",
            "invalid_audio",
            format!("the file is a truncated WAV file: {why}"),
        ),
        other => ApiError::server(other.to_string()),
    })?;
    let seconds = doc.duration.max(duration);
    Ok((render(&doc, format, translate, words, seconds), seconds))
}

/// The audio's length, or 400 when GStreamer cannot decode it.
fn probe(path: &std::path::Path) -> Result<f64, ApiError> {
    let bad = |why: String| {
        ApiError::param(
            "file",
            "invalid_audio",
            format!("the file is not audio this server can decode: {why}"),
        )
    };
    let discoverer = gst_pbutils::Discoverer::new(gst::ClockTime::from_seconds(10))
        .map_err(|e| ApiError::server(e.to_string()))?;
    let uri =
        gst::glib::filename_to_uri(path, None).map_err(|e| ApiError::server(e.to_string()))?;
    let info = discoverer
        .discover_uri(&uri)
        .map_err(|e| bad(e.to_string()))?;
    if info.audio_streams().is_empty() {
        return Err(bad("no audio stream in it".into()));
    }
    Ok(info.duration().map_or(0.0, |d| d.nseconds() as f64 / 1e9))
}

fn render(doc: &Document, format: &str, translate: bool, words: bool, seconds: f64) -> Response {
    let text = |body: String| {
        ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
    };
    match format {
        "text" => text(format!("{}\n", doc.text)),
        "srt" => text(doc.render(Format::Srt)),
        "vtt" => text(doc.render(Format::Vtt)),
        "verbose_json" => {
            let segments: Vec<_> = doc
                .segments
                .iter()
                .map(|s| {
                    json!({
                        "id": s.id, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
                        "tokens": [], "temperature": 0.0, "avg_logprob": 0.0,
                        "compression_ratio": 0.0, "no_speech_prob": 0.0,
                    })
                })
                .collect();
            let mut body = json!({
                "task": if translate { "translate" } else { "transcribe" },
                "language": language_name(&doc.language),
                "duration": seconds,
                "text": doc.text,
                "segments": segments,
            });
            if words {
                let words: Vec<_> = doc.segments.iter().flat_map(|s| s.words.iter()).collect();
                body["words"] = json!(words);
            }
            Json(body).into_response()
        }
        _ => Json(json!({
            "text": doc.text,
            "usage": {"type": "duration", "seconds": seconds.ceil()},
        }))
        .into_response(),
    }
}

/// OpenAI's verbose_json names the language in English ("english").
fn language_name(code: &str) -> String {
    match code {
        "en" => "english".into(),
        other => other.into(),
    }
}

#[derive(serde::Deserialize)]
struct SpeechRequest {
    #[serde(default)]
    model: String,
    input: Option<String>,
    #[serde(default)]
    voice: Option<serde_json::Value>,
    speed: Option<f32>,
    response_format: Option<String>,
    stream_format: Option<String>,
}

/// Audio formats: the encoder chain after S16LE 24 kHz mono, and the content type.
fn audio_format(name: &str) -> Option<(&'static str, &'static str)> {
    Some(match name {
        "mp3" => ("audioconvert ! lamemp3enc !", "audio/mpeg"),
        "opus" => ("audioconvert ! opusenc ! oggmux !", "audio/ogg"),
        "aac" => (
            "audioconvert ! avenc_aac ! aacparse ! audio/mpeg,stream-format=adts !",
            "audio/aac",
        ),
        "flac" => ("audioconvert ! flacenc !", "audio/flac"),
        "wav" => ("", "audio/wav"),
        "pcm" => ("", "audio/pcm"),
        _ => return None,
    })
}

/// The first element of a format's encoder chain that this GStreamer does not have.
fn missing_encoder(format: &str) -> Option<String> {
    first_missing(format, |name| gst::ElementFactory::find(name).is_some())
}

/// The first element of `format`'s chain for which `has` is false.
fn first_missing(format: &str, has: impl Fn(&str) -> bool) -> Option<String> {
    let (chain, _) = audio_format(format)?;
    chain
        .split('!')
        .filter_map(|part| part.split_whitespace().next())
        .filter(|name| !name.contains('/'))
        .find(|name| !has(name))
        .map(String::from)
}

async fn speech(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    let started = Instant::now();
    let result = speech_request(&app, &headers, &body, started).await;
    match result {
        Ok(response) => response,
        Err(e) => {
            let response = e.into_response();
            app.metrics
                .done("speech", response.status(), started.elapsed(), 0.0);
            response
        }
    }
}

async fn speech_request(
    app: &Arc<App>,
    headers: &HeaderMap,
    body: &[u8],
    started: Instant,
) -> Result<Response, ApiError> {
    let json_body = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !json_body {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_content_type",
            "the request must be JSON (Content-Type: application/json)",
        ));
    }
    let request: SpeechRequest = serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the body is not a valid speech request: {e}"),
        )
    })?;
    let model = request.model.as_str();
    if !TTS_ALIASES.contains(&model) {
        return Err(ApiError {
            param: Some("model"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "model_not_found",
                format!("model {model:?} is not served here: use kokoro, tts-1 or tts-1-hd"),
            )
        });
    }
    let input = request.input.unwrap_or_default();
    if input.trim().is_empty() || !input.chars().any(char::is_alphanumeric) {
        return Err(ApiError::param(
            "input",
            "empty_input",
            "input has no words to speak",
        ));
    }
    let chars = input.chars().count();
    if chars > app.options.max_input_chars {
        return Err(ApiError::param(
            "input",
            "string_above_max_length",
            format!(
                "input is {chars} characters; this server takes up to {}",
                app.options.max_input_chars
            ),
        ));
    }
    // OpenAI's voice is a name, or an object with an id.
    let voice = match &request.voice {
        None => app.options.voice.clone(),
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(v) => v
            .get("id")
            .and_then(|id| id.as_str())
            .unwrap_or_default()
            .to_string(),
    };
    if !app.voices.contains(&voice) {
        return Err(ApiError::param(
            "voice",
            "invalid_voice",
            format!(
                "unknown voice {voice:?}: this server has {}",
                app.voices.join(", ")
            ),
        ));
    }
    let speed = request.speed.unwrap_or(1.0);
    if !(0.5..=2.0).contains(&speed) {
        return Err(ApiError::param(
            "speed",
            "invalid_value",
            format!("speed {speed}: give 0.5 to 2"),
        ));
    }
    let format_name = request.response_format.as_deref().unwrap_or("mp3");
    let Some((_, content_type)) = audio_format(format_name) else {
        return Err(ApiError::param(
            "response_format",
            "invalid_value",
            format!("response_format {format_name:?}: use mp3, opus, aac, flac, wav or pcm"),
        ));
    };
    if let Some(missing) = missing_encoder(format_name) {
        return Err(ApiError::param(
            "response_format",
            "unsupported_value",
            format!(
                "response_format {format_name:?} needs GStreamer's {missing}, which is not \
                 installed here: use wav, pcm or another format"
            ),
        ));
    }
    if request
        .stream_format
        .as_deref()
        .is_some_and(|f| f != "audio")
    {
        return Err(ApiError::param(
            "stream_format",
            "invalid_value",
            "only stream_format=audio is served",
        ));
    }

    let place = app.tts.admit()?;
    let running = app.tts.turn(&app.metrics).await;
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(32);
    let (first_tx, first_rx) = oneshot::channel::<Result<(), ApiError>>();
    let worker = app.clone();
    let format_name = format_name.to_string();
    tokio::task::spawn_blocking(move || {
        let result = stream_speech(&worker, &input, &voice, speed, &format_name, tx, first_tx);
        drop((running, place));
        let (status, audio) = match result {
            Ok(audio) => (StatusCode::OK, audio),
            Err(e) => {
                tracing::warn!("speech: {e}");
                (StatusCode::INTERNAL_SERVER_ERROR, 0.0)
            }
        };
        worker
            .metrics
            .done("speech", status, started.elapsed(), audio);
    });
    match first_rx.await {
        Ok(Ok(())) => {
            app.metrics
                .first_byte
                .observe(started.elapsed().as_secs_f64());
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|item| (item, rx))
            });
            Ok((
                [(header::CONTENT_TYPE, content_type)],
                axum::body::Body::from_stream(stream),
            )
                .into_response())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(ApiError::server("synthesis ended before any audio")),
    }
}

/// Synthesises `text` through kokorotts into the format's encoder and sends the encoded bytes
/// as they come; `first` is told when the first bytes are ready (or why there are none). Ends
/// early when the client goes away. Returns the seconds of audio made.
fn stream_speech(
    app: &App,
    text: &str,
    voice: &str,
    speed: f32,
    format: &str,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    first: oneshot::Sender<Result<(), ApiError>>,
) -> Result<f64, String> {
    let (encoder, _) = audio_format(format).expect("checked by the caller");
    let description = format!(
        "appsrc name=text format=time caps=text/x-raw,format=utf8 ! kokorotts voice={} speed={speed} threads={} first-words={} ! \
         audioconvert ! audioresample ! audio/x-raw,format=S16LE,rate=24000,channels=1 ! \
         {encoder} appsink name=out sync=false",
        graph::quote(voice),
        app.options.threads,
        app.options.first_words,
    );
    let mut first = Some(first);
    let fail = |first: &mut Option<oneshot::Sender<Result<(), ApiError>>>, why: String| {
        if let Some(f) = first.take() {
            let _ = f.send(Err(ApiError::server(format!("synthesis failed: {why}"))));
        }
        why
    };
    let pipeline = runner::launch(&description).map_err(|e| fail(&mut first, e.to_string()))?;
    let appsrc = pipeline
        .by_name("text")
        .and_downcast::<gst_app::AppSrc>()
        .expect("named in the description");
    let appsink = pipeline
        .by_name("out")
        .and_downcast::<gst_app::AppSink>()
        .expect("named in the description");
    let _stop = StopOnDrop(pipeline.clone());
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|e| fail(&mut first, e.to_string()))?;
    let _ = appsrc.push_buffer(gst::Buffer::from_mut_slice(text.as_bytes().to_vec()));
    let _ = appsrc.end_of_stream();
    let bus = pipeline.bus().expect("a pipeline has a bus");
    let mut bytes = 0u64;
    // A streamed WAV cannot say its length up front: the sizes say "unknown" (all ones).
    let mut header = (format == "wav").then(|| streaming_wav_header(24000));
    loop {
        if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error]) {
            let why = match msg.view() {
                gst::MessageView::Error(e) => runner::describe_error(e),
                _ => unreachable!("filtered"),
            };
            return Err(fail(&mut first, why));
        }
        let Some(sample) = appsink.try_pull_sample(gst::ClockTime::from_mseconds(100)) else {
            if appsink.is_eos() {
                break;
            }
            continue;
        };
        let Some(buffer) = sample.buffer() else {
            continue;
        };
        let Ok(map) = buffer.map_readable() else {
            continue;
        };
        let mut chunk = header.take().unwrap_or_default();
        chunk.extend_from_slice(map.as_slice());
        if matches!(format, "wav" | "pcm") {
            bytes += map.len() as u64;
        } else if let Some(d) = buffer.duration() {
            bytes += d.nseconds() * 48 / 1_000_000;
        }
        if let Some(f) = first.take() {
            let _ = f.send(Ok(()));
        }
        if tx.blocking_send(Ok(Bytes::from(chunk))).is_err() {
            tracing::debug!("speech: the client went away");
            break;
        }
    }
    if first.is_some() {
        return Err(fail(&mut first, "no audio was produced".into()));
    }
    // bytes of S16LE at 24 kHz: 48,000 per second.
    Ok(bytes as f64 / 48_000.0)
}

/// Sets a pipeline to NULL when dropped (every way out of a function).
struct StopOnDrop(gst::Pipeline);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.set_state(gst::State::Null);
    }
}

/// A 44-byte WAV header for 16-bit mono PCM of unknown length (the sizes all ones, as streaming
/// servers send it; readers take the data to the end of the stream).
fn streaming_wav_header(rate: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(44);
    h.extend_from_slice(b"RIFF");
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    h.extend_from_slice(b"WAVEfmt ");
    h.extend_from_slice(&16u32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes()); // PCM
    h.extend_from_slice(&1u16.to_le_bytes()); // mono
    h.extend_from_slice(&rate.to_le_bytes());
    h.extend_from_slice(&(rate * 2).to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&16u16.to_le_bytes());
    h.extend_from_slice(b"data");
    h.extend_from_slice(&u32::MAX.to_le_bytes());
    h
}

/// Speaks `text` to nowhere (warm-up).
fn synthesise_all(app: &App, text: &str, voice: &str, speed: f32) -> Result<f64, String> {
    let (tx, mut rx) = mpsc::channel(1024);
    let (first, _) = oneshot::channel();
    let drain = std::thread::spawn(move || while rx.blocking_recv().is_some() {});
    let r = stream_speech(app, text, voice, speed, "pcm", tx, first);
    let _ = drain.join();
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_wav_header_is_44_bytes_of_pcm() {
        let h = streaming_wav_header(24000);
        assert_eq!(h.len(), 44);
        assert_eq!(&h[0..4], b"RIFF");
        assert_eq!(&h[8..16], b"WAVEfmt ");
        assert_eq!(u32::from_le_bytes(h[24..28].try_into().unwrap()), 24000);
        assert_eq!(&h[36..40], b"data");
    }

    #[test]
    fn a_format_whose_encoder_is_missing_is_named() {
        let without = |gone: &'static str| move |name: &str| name != gone;
        assert_eq!(
            first_missing("mp3", without("lamemp3enc")).as_deref(),
            Some("lamemp3enc")
        );
        assert_eq!(
            first_missing("aac", without("avenc_aac")).as_deref(),
            Some("avenc_aac")
        );
        assert_eq!(
            first_missing("opus", without("oggmux")).as_deref(),
            Some("oggmux")
        );
        assert_eq!(first_missing("aac", without("lamemp3enc")), None);
        assert_eq!(first_missing("wav", |_| false), None);
        // scripts/setup installs every encoder.
        gst::init().unwrap();
        for format in ["mp3", "opus", "aac", "flac", "wav", "pcm"] {
            assert_eq!(missing_encoder(format), None, "{format}");
        }
    }

    #[test]
    fn errors_have_openai_shape() {
        let e = ApiError::param("voice", "invalid_voice", "unknown voice");
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.kind, "invalid_request_error");
        let full = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", "full");
        assert_eq!(full.kind, "rate_limit_error");
    }
}
