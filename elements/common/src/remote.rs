//! A speech service reached over HTTP — OpenAI's audio API, as `vox serve` or any compatible
//! server offers it — for elements that run their model elsewhere. Timeouts, retries with
//! back-off and a circuit breaker live here, so that a service fault costs the element one
//! warning and never the pipeline. No GStreamer types.

use crate::breaker::Breaker;
use reqwest::blocking::{Client, RequestBuilder, Response};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// The service failed (unreachable, timed out, 5xx, 429), retries included.
    #[error("{0}")]
    Failed(String),
    /// The service refused the request (4xx): retrying would not help.
    #[error("{0}")]
    Rejected(String),
    #[error("skipped: the circuit breaker is open after repeated failures")]
    Open,
    #[error("cancelled")]
    Cancelled,
}

/// Faults in a row after which the service is skipped, and for how long at first.
const BREAKER_FAILURES: u32 = 3;
const BREAKER_BACKOFF: Duration = Duration::from_secs(5);
/// The first retry waits this long; each next one twice as long.
const RETRY_BASE: Duration = Duration::from_millis(200);

pub struct Remote {
    client: Client,
    base: String,
    key: Option<String>,
    retries: u32,
    breaker: Mutex<Breaker>,
}

impl Remote {
    /// A client of the service at `url` (`http://HOST:PORT`, `/v1` optional); each attempt may
    /// take `timeout`, and a failed one is tried again up to `retries` times. The key comes from
    /// `$VOX_SPEECH_API_KEY` when set.
    pub fn new(url: &str, timeout: Duration, retries: u32) -> Result<Self, String> {
        let trimmed = url.trim().trim_end_matches('/');
        if !(trimmed.starts_with("http://") || trimmed.starts_with("https://")) {
            return Err(format!(
                "url {url:?}: give the service's address, http://HOST:PORT"
            ));
        }
        let base = trimmed.strip_suffix("/v1").unwrap_or(trimmed).to_string();
        let client = Client::builder()
            .connect_timeout(Duration::from_secs(3).min(timeout))
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot make an HTTP client: {e}"))?;
        let key = std::env::var("VOX_SPEECH_API_KEY")
            .ok()
            .filter(|k| !k.trim().is_empty());
        Ok(Self {
            client,
            base,
            key,
            retries,
            breaker: Mutex::new(Breaker::new(BREAKER_FAILURES, BREAKER_BACKOFF)),
        })
    }

    /// `{base}/v1/{path}`.
    pub fn endpoint(&self, path: &str) -> String {
        format!("{}/v1/{path}", self.base)
    }

    pub fn circuit_open(&self) -> bool {
        self.breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_open(Instant::now())
    }

    /// Sends the request `build` makes (made again for each attempt) and returns the first
    /// successful response. Connection faults, timeouts, 5xx and 429 are retried with back-off
    /// and count towards the breaker; other 4xx answers are returned at once.
    pub fn send(
        &self,
        build: impl Fn(&Client) -> RequestBuilder,
        cancelled: impl Fn() -> bool,
    ) -> Result<Response, RemoteError> {
        if self.circuit_open() {
            return Err(RemoteError::Open);
        }
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                std::thread::sleep(RETRY_BASE * 2u32.saturating_pow(attempt - 1));
            }
            if cancelled() {
                return Err(RemoteError::Cancelled);
            }
            let mut request = build(&self.client);
            if let Some(key) = &self.key {
                request = request.bearer_auth(key);
            }
            match request.send() {
                Ok(r) if r.status().is_success() => {
                    self.breaker
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .success();
                    return Ok(r);
                }
                Ok(r) => {
                    let status = r.status();
                    let why = format!("{status}: {}", error_message(&r.text().unwrap_or_default()));
                    if status.is_client_error()
                        && status != reqwest::StatusCode::TOO_MANY_REQUESTS
                        && status != reqwest::StatusCode::REQUEST_TIMEOUT
                    {
                        return Err(RemoteError::Rejected(why));
                    }
                    last = why;
                }
                Err(e) => last = describe(&e),
            }
        }
        self.breaker
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .failure(Instant::now());
        Err(RemoteError::Failed(format!(
            "{} after {} attempt(s): {last}",
            self.base,
            self.retries + 1
        )))
    }
}

/// An error with its causes ("error sending request: … Connection refused").
fn describe(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The message of an OpenAI-shaped error body, else the start of the body.
fn error_message(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(String::from))
        .unwrap_or_else(|| body.chars().take(200).collect())
}

/// The properties of an element that may use a speech service instead of its model in-process:
/// `url` (empty or `local`: in-process), `timeout-ms` and `retries`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    pub timeout_ms: u32,
    pub retries: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            url: String::new(),
            timeout_ms: 30_000,
            retries: 2,
        }
    }
}

impl Settings {
    /// The element's properties for these settings.
    pub fn param_specs(service: &str) -> Vec<gst::glib::ParamSpec> {
        use gst::glib;
        use gst::prelude::*;
        let url = format!(
            "A {service} service speaking OpenAI's audio API (http://HOST:PORT, as `vox serve` offers it) to use instead of the model in-process; empty or \"local\": in-process"
        );
        vec![
            glib::ParamSpecString::builder("url")
                .nick("Service URL")
                .blurb(&url)
                .default_value(Some(""))
                .mutable_ready()
                .build(),
            glib::ParamSpecUInt::builder("timeout-ms")
                .nick("Service timeout")
                .blurb("Longest wait for the service's answer, per attempt")
                .minimum(100)
                .maximum(600_000)
                .default_value(30_000)
                .mutable_ready()
                .build(),
            glib::ParamSpecUInt::builder("retries")
                .nick("Service retries")
                .blurb("Attempts after a failed one (with back-off); after repeated faults the service is skipped for a while")
                .maximum(10)
                .default_value(2)
                .mutable_ready()
                .build(),
        ]
    }

    /// Sets property `name`; false when it is not one of these.
    pub fn set(&mut self, name: &str, value: &gst::glib::Value) -> bool {
        match name {
            "url" => {
                self.url = value
                    .get::<Option<String>>()
                    .ok()
                    .flatten()
                    .unwrap_or_default()
            }
            "timeout-ms" => self.timeout_ms = value.get().expect("type checked upstream"),
            "retries" => self.retries = value.get().expect("type checked upstream"),
            _ => return false,
        }
        true
    }

    /// Property `name`, if it is one of these.
    pub fn get(&self, name: &str) -> Option<gst::glib::Value> {
        use gst::glib::prelude::*;
        Some(match name {
            "url" => self.url.to_value(),
            "timeout-ms" => self.timeout_ms.to_value(),
            "retries" => self.retries.to_value(),
            _ => return None,
        })
    }

    /// Whether a service is named (else the model runs in-process).
    pub fn is_remote(&self) -> bool {
        let url = self.url.trim();
        !(url.is_empty() || url == "local")
    }

    /// The service client, when one is named.
    pub fn remote(&self) -> Result<Option<Remote>, String> {
        if !self.is_remote() {
            return Ok(None);
        }
        Remote::new(
            &self.url,
            Duration::from_millis(u64::from(self.timeout_ms)),
            self.retries,
        )
        .map(Some)
    }
}
