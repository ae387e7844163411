//! `vox reply` end to end on this machine, no server: a question spoken by our own TTS goes
//! through silerovad → whisperstt → llmchat (llama.cpp in-process) → kokorotts, and the answer
//! audio is speech that transcribes to text mentioning Paris. This run also proves that
//! whisper.cpp (libgstvoxwhisper.so) and llama.cpp (libgstvoxllm.so), which bundle different
//! ggml copies, work in one process.

mod common;

use common::*;
use std::fs;

#[test]
fn answers_a_spoken_question_out_loud() {
    let dir = tempfile::tempdir().unwrap();
    let question = spoken(dir.path(), "What is the capital of France?", "question.wav");
    let answer = dir.path().join("answer.wav");
    let out = check(vox().arg("reply").arg(&question).arg("-o").arg(&answer));
    let you = out.lines().find(|l| l.starts_with("you:")).unwrap_or("");
    assert!(normalize(you).contains("capital of france"), "{out}");
    let reply = out.lines().find(|l| l.starts_with("reply:")).unwrap_or("");
    assert!(reply.contains("Paris"), "{out}");
    for stage in [
        "end of speech (VAD)",
        "transcript ready",
        "first token",
        "first sentence",
        "first audio",
    ] {
        let row = out.lines().find(|l| l.contains(stage)).unwrap_or("");
        assert!(row.contains(" ms"), "no time for {stage}: {out}");
    }
    assert!(out.contains("voice to voice: "), "{out}");
    let heard = normalize(&check(vox().arg("transcribe").arg(&answer)));
    assert!(heard.contains("paris"), "answer audio says: {heard}");
}

#[test]
fn a_question_without_speech_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = dir.path().join("quiet.wav");
    silence(2.0, &quiet);
    let answer = dir.path().join("answer.wav");
    let res = run(vox().arg("reply").arg(&quiet).arg("-o").arg(&answer));
    assert_one_line_error(&res, "no speech");
    assert!(!answer.exists());
    assert_eq!(
        fs::read_dir(dir.path()).unwrap().count(),
        1,
        "stray files left"
    );
}

/// An unreachable LLM server is a backend fault, not a failure: the answer is the fallback.
#[test]
fn an_unreachable_llm_url_speaks_the_fallback() {
    let dir = tempfile::tempdir().unwrap();
    let question = dir.path().join("question.wav");
    check(vox().args(["speak", "Hello there.", "-o"]).arg(&question));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let answer = dir.path().join("answer.wav");
    let res = run(vox()
        .arg("reply")
        .arg(&question)
        .args(["--llm", &format!("http://127.0.0.1:{port}/v1")])
        .arg("-o")
        .arg(&answer));
    let out = String::from_utf8_lossy(&res.stdout);
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert!(
        out.contains("reply: Sorry, I can't answer right now."),
        "{out}"
    );
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(
        stderr.contains("refused"),
        "no warning naming the cause: {stderr}"
    );
    assert!(answer.exists());
}
