//! The agent's metrics (Prometheus text through prometheus-client) and its HTTP endpoints:
//! `/healthz` (the process is alive), `/readyz` (models loaded, transport connected, not
//! draining) and `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;
use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Stage {
    /// transport, vad, stt, llm, tts, session
    pub stage: String,
}

/// Where inference runs, decided at start-up: the GPU when this is a CUDA build and an NVIDIA
/// GPU is there, else the CPU (a CUDA build without a GPU falls back and says so).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accelerator {
    pub cuda_build: bool,
    pub gpu_present: bool,
}

impl Accelerator {
    pub fn detect() -> Self {
        Self {
            cuda_build: cfg!(feature = "cuda"),
            gpu_present: std::path::Path::new("/dev/nvidia0").exists()
                || std::path::Path::new("/proc/driver/nvidia/version").exists(),
        }
    }

    /// `cuda` or `cpu`.
    pub fn device(&self) -> &'static str {
        if self.cuda_build && self.gpu_present {
            "cuda"
        } else {
            "cpu"
        }
    }

    /// One line for the log (and `vox doctor`).
    pub fn describe(&self) -> &'static str {
        match (self.gpu_present, self.cuda_build) {
            (true, true) => "NVIDIA GPU present; CUDA build: inference on the GPU",
            (true, false) => {
                "NVIDIA GPU present, but this build is CPU-only: inference on the CPU (rebuild with --features cuda)"
            }
            (false, true) => "no GPU found: the CUDA build falls back to the CPU",
            (false, false) => "no GPU: inference on the CPU",
        }
    }

    /// Says where inference runs, as a warning when a CUDA build found no GPU.
    pub fn log(&self) {
        if self.cuda_build && !self.gpu_present {
            tracing::warn!("{}", self.describe());
        } else {
            tracing::info!("{}", self.describe());
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcceleratorLabels {
    device: String,
    cuda_build: String,
    gpu_present: String,
}

/// A registry for the `vox_` metrics of one process. In a pod (the Downward API's `$POD_NAME`
/// and `$POD_NAMESPACE`) every series carries `pod` and `namespace`, which Prometheus keeps
/// (`honor_labels`) and prometheus-adapter needs; found by DNS, the targets have no other
/// source for them. Holds `vox_start_time_seconds` (restarts) and `vox_accelerator_info`.
pub(crate) fn registry() -> Registry {
    let labels = [("pod", "POD_NAME"), ("namespace", "POD_NAMESPACE")]
        .into_iter()
        .filter_map(|(label, var)| {
            let value = std::env::var(var).ok().filter(|v| !v.is_empty())?;
            Some((Cow::Borrowed(label), Cow::Owned(value)))
        });
    let mut registry = Registry::with_prefix_and_labels("vox", labels);
    let started: Gauge<f64, AtomicU64> = Gauge::default();
    started.set(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    );
    registry.register(
        "start_time_seconds",
        "When this process started, in seconds since the Unix epoch",
        started,
    );
    let accelerator = Accelerator::detect();
    registry.register(
        "accelerator",
        "Where inference runs (device cuda or cpu), whether this is a CUDA build and whether a GPU was found",
        Info::new(AcceleratorLabels {
            device: accelerator.device().into(),
            cuda_build: accelerator.cuda_build.to_string(),
            gpu_present: accelerator.gpu_present.to_string(),
        }),
    );
    registry
}

/// Latency buckets (seconds) from 25 ms to ~13 s.
pub(crate) fn buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.025, 1.5, 16)
}

