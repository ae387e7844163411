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

/// Where an element's model runs: its `backend` property (each element registers its own
/// GLib enum for it, with these three values in this order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backend {
    /// The service at `url` when one is given, else in-process.
    #[default]
    Auto,
    /// In-process, whatever `url` says.
    Local,
    /// The service at `url` (which must be given).
    Remote,
}

/// The properties of an element that may use a speech service instead of its model in-process:
/// `backend`, `url` (empty or `local`: in-process), `timeout-ms` and `retries`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub backend: Backend,
    pub url: String,
    pub timeout_ms: u32,
    pub retries: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
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

    /// Whether the service is used (else the model runs in-process).
    pub fn is_remote(&self) -> bool {
        let url = self.url.trim();
        match self.backend {
            Backend::Local => false,
            Backend::Remote => true,
            Backend::Auto => !(url.is_empty() || url == "local"),
        }
    }

    /// The service client, when the service is used.
    pub fn remote(&self) -> Result<Option<Remote>, String> {
        if !self.is_remote() {
            return Ok(None);
        }
        let url = self.url.trim();
        if url.is_empty() || url == "local" {
            return Err("backend=remote needs the service: url=http://HOST:PORT".into());
        }
        Remote::new(
            &self.url,
            Duration::from_millis(u64::from(self.timeout_ms)),
            self.retries,
        )
        .map(Some)
    }
}

#[cfg(test)]
mod tests {
    //! Against a local HTTP server that answers from a script — a test double, because a real
    //! service cannot be made to fail in these exact ways, in this order, on demand.
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Answers its requests with `script` in turn (the last one from then on): a status code,
    /// or 0 for an answer that never comes. Returns the service URL and the request count.
    fn service(script: &'static [u16]) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let n = seen.fetch_add(1, Ordering::SeqCst);
                let status = script[n.min(script.len() - 1)];
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let _ = reader.read_exact(&mut vec![0; length]);
                    let mut stream = stream;
                    if status == 0 {
                        std::thread::sleep(Duration::from_secs(10));
                        return;
                    }
                    let body = if status == 200 {
                        "{\"text\": \"ok\"}".to_string()
                    } else {
                        format!("{{\"error\": {{\"message\": \"status {status} on purpose\"}}}}")
                    };
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                });
            }
        });
        (url, count)
    }

    fn post(remote: &Remote) -> Result<Response, RemoteError> {
        let url = remote.endpoint("audio/transcriptions");
        remote.send(|c| c.post(&url).body("x"), || false)
    }

    #[test]
    fn server_errors_and_429_are_retried_with_back_off() {
        let (url, count) = service(&[503, 429, 200]);
        let remote = Remote::new(&url, Duration::from_secs(5), 2).unwrap();
        let started = Instant::now();
        let r = post(&remote).unwrap();
        assert_eq!(r.text().unwrap(), "{\"text\": \"ok\"}");
        assert_eq!(count.load(Ordering::SeqCst), 3);
        // Waited 200 ms, then 400 ms.
        assert!(
            started.elapsed() >= RETRY_BASE * 3,
            "{:?}",
            started.elapsed()
        );
        assert!(!remote.circuit_open());
    }

    #[test]
    fn a_refused_request_is_not_retried_nor_counted_against_the_service() {
        let (url, count) = service(&[400]);
        let remote = Remote::new(&url, Duration::from_secs(5), 2).unwrap();
        for _ in 0..BREAKER_FAILURES + 1 {
            match post(&remote) {
                Err(RemoteError::Rejected(why)) => {
                    assert!(
                        why.contains("400") && why.contains("status 400 on purpose"),
                        "{why}"
                    )
                }
                other => panic!("{:?}", other.map(|r| r.status())),
            }
        }
        assert_eq!(count.load(Ordering::SeqCst), BREAKER_FAILURES as usize + 1);
        assert!(!remote.circuit_open());
    }

    #[test]
    fn repeated_failures_open_the_breaker_and_it_skips_the_service() {
        let (url, count) = service(&[500]);
        let remote = Remote::new(&url, Duration::from_secs(5), 1).unwrap();
        for _ in 0..BREAKER_FAILURES {
            match post(&remote) {
                Err(RemoteError::Failed(why)) => {
                    assert!(
                        why.contains("after 2 attempt(s)") && why.contains("500"),
                        "{why}"
                    )
                }
                other => panic!("{:?}", other.map(|r| r.status())),
            }
        }
        assert_eq!(count.load(Ordering::SeqCst), 2 * BREAKER_FAILURES as usize);
        assert!(remote.circuit_open());
        assert!(matches!(post(&remote), Err(RemoteError::Open)));
        assert_eq!(count.load(Ordering::SeqCst), 2 * BREAKER_FAILURES as usize);
    }

    #[test]
    fn an_answer_that_never_comes_times_out_each_attempt() {
        let (url, count) = service(&[0]);
        let remote = Remote::new(&url, Duration::from_millis(300), 1).unwrap();
        let started = Instant::now();
        match post(&remote) {
            Err(RemoteError::Failed(why)) => assert!(why.contains("timed out"), "{why}"),
            other => panic!("{:?}", other.map(|r| r.status())),
        }
        assert_eq!(count.load(Ordering::SeqCst), 2);
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn an_unreachable_service_fails_with_its_cause_and_a_cancelled_request_is_not_sent() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let remote = Remote::new(
            &format!("http://127.0.0.1:{port}/v1"),
            Duration::from_secs(2),
            0,
        )
        .unwrap();
        match post(&remote) {
            Err(RemoteError::Failed(why)) => assert!(why.contains("refused"), "{why}"),
            other => panic!("{:?}", other.map(|r| r.status())),
        }
        let (url, count) = service(&[200]);
        let remote = Remote::new(&url, Duration::from_secs(2), 2).unwrap();
        let url = remote.endpoint("audio/speech");
        assert!(matches!(
            remote.send(|c| c.post(&url), || true),
            Err(RemoteError::Cancelled)
        ));
        assert_eq!(count.load(Ordering::SeqCst), 0);
        assert!(Remote::new("localhost:8880", Duration::from_secs(1), 0).is_err());
    }

    #[test]
    fn the_backend_chooses_the_service_or_the_model() {
        let with = |backend, url: &str| Settings {
            backend,
            url: url.into(),
            ..Settings::default()
        };
        let service = "http://127.0.0.1:11435";
        assert!(!with(Backend::Auto, "").is_remote());
        assert!(!with(Backend::Auto, "local").is_remote());
        assert!(with(Backend::Auto, service).is_remote());
        assert!(!with(Backend::Local, service).is_remote());
        assert!(with(Backend::Local, service).remote().unwrap().is_none());
        assert!(with(Backend::Remote, service).remote().unwrap().is_some());
        let err = with(Backend::Remote, "").remote().err().unwrap();
        assert!(err.contains("url="), "{err}");
    }
}
