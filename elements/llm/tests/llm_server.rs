//! `llmchat backend=openai` against a real llama.cpp `llama-server` (built by scripts/llama-server
//! from the PyPI source package, started here on 127.0.0.1) serving SmolLM2-135M: streaming,
//! sentence splitting, history across turns, cancellation. And the embedded backend on the same
//! model, in-process.

mod common;

use common::{Chat, start_error};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// One model computing at a time: on 2 cores, llama.cpp's spinning threads in several processes
/// at once slow each other down so much that first-token timeouts fire. Each test holds this.
fn exclusive() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn model() -> std::path::PathBuf {
    vox_common::models::resolve("smollm2-135m", vox_common::models::ModelKind::Llm)
        .expect("SmolLM2: run scripts/setup")
}

struct Server {
    child: Child,
    port: u16,
}

impl Server {
    fn start() -> Self {
        let bin = std::env::var_os("VOX_LLAMA_SERVER")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| dirs_home().join(".cache/vox/llama-server/bin/llama-server"));
        assert!(
            bin.is_file(),
            "llama-server missing at {}: run scripts/llama-server (scripts/test does)",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .arg("-m")
            .arg(model())
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["-t", "2", "-c", "4096", "--no-webui"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start llama-server");
        let server = Self { child, port };
        // Ready when /health answers 200 (it answers 503 while loading).
        for _ in 0..600 {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
                use std::io::{Read, Write};
                let _ = write!(s, "GET /health HTTP/1.0\r\n\r\n");
                let mut reply = String::new();
                let _ = s.read_to_string(&mut reply);
                if reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200") {
                    return server;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("llama-server did not become ready in 60 s");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn dirs_home() -> std::path::PathBuf {
    std::path::PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
}

/// Asks for the capital of France; returns the turn's `vox-llm-turn` message.
fn check_answers_paris(chat: &mut Chat, backend: &str) -> gst::Structure {
    chat.say("What is the capital of France?");
    let t = chat.turn();
    let (turn, sentences) = (t.message, t.sentences);
    assert_eq!(turn.get::<&str>("outcome").unwrap(), "ok", "{turn}");
    assert_eq!(turn.get::<&str>("backend").unwrap(), backend);
    assert!(!sentences.is_empty());
    // Each buffer is one sentence: ends with its mark (the last may end without one).
    for s in &sentences[..sentences.len() - 1] {
        assert!(
            s.ends_with(['.', '!', '?', '…', '"', ')', ':']) || s.ends_with('\n'),
            "{s:?}"
        );
    }
    let reply = sentences.join(" ");
    assert!(reply.contains("Paris"), "{reply}");
    assert_eq!(turn.get::<&str>("reply").unwrap(), reply);
    assert!(turn.get::<u64>("tokens-in").unwrap() > 10);
    assert!(turn.get::<u64>("tokens-out").unwrap() >= 3);
    turn
}

#[test]
fn openai_backend_streams_sentences_from_llama_server_and_keeps_history() {
    let _one = exclusive();
    let server = Server::start();
    let mut chat = Chat::new(&format!("temperature=0 url={} history=4", server.url()));
    check_answers_paris(&mut chat, "openai");
    // History: the second turn's prompt holds the first exchange.
    chat.say("Repeat the name of that city.");
    let turn = chat.turn();
    assert_eq!(turn.outcome(), "ok", "warnings: {:?}", turn.warnings);
    let tokens_in = turn.message.get::<u64>("tokens-in").unwrap();
    assert!(
        tokens_in > 40,
        "the history was not sent: {tokens_in} tokens in"
    );
    // llama-server keeps the first exchange's prompt evaluated and says so.
    let cached = turn.message.get::<u64>("tokens-cached").unwrap();
    assert!(
        cached > 20 && cached < tokens_in,
        "{cached} of {tokens_in} cached"
    );
    let reply = turn.sentences.join(" ");
    assert!(reply.contains("Paris"), "{reply}");
}

#[test]
fn openai_backend_cancels_on_flush() {
    let _one = exclusive();
    let server = Server::start();
    let mut chat = Chat::new(&format!(
        "temperature=0 url={} max-tokens=400",
        server.url()
    ));
    chat.say("Write a long story about a dragon, with many sentences.");
    let first = chat.h.pull().unwrap();
    assert!(first.size() > 0);
    chat.flush();
    let turn = chat.turn();
    assert_eq!(turn.outcome(), "cancelled", "{:?}", turn.warnings);
    assert!(turn.message.get::<u64>("tokens-out").unwrap_or(0) < 400);
    // And the next turn works.
    check_answers_paris(&mut chat, "openai");
}

#[test]
fn embedded_backend_answers_in_process_and_keeps_history_evaluated() {
    let _one = exclusive();
    // `url=embedded` (what the graphs' `llm=embedded` sets) picks llama.cpp in-process.
    let mut chat = Chat::new("temperature=0 url=embedded history=4");
    let first = check_answers_paris(&mut chat, "embedded");
    // The system prompt was evaluated at start, so the first turn found it cached.
    let first_in = first.get::<u64>("tokens-in").unwrap();
    let first_cached = first.get::<u64>("tokens-cached").unwrap();
    assert!(
        first_cached > 10 && first_cached < first_in,
        "system prompt not evaluated ahead: {first}"
    );
    // The second turn evaluates only what is new: the whole first prompt is kept.
    chat.say("Repeat the name of that city.");
    let turn = chat.turn();
    assert_eq!(turn.outcome(), "ok");
    let tokens_in = turn.message.get::<u64>("tokens-in").unwrap();
    let cached = turn.message.get::<u64>("tokens-cached").unwrap();
    assert!(
        tokens_in > first_in,
        "the history was not sent: {tokens_in}"
    );
    assert!(
        cached >= first_in,
        "{cached} of {tokens_in} cached, first prompt {first_in}"
    );
    let reply = turn.sentences.join(" ");
    assert!(reply.contains("Paris"), "{reply}");
}

#[test]
fn embedded_backend_cancels_on_flush() {
    let _one = exclusive();
    let mut chat = Chat::new("temperature=0 backend=embedded max-tokens=400");
    chat.say("Write a long story about a dragon, with many sentences.");
    let _ = chat.h.pull().unwrap();
    chat.flush();
    assert_eq!(chat.turn().outcome(), "cancelled");
    // The context keeps the cut-off reply; the next turn still answers from a consistent one.
    check_answers_paris(&mut chat, "embedded");
}

/// Pulls events until a `vox-turn` one.
fn next_mark(chat: &mut Chat) -> vox_common::events::TurnMark {
    loop {
        let ev = chat.h.pull_event().expect("a vox-turn event");
        if let Some(mark) = vox_common::events::TurnMark::from_event(&ev) {
            return mark;
        }
    }
}

#[test]
fn a_reply_ahead_is_made_at_once_and_kept_only_when_its_turn_is_confirmed() {
    use vox_common::events::{TurnMark, TurnState};
    let _one = exclusive();
    let mut chat = Chat::new("temperature=0 backend=embedded history=4");
    let mark = |state, id| TurnMark { state, id }.to_event();
    // Withdrawn (the caller spoke on): the turn ends as such, and is not in the history.
    chat.h.push_event(mark(TurnState::Tentative, 1));
    chat.say("What is the capital of Japan?");
    chat.h.push_event(mark(TurnState::Withdrawn, 1));
    let withdrawn = chat.turn();
    assert_eq!(withdrawn.outcome(), "withdrawn", "{}", withdrawn.message);
    // Confirmed: the reply is made before the confirmation, marked as ahead for downstream.
    chat.h.push_event(mark(TurnState::Tentative, 2));
    chat.say("What is the capital of France?");
    let first = chat
        .h
        .pull()
        .expect("a first sentence before the turn is confirmed");
    assert!(first.size() > 0);
    // (Turn 1's marks come first.)
    while next_mark(&mut chat)
        != (TurnMark {
            state: TurnState::Tentative,
            id: 2,
        })
    {}
    chat.h.push_event(mark(TurnState::Confirmed, 2));
    let turn = chat.turn();
    assert_eq!(turn.outcome(), "ok", "{:?}", turn.warnings);
    let reply = String::from_utf8(first.map_readable().unwrap().to_vec()).unwrap()
        + " "
        + &turn.sentences.join(" ");
    assert!(reply.contains("Paris"), "{reply}");
    // Only the confirmed exchange is in the history: the city asked about is Paris.
    chat.say("Repeat the name of that city.");
    let next = chat.turn();
    assert_eq!(next.outcome(), "ok");
    let again = next.sentences.join(" ");
    assert!(
        again.contains("Paris") && !again.contains("Tokyo"),
        "{again}"
    );
    // An ordinary turn is marked final downstream.
    assert_eq!(next_mark(&mut chat).state, TurnState::Confirmed);
    assert_eq!(next_mark(&mut chat).state, TurnState::Final);
}

#[test]
fn embedded_backend_with_a_missing_model_fails_at_start() {
    let err = start_error("backend=embedded model=/nonexistent/m.gguf");
    assert!(err.contains("m.gguf"), "{err}");
}

#[test]
fn embedded_sessions_share_one_cache_and_keep_their_own_conversations() {
    let _one = exclusive();
    // Two llmchat elements in one process: one model, one key/value cache, two conversations.
    let mut a = Chat::new("temperature=0 backend=embedded history=4");
    let mut b = Chat::new("temperature=0 backend=embedded history=4");
    let first_a = check_answers_paris(&mut a, "embedded");
    b.say("What is the capital of Japan?");
    let first_b = b.turn();
    assert!(
        first_b.sentences.join(" ").contains("Tokyo"),
        "{:?}",
        first_b.sentences
    );
    // Each second turn finds its own first exchange still cached, after the other's turn.
    for (chat, first_in, city) in [
        (&mut a, first_a.get::<u64>("tokens-in").unwrap(), "Paris"),
        (
            &mut b,
            first_b.message.get::<u64>("tokens-in").unwrap(),
            "Tokyo",
        ),
    ] {
        chat.say("Repeat the name of that city.");
        let turn = chat.turn();
        let cached = turn.message.get::<u64>("tokens-cached").unwrap();
        assert!(
            cached >= first_in,
            "{cached} cached, first prompt {first_in}"
        );
        let reply = turn.sentences.join(" ");
        assert!(reply.contains(city), "{city}: {reply}");
    }
}

#[test]
fn embedded_cache_gives_the_least_recently_used_conversation_s_place_away() {
    use gstvoxllm::chat::{Message, Role};
    use gstvoxllm::embedded::Embedded;
    use gstvoxllm::openai::Params;
    let _one = exclusive();
    let model = Embedded::load(&model(), 2).unwrap();
    let system = [Message::new(Role::System, "You are a helpful assistant.")];
    let params = Params {
        model: String::new(),
        max_tokens: 4,
        temperature: 0.0,
        timeout: Duration::from_secs(60),
        first_token_timeout: Duration::from_secs(60),
    };
    let ask = |s: &mut gstvoxllm::embedded::Session<'_>| {
        let mut messages = system.to_vec();
        messages.push(Message::new(Role::User, "Hi."));
        s.generate(&messages, &params, &|| false, &mut |_| {})
            .unwrap()
            .tokens_cached
    };
    // More conversations than the cache holds (16): the first one's place goes to the last.
    let mut sessions: Vec<_> = (0..17).map(|_| model.session()).collect();
    for s in sessions.iter_mut() {
        s.prefill(&system).unwrap();
    }
    assert!(ask(&mut sessions[16]) > 0, "the newest lost its place");
    assert!(ask(&mut sessions[1]) > 0, "a recent one lost its place");
    // The oldest starts afresh, in the place of the least recently used (the third).
    assert_eq!(ask(&mut sessions[0]), 0, "the oldest kept its place");
    assert_eq!(
        ask(&mut sessions[2]),
        0,
        "the least recently used kept its place"
    );
    // A session that ends frees its place: the next one takes it without evicting anyone.
    drop(sessions.remove(10));
    let mut late = model.session();
    late.prefill(&system).unwrap();
    assert!(ask(&mut late) > 0);
    for i in [1, 4, 9, 14] {
        assert!(ask(&mut sessions[i]) > 0, "session {i} lost its place");
    }
}