pub struct Metrics {
    registry: Registry,
    pub sessions_active: Gauge,
    pub sessions: Counter,
    pub sessions_failed: Counter,
    pub sessions_refused: Counter,
    pub turns: Counter,
    pub interruptions: Counter,
    pub errors: Family<Stage, Counter>,
    pub transcript_seconds: Histogram,
    pub first_token_seconds: Histogram,
    pub first_audio_seconds: Histogram,
    pub voice_to_voice_seconds: Histogram,
    pub llm_circuit_open: Gauge,
    pub voice_underrun_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            sessions_active: Gauge::default(),
            sessions: Counter::default(),
            sessions_failed: Counter::default(),
            sessions_refused: Counter::default(),
            turns: Counter::default(),
            interruptions: Counter::default(),
            errors: Family::default(),
            transcript_seconds: Histogram::new(buckets()),
            first_token_seconds: Histogram::new(buckets()),
            first_audio_seconds: Histogram::new(buckets()),
            voice_to_voice_seconds: Histogram::new(buckets()),
            llm_circuit_open: Gauge::default(),
            voice_underrun_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.02, 2.0, 10),
            ),
            registry: registry(),
        };
        m.registry.register(
            "sessions_active",
            "Sessions (callers) being served now",
            m.sessions_active.clone(),
        );
        m.registry
            .register("sessions", "Sessions started", m.sessions.clone());
        m.registry.register(
            "sessions_failed",
            "Sessions that ended with an error",
            m.sessions_failed.clone(),
        );
        m.registry.register(
            "sessions_refused",
            "Callers refused (all sessions busy, or draining)",
            m.sessions_refused.clone(),
        );
        m.registry
            .register("turns", "User turns answered", m.turns.clone());
        m.registry.register(
            "interruptions",
            "Replies cut off by the caller speaking (barge-in)",
            m.interruptions.clone(),
        );
        m.registry.register(
            "errors",
            "Errors and backend faults, by stage",
            m.errors.clone(),
        );
        m.registry.register(
            "transcript_seconds",
            "End of the caller's speech (VAD) to the final transcript",
            m.transcript_seconds.clone(),
        );
        m.registry.register(
            "first_token_seconds",
            "Transcript to the LLM's first token",
            m.first_token_seconds.clone(),
        );
        m.registry.register(
            "first_audio_seconds",
            "Reply text to the first synthesised audio",
            m.first_audio_seconds.clone(),
        );
        m.registry.register(
            "voice_to_voice_seconds",
            "End of the caller's speech (the VAD's boundary) to the agent's first reply audio",
            m.voice_to_voice_seconds.clone(),
        );
        m.registry.register(
            "llm_circuit_open",
            "1 while the LLM backend's circuit breaker skips it after repeated faults",
            m.llm_circuit_open.clone(),
        );
        m.registry.register(
            "voice_underrun_seconds",
            "Gaps of 20 ms or more in the agent's voice within a reply: audio that came after the audio before it had played out (synthesis behind playback)",
            m.voice_underrun_seconds.clone(),
        );
        m
    }

    pub fn error(&self, stage: &str) {
        self.errors
            .get_or_create(&Stage {
                stage: stage.to_string(),
            })
            .inc();
    }

    /// The metrics in Prometheus/OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The HTTP endpoints, served on a thread of their own until dropped.
pub struct HttpServer {
    server: Arc<tiny_http::Server>,
    thread: Option<JoinHandle<()>>,
    addr: std::net::SocketAddr,
}

#[derive(Debug, thiserror::Error)]
#[error("cannot serve HTTP on {addr}: {why}")]
pub struct HttpError {
    addr: String,
    why: String,
}

impl HttpServer {
    /// Serves `/healthz`, `/readyz` (200 while `ready()`, else 503 with the reason) and
    /// `/metrics` on `listen` (`HOST:PORT`).
    pub fn start(
        listen: &str,
        metrics: Arc<Metrics>,
        ready: impl Fn() -> Result<(), String> + Send + 'static,
    ) -> Result<Self, HttpError> {
        let server = tiny_http::Server::http(listen).map_err(|e| HttpError {
            addr: listen.to_string(),
            why: e.to_string(),
        })?;
        let addr = server.server_addr().to_ip().ok_or_else(|| HttpError {
            addr: listen.to_string(),
            why: "not an IP address".into(),
        })?;
        let server = Arc::new(server);
        let serving = server.clone();
        let thread = std::thread::Builder::new()
            .name("vox-http".into())
            .spawn(move || {
                for request in serving.incoming_requests() {
                    let path = request.url().split('?').next().unwrap_or("").to_string();
                    let text = |code: u16, body: String, kind: &str| {
                        tiny_http::Response::from_string(body)
                            .with_status_code(code)
                            .with_header(
                                tiny_http::Header::from_bytes(
                                    &b"Content-Type"[..],
                                    kind.as_bytes(),
                                )
                                .expect("valid header"),
                            )
                    };
                    let response = match path.as_str() {
                        "/healthz" => text(200, "ok\n".into(), "text/plain"),
                        "/readyz" => match ready() {
                            Ok(()) => text(200, "ready\n".into(), "text/plain"),
                            Err(why) => text(503, format!("not ready: {why}\n"), "text/plain"),
                        },
                        "/metrics" => text(
                            200,
                            metrics.encode(),
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        ),
                        _ => text(404, "not found\n".into(), "text/plain"),
                    };
                    let _ = request.respond(response);
                }
            })
            .map_err(|e| HttpError {
                addr: listen.to_string(),
                why: e.to_string(),
            })?;
        Ok(Self {
            server,
            thread: Some(thread),
            addr,
        })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_has_every_metric() {
        let m = Metrics::new();
        m.sessions_active.set(2);
        m.error("llm");
        m.voice_to_voice_seconds.observe(1.2);
        let text = m.encode();
        for name in [
            "vox_sessions_active 2",
            "vox_sessions_total 0",
            "vox_turns_total",
            "vox_interruptions_total",
            "vox_errors_total{stage=\"llm\"} 1",
            "vox_voice_to_voice_seconds_count 1",
            "vox_transcript_seconds_bucket",
            "vox_first_token_seconds_sum",
            "vox_first_audio_seconds_count",
            "vox_llm_circuit_open 0",
        ] {
            assert!(text.contains(name), "{name} missing:\n{text}");
        }
    }
}
