//! Streaming `/v1/chat/completions` client (no GStreamer types): one client for Ollama,
//! llama.cpp's `llama-server`, vLLM and hosted OpenAI-compatible APIs. HTTP by reqwest, the
//! server-sent events parsed by eventsource-stream.

use crate::chat::{Message, Usage};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LlmError {
    #[error("cannot connect to {url}: {why}")]
    Connect { url: String, why: String },
    #[error("{url} answered HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("no first token within {0:?}")]
    FirstToken(Duration),
    #[error("the stream stalled: nothing for {0:?}")]
    Stalled(Duration),
    #[error("no complete reply within {0:?}")]
    Timeout(Duration),
    #[error("malformed event from the server: {0}")]
    Malformed(String),
    #[error("the stream ended without a reply")]
    Empty,
    #[error("{0}")]
    Backend(String),
    #[error("cancelled")]
    Cancelled,
}

/// Limits and sampling of one generation.
#[derive(Debug, Clone)]
pub struct Params {
    pub model: String,
    pub max_tokens: u32,
    pub temperature: f32,
    /// The whole reply must be done within this.
    pub timeout: Duration,
    /// The first token must come within this, and no later gap may be longer.
    pub first_token_timeout: Duration,
}

pub struct OpenAi {
    client: reqwest_async::Client,
    endpoint: String,
    api_key: Option<String>,
}

impl std::fmt::Debug for OpenAi {
    // The key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenAi")
            .field("endpoint", &self.endpoint)
            .field("api_key", &self.api_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl OpenAi {
    /// `base_url` as users write it: `http://ollama:11434/v1` (or without `/v1`).
    pub fn new(base_url: &str, api_key: Option<String>) -> Result<Self, LlmError> {
        let base = base_url.trim_end_matches('/');
        let endpoint = if base.ends_with("/chat/completions") {
            base.to_string()
        } else if base.ends_with("/v1") {
            format!("{base}/chat/completions")
        } else {
            format!("{base}/v1/chat/completions")
        };
        let client = reqwest_async::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // Below the 5 s after which llama-server closes an idle connection, so that
            // we rarely send on one it is closing.
            .pool_idle_timeout(Duration::from_secs(4))
            .build()
            .map_err(|e| LlmError::Backend(e.to_string()))?;
        Ok(Self {
            client,
            endpoint,
            api_key,
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Streams a reply, calling `on_delta` with each piece of text as it arrives.
    pub async fn stream(
        &self,
        messages: &[Message],
        params: &Params,
        mut on_delta: impl FnMut(&str),
    ) -> Result<Usage, LlmError> {
        let started = Instant::now();
        let body = serde_json::json!({
            "model": params.model,
            "messages": messages,
            "stream": true,
            "stream_options": {"include_usage": true},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
        });
        let deadline = started + params.timeout;
        let send = async {
            // A kept-alive connection the server closes just as the request goes out fails
            // with "connection closed before message completed" although the server never
            // saw the request (llama-server closes idle connections after 5 s). Such a
            // failure, before any answer, is tried once more on a fresh connection.
            let mut retried = false;
            loop {
                let mut request = self.client.post(&self.endpoint).json(&body);
                if let Some(key) = &self.api_key {
                    request = request.bearer_auth(key);
                }
                match request.send().await {
                    Err(e) if !retried && (e.is_request() || e.is_connect()) => retried = true,
                    result => break result,
                }
            }
        };
        let response = tokio::time::timeout(params.first_token_timeout, send)
            .await
            .map_err(|_| LlmError::FirstToken(params.first_token_timeout))?
            .map_err(|e| LlmError::Connect {
                url: self.endpoint.clone(),
                why: root_cause(&e),
            })?;
        let status = response.status();
        if !status.is_success() {
            let body = tokio::time::timeout(Duration::from_secs(2), response.text())
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or_default();
            return Err(LlmError::Status {
                url: self.endpoint.clone(),
                status: status.as_u16(),
                body: body
                    .chars()
                    .take(200)
                    .collect::<String>()
                    .trim()
                    .to_string(),
            });
        }
        let mut events = response.bytes_stream().eventsource();
        let mut usage = Usage::default();
        let mut deltas = 0u64;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(LlmError::Timeout(params.timeout));
            }
            let wait = params.first_token_timeout.min(deadline - now);
            let next = match tokio::time::timeout(wait, events.next()).await {
                Ok(next) => next,
                Err(_) if Instant::now() >= deadline => {
                    return Err(LlmError::Timeout(params.timeout));
                }
                Err(_) if usage.first_token.is_none() => {
                    return Err(LlmError::FirstToken(params.first_token_timeout));
                }
                Err(_) => return Err(LlmError::Stalled(wait)),
            };
            let event = match next {
                None => break,
                Some(Ok(event)) => event,
                Some(Err(e)) => return Err(LlmError::Malformed(e.to_string())),
            };
            let data = event.data.trim();
            if data == "[DONE]" {
                break;
            }
            if data.is_empty() {
                continue;
            }
            let chunk: serde_json::Value = serde_json::from_str(data)
                .map_err(|e| LlmError::Malformed(format!("{e}: {}", clip(data))))?;
            if let Some(err) = chunk.get("error") {
                return Err(LlmError::Backend(format!(
                    "the server reported: {}",
                    clip(&err.to_string())
                )));
            }
            if let Some(u) = chunk.get("usage").filter(|u| !u.is_null()) {
                usage.tokens_in = u["prompt_tokens"].as_u64().unwrap_or(usage.tokens_in);
                usage.tokens_out = u["completion_tokens"].as_u64().unwrap_or(usage.tokens_out);
                // llama-server and OpenAI report the prompt tokens they served from their cache.
                usage.tokens_cached = u["prompt_tokens_details"]["cached_tokens"]
                    .as_u64()
                    .unwrap_or(usage.tokens_cached);
            }
            let Some(choices) = chunk.get("choices").and_then(|c| c.as_array()) else {
                if chunk.get("usage").is_some() {
                    continue;
                }
                return Err(LlmError::Malformed(format!("no choices: {}", clip(data))));
            };
            for choice in choices {
                let delta = choice["delta"]["content"].as_str().unwrap_or("");
                if !delta.is_empty() {
                    usage.first_token.get_or_insert_with(|| started.elapsed());
                    deltas += 1;
                    on_delta(delta);
                }
            }
        }
        if usage.first_token.is_none() {
            return Err(LlmError::Empty);
        }
        if usage.tokens_out == 0 {
            usage.tokens_out = deltas;
        }
        usage.total = started.elapsed();
        Ok(usage)
    }
}

fn clip(s: &str) -> String {
    let mut out: String = s.chars().take(120).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// The innermost cause of an HTTP error ("Connection refused (os error 111)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_from_base_url() {
        let e = |u: &str| OpenAi::new(u, None).unwrap().endpoint().to_string();
        assert_eq!(
            e("http://ollama:11434/v1"),
            "http://ollama:11434/v1/chat/completions"
        );
        assert_eq!(e("http://h:8080/"), "http://h:8080/v1/chat/completions");
        assert_eq!(
            e("http://h/v1/chat/completions"),
            "http://h/v1/chat/completions"
        );
    }

    #[test]
    fn the_key_is_never_printed() {
        let c = OpenAi::new("http://h/v1", Some("sk-secret".into())).unwrap();
        assert!(!format!("{c:?}").contains("sk-secret"));
    }
}
