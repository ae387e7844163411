//! `llmchat` (openai backend) against a local HTTP server that misbehaves on purpose — a test
//! double, because a real server cannot be made to fail in these exact ways on demand: HTTP
//! errors, a stream that stalls, malformed events, a first token that never comes, a refused
//! connection. Each fault gives a warning naming the cause and the fallback sentence, and the
//! element keeps working; repeated faults open the circuit breaker. The happy path and
//! cancellation are checked here too (and against a real llama-server in tests/llm_server.rs).

mod common;

use common::{Chat, start_error};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The misbehaving server. The first path segment picks the behaviour.
struct FakeServer {
    port: u16,
    requests: Arc<Mutex<HashMap<String, usize>>>,
    /// The body of the last request of each behaviour.
    bodies: Arc<Mutex<HashMap<String, String>>>,
}

fn sse(chunks: &[&str]) -> String {
    let mut body = String::new();
    for c in chunks {
        let event = serde_json::json!({"choices": [{"index": 0, "delta": {"content": c}}]});
        body.push_str(&format!("data: {event}\n\n"));
    }
    body.push_str("data: [DONE]\n\n");
    body
}

fn serve(
    mut stream: TcpStream,
    requests: Arc<Mutex<HashMap<String, usize>>>,
    bodies: Arc<Mutex<HashMap<String, String>>>,
) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut length = 0;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    let _ = reader.read_exact(&mut body);
    let mode = path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    bodies
        .lock()
        .unwrap()
        .insert(mode.clone(), String::from_utf8_lossy(&body).into_owned());
    let n = {
        let mut r = requests.lock().unwrap();
        let c = r.entry(mode.clone()).or_insert(0);
        *c += 1;
        *c
    };
    let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
    let reply = sse(&[
        "The capital",
        " of France is Paris.",
        " It is a lovely",
        " city.",
    ]);
    let _ = match mode.as_str() {
        "ok" => write!(stream, "{head}{reply}"),
        "flaky" if n == 1 => write!(
            stream,
            "HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\nconnection: close\r\n\r\nbusy"
        ),
        "flaky" => write!(stream, "{head}{reply}"),
        "500" => write!(
            stream,
            "HTTP/1.1 500 Internal Server Error\r\ncontent-length: 5\r\nconnection: close\r\n\r\noops!"
        ),
        "404" => write!(
            stream,
            "HTTP/1.1 404 Not Found\r\ncontent-length: 9\r\nconnection: close\r\n\r\nno model!"
        ),
        "malformed" => write!(
            stream,
            "{head}data: {{\"choices\": [{{\"delta\": \n\ndata: [DONE]\n\n"
        ),
        "stall" => {
            let first = sse(&["Well,"]);
            let first = first.trim_end_matches("data: [DONE]\n\n");
            let _ = write!(stream, "{head}{first}");
            let _ = stream.flush();
            std::thread::sleep(Duration::from_secs(30));
            Ok(())
        }
        "silent" => {
            std::thread::sleep(Duration::from_secs(30));
            Ok(())
        }
        "slow" => {
            let _ = write!(stream, "{head}");
            for i in 0..100 {
                let piece = sse(&[&format!(" Word{i}.")]);
                let piece = piece.trim_end_matches("data: [DONE]\n\n");
                if write!(stream, "{piece}")
                    .and_then(|_| stream.flush())
                    .is_err()
                {
                    requests.lock().unwrap().insert("slow-closed".into(), i);
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        }
        _ => write!(
            stream,
            "HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"
        ),
    };
    let _ = stream.flush();
}

impl FakeServer {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(HashMap::new()));
        let bodies = Arc::new(Mutex::new(HashMap::new()));
        let (r, b) = (requests.clone(), bodies.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, b) = (r.clone(), b.clone());
                std::thread::spawn(move || serve(stream, r, b));
            }
        });
        Self {
            port,
            requests,
            bodies,
        }
    }

    /// The conversation the last request of `mode` sent: (role, content) pairs.
    fn messages(&self, mode: &str) -> Vec<(String, String)> {
        let body = self
            .bodies
            .lock()
            .unwrap()
            .get(mode)
            .cloned()
            .unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        json["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| {
                (
                    m["role"].as_str().unwrap_or("").to_string(),
                    m["content"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect()
    }

    fn url(&self, mode: &str) -> String {
        format!("http://127.0.0.1:{}/{mode}/v1", self.port)
    }

    fn count(&self, mode: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .get(mode)
            .copied()
            .unwrap_or(0)
    }
}

const FALLBACK: &str = "Sorry, I can't answer right now.";

#[test]
fn streams_the_reply_sentence_by_sentence() {
    let server = FakeServer::start();
    let mut chat = Chat::new(&format!(
        "first-token-timeout-ms=700 timeout-ms=3000 url={}",
        server.url("ok")
    ));
    chat.say("What is the capital of France?");
    let t = chat.turn();
    let (sentences, turn, warnings) = (t.sentences, t.message, t.warnings);
    assert_eq!(
        sentences,
        ["The capital of France is Paris.", "It is a lovely city."]
    );
    assert_eq!(turn.get::<&str>("outcome").unwrap(), "ok");
    assert_eq!(turn.get::<&str>("backend").unwrap(), "openai");
    assert_eq!(turn.get::<u64>("tokens-out").unwrap(), 4);
    assert!(turn.get::<u64>("time-to-first-token").unwrap() > 0);
    assert!(warnings.is_empty(), "{warnings:?}");
}

/// Each fault: a warning naming the cause, the fallback spoken, and the element still answers.
fn fault(mode: &str, cause: &str) {
    let server = FakeServer::start();
    let mut chat = Chat::new(&format!(
        "first-token-timeout-ms=700 timeout-ms=3000 url={}",
        server.url(mode)
    ));
    for _ in 0..2 {
        chat.say("Hello?");
        let t = chat.turn();
        let (sentences, turn, warnings) = (t.sentences, t.message, t.warnings);
        assert_eq!(sentences, [FALLBACK], "{mode}");
        assert_eq!(turn.get::<&str>("outcome").unwrap(), "fallback");
        assert!(
            warnings.iter().any(|w| w.to_lowercase().contains(cause)),
            "{mode}: no warning mentioning {cause:?}: {warnings:?}"
        );
    }
    // Both turns reached the server: the next turn retries.
    if mode != "refused" {
        assert_eq!(server.count(mode), 2, "{mode}");
    }
}

#[test]
fn http_500_speaks_the_fallback() {
    fault("500", "http 500");
}

#[test]
fn http_404_speaks_the_fallback() {
    fault("404", "http 404");
}

#[test]
fn malformed_events_speak_the_fallback() {
    fault("malformed", "malformed");
}

#[test]
fn a_stalled_stream_speaks_the_fallback() {
    fault("stall", "stalled");
}

#[test]
fn a_first_token_that_never_comes_speaks_the_fallback() {
    fault("silent", "first token");
}

#[test]
fn connection_refused_speaks_the_fallback() {
    // A port with nothing listening.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut chat = Chat::new(&format!(
        "first-token-timeout-ms=700 timeout-ms=3000 url=http://127.0.0.1:{port}/v1"
    ));
    chat.say("Hello?");
    let t = chat.turn();
    let (sentences, warnings) = (t.sentences, t.warnings);
    assert_eq!(sentences, [FALLBACK]);
    assert!(
        warnings.iter().any(|w| w.contains("refused")),
        "{warnings:?}"
    );
}

