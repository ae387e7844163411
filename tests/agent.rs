//! The live agent over real WebRTC: `vox agent --transport webrtc` (with its signalling server
//! in-process) and `vox call` as the human, both inside a network namespace (libnice ignores
//! loopback; see tests/common/netns.rs). Real models, real webrtcbin, real Opus.

mod common;

use common::netns::{Agent, Netns};
use common::*;
use std::path::Path;

/// A question spoken by our own TTS.
fn question(dir: &Path, text: &str, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    check(vox().args(["speak", text, "-o"]).arg(&path));
    path
}

/// One channel of a call recording (1: the caller, 2: the agent) as a mono WAV.
fn channel(recording: &Path, n: u32, out: &Path) {
    check(
        tool("sox")
            .arg(recording)
            .arg(out)
            .args(["remix", &n.to_string()]),
    );
}

#[test]
fn answers_a_call_over_webrtc() {
    let dir = tempfile::tempdir().unwrap();
    let q = question(dir.path(), "What is the capital of France?", "q.wav");
    let ns = Netns::new();
    let mut agent = Agent::start(&ns, 8443, &[]);
    let record = dir.path().join("call.wav");
    let mut call = ns.command(env!("CARGO_BIN_EXE_vox"));
    isolate(&mut call);
    let out = check(
        call.args(["call", "--webrtc", &agent.url, "--play"])
            .arg(&q)
            .arg("--record")
            .arg(&record)
            .args(["--timeout-s", "60"]),
    );
    let log = agent.drain_log();
    // The table has one turn, with its voice-to-voice time.
    let turns: Vec<&str> = out.lines().filter(|l| l.starts_with("| 1 |")).collect();
    assert_eq!(turns.len(), 1, "{out}\nagent:\n{log}");
    assert!(turns[0].contains(" ms |"), "{out}");
    // What the agent said (right channel) answers the question.
    let agent_side = dir.path().join("agent.wav");
    channel(&record, 2, &agent_side);
    let heard = normalize(&check(vox().arg("transcribe").arg(&agent_side)));
    assert!(heard.contains("paris"), "the agent said: {heard}\n{log}");
    // And what it heard was the question (left channel is what the caller played).
    assert!(
        log.contains("heard \"What is the capital of France?\""),
        "{log}"
    );
}