#[test]
fn the_next_turn_retries_after_a_fault() {
    let server = FakeServer::start();
    let mut chat = Chat::new(&format!(
        "first-token-timeout-ms=700 timeout-ms=3000 url={}",
        server.url("flaky")
    ));
    chat.say("Hello?");
    assert_eq!(chat.turn().sentences, [FALLBACK]);
    chat.say("Hello again?");
    let t = chat.turn();
    let (sentences, turn) = (t.sentences, t.message);
    assert_eq!(sentences.len(), 2, "{sentences:?}");
    assert_eq!(turn.get::<&str>("outcome").unwrap(), "ok");
}

#[test]
fn repeated_faults_open_the_circuit_breaker() {
    let server = FakeServer::start();
    let mut chat = Chat::new(&format!(
        "first-token-timeout-ms=700 timeout-ms=3000 url={} breaker-failures=2 breaker-backoff-ms=60000",
        server.url("500")
    ));
    for _ in 0..4 {
        chat.say("Hello?");
        assert_eq!(chat.turn().sentences, [FALLBACK]);
    }
    // Two requests opened the breaker; the next turns were answered without calling it.
    assert_eq!(server.count("500"), 2);
}

#[test]
fn flush_cancels_the_generation_in_flight() {
    let server = FakeServer::start();
    let mut chat = Chat::new(&format!(
        "first-token-timeout-ms=700 timeout-ms=3000 url={} timeout-ms=30000",
        server.url("slow")
    ));
    chat.say("Count slowly.");
    // Wait for the first sentence, then flush (barge-in).
    let first = chat.h.pull().unwrap();
    assert_eq!(&*first.map_readable().unwrap(), b"Word0.");
    chat.flush();
    let turn = chat.turn().message;
    assert_eq!(turn.get::<&str>("outcome").unwrap(), "cancelled");
    // The server saw the connection closed long before its 100 words.
    std::thread::sleep(Duration::from_millis(300));
    let closed_at = server.count("slow-closed");
    assert!(
        (1..20).contains(&closed_at),
        "closed after {closed_at} words"
    );
}

/// A barge-in after the reply's text was all out (a small model writes it long before it is
/// spoken): the flush drops the speech not heard, and the next turn's request tells the model
/// its reply was cut off; a reply heard whole is not marked.
#[test]
fn a_reply_interrupted_while_spoken_is_kept_as_cut_off() {
    let server = FakeServer::start();
    let mut chat = Chat::new(&format!("url={}", server.url("ok")));
    let answer = |chat: &mut Chat, q: &str| {
        chat.say(q);
        let t = chat.turn();
        assert_eq!(t.message.get::<&str>("outcome").unwrap(), "ok");
    };
    answer(&mut chat, "What is the capital of France?");
    answer(&mut chat, "And of Italy?");
    chat.flush();
    answer(&mut chat, "Sorry, what?");
    let messages = server.messages("ok");
    let replies: Vec<&str> = messages
        .iter()
        .filter(|(role, _)| role == "assistant")
        .map(|(_, text)| text.as_str())
        .collect();
    assert_eq!(
        replies,
        [
            "The capital of France is Paris. It is a lovely city.",
            "The capital of France is Paris. It is a lovely city. [interrupted]",
        ],
        "{messages:?}"
    );
}

#[test]
fn interim_transcripts_are_ignored() {
    let server = FakeServer::start();
    let mut chat = Chat::new(&format!(
        "first-token-timeout-ms=700 timeout-ms=3000 url={}",
        server.url("ok")
    ));
    let interim = vox_common::events::Transcript {
        text: "What is".into(),
        partial: true,
        ..Default::default()
    };
    chat.h.push_event(interim.to_event());
    chat.say("What is");
    chat.say("What is the capital of France?");
    let sentences = chat.turn().sentences;
    assert_eq!(sentences.len(), 2);
    assert_eq!(server.count("ok"), 1);
}

#[test]
fn a_missing_url_for_the_openai_backend_fails_at_start() {
    let err = start_error("backend=openai");
    assert!(err.contains("url"), "{err}");
}
