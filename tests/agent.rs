//! The live agent over real WebRTC: `vox agent --transport webrtc` (with its signalling server
//! in-process) and `vox call` as the human, both inside a network namespace (libnice ignores
//! loopback; see tests/common/netns.rs). Real models, real webrtcbin, real Opus.

mod common;

use common::netns::{Agent, Netns, rss_kib};
use common::*;
use std::path::Path;
use std::time::Duration;

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
    // The endpoints: alive, ready, and the turn in the metrics.
    let port = agent.http_port;
    assert_eq!(ns.http_get(port, "/healthz").0, 200);
    assert_eq!(ns.http_get(port, "/readyz").0, 200);
    assert_eq!(ns.metric(port, "vox_sessions_total"), Some(1.0));
    assert!(ns.metric(port, "vox_turns_total").unwrap_or(0.0) >= 1.0);
    for histogram in [
        "vox_transcript_seconds_count",
        "vox_first_token_seconds_count",
        "vox_first_audio_seconds_count",
        "vox_voice_to_voice_seconds_count",
    ] {
        assert!(
            ns.metric(port, histogram).unwrap_or(0.0) >= 1.0,
            "{histogram}: {}",
            ns.http_get(port, "/metrics").1
        );
    }
    // The caller hung up: its session ends.
    let active = ns.wait_metric(port, "vox_sessions_active", Duration::from_secs(15), |v| {
        v == 0.0
    });
    assert_eq!(active, Some(0.0), "{}", agent.drain_log());
}

/// `vox call ARGS` inside `ns`, returning its output (not checked).
fn call(ns: &Netns, url: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    let mut c = ns.command(env!("CARGO_BIN_EXE_vox"));
    isolate(&mut c);
    c.args(["call", "--webrtc", url]).args(args);
    run(&mut c)
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

#[test]
fn barge_in_stops_the_agent_and_the_next_question_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let story = question(
        dir.path(),
        "Tell me a long story about a brave dragon and a little girl.",
        "story.wav",
    );
    let q = question(dir.path(), "What is the capital of France?", "q.wav");
    let ns = Netns::new();
    // Whole sentences, so the agent is in the middle of a long one when it is interrupted.
    let mut agent = Agent::start(&ns, 8444, &["max-tokens=300", "first-clause=false"]);
    let record = dir.path().join("call.wav");
    let out = call(
        &ns,
        &agent.url,
        &[
            os("--play"),
            story.as_os_str(),
            os("--interrupt-after"),
            os("0.3"),
            q.as_os_str(),
            os("--record"),
            record.as_os_str(),
            os("--timeout-s"),
            os("90"),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = agent.drain_log();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(log.contains("interrupted by the caller"), "{log}");
    // The cut-off reply is recorded as such, and the second question is answered.
    assert!(log.contains("(cancelled)"), "{log}");
    assert!(
        log.contains("heard \"What is the capital of France?\""),
        "{log}"
    );
    // In the recording, the agent's voice stops within 200 ms of the caller's speech.
    let line = stdout
        .lines()
        .find(|l| l.starts_with("interrupted:"))
        .unwrap_or_else(|| panic!("no interruption seen in the recording:\n{stdout}\n{log}"));
    let ms: f64 = line
        .rsplit('(')
        .next()
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(ms <= 200.0, "the agent went on for {ms} ms: {line}");
    let agent_side = dir.path().join("agent.wav");
    channel(&record, 2, &agent_side);
    let heard = normalize(&check(vox().arg("transcribe").arg(&agent_side)));
    assert!(heard.contains("paris"), "the agent said: {heard}");
}

#[test]
fn two_calls_at_once_each_get_their_own_answer() {
    let dir = tempfile::tempdir().unwrap();
    let france = question(dir.path(), "What is the capital of France?", "france.wav");
    let japan = question(dir.path(), "What is the capital of Japan?", "japan.wav");
    let ns = Netns::new();
    let mut agent = Agent::start(&ns, 8445, &["--max-sessions", "2"]);
    let calls: Vec<_> = [("france", &france), ("japan", &japan)]
        .into_iter()
        .map(|(name, q)| {
            let record = dir.path().join(format!("{name}.call.wav"));
            let mut c = ns.command(env!("CARGO_BIN_EXE_vox"));
            isolate(&mut c);
            c.args(["call", "--webrtc", &agent.url, "--play"])
                .arg(q)
                .arg("--record")
                .arg(&record)
                .args(["--timeout-s", "90"]);
            (record, c.spawn().expect("vox call"))
        })
        .collect();
    let mut said = Vec::new();
    for (record, mut child) in calls {
        assert!(child.wait().unwrap().success(), "{}", agent.drain_log());
        let side = record.with_extension("agent.wav");
        channel(&record, 2, &side);
        said.push(normalize(&check(vox().arg("transcribe").arg(&side))));
    }
    let log = agent.drain_log();
    assert!(
        said[0].contains("paris"),
        "France call heard: {:?}\n{log}",
        said[0]
    );
    assert!(
        said[1].contains("tokyo"),
        "Japan call heard: {:?}\n{log}",
        said[1]
    );
    // No cross-talk: each call heard only its own answer.
    assert!(!said[0].contains("tokyo"), "{said:?}");
    assert!(!said[1].contains("paris"), "{said:?}");
}

/// The LLM server is down (nothing listens at its URL): the caller hears the fallback sentence,
/// the agent stays ready, and the error counter says where it failed.
#[test]
fn an_llm_that_is_down_gives_the_fallback_and_the_agent_stays_ready() {
    let dir = tempfile::tempdir().unwrap();
    let q = question(dir.path(), "What is the capital of France?", "q.wav");
    let ns = Netns::new();
    let mut agent = Agent::start(&ns, 8446, &["llm-url=http://127.0.0.1:9/v1"]);
    let record = dir.path().join("call.wav");
    let out = call(
        &ns,
        &agent.url,
        &[
            os("--play"),
            q.as_os_str(),
            os("--record"),
            record.as_os_str(),
            os("--timeout-s"),
            os("60"),
        ],
    );
    let log = agent.drain_log();
    assert!(
        out.status.success(),
        "{}\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent_side = dir.path().join("agent.wav");
    channel(&record, 2, &agent_side);
    let heard = normalize(&check(vox().arg("transcribe").arg(&agent_side)));
    assert!(heard.contains("sorry"), "the agent said: {heard}\n{log}");
    let port = agent.http_port;
    assert_eq!(ns.http_get(port, "/readyz").0, 200);
    assert!(
        ns.metric(port, "vox_errors_total{stage=\"llm\"}")
            .unwrap_or(0.0)
            >= 1.0,
        "{}",
        ns.http_get(port, "/metrics").1
    );
}

/// A caller that vanishes mid-reply (killed): its session is cleaned up, the next caller is
/// served, and the agent's memory comes back to where it was after the first call.
#[test]
fn a_caller_that_vanishes_is_cleaned_up_and_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let q = question(dir.path(), "What is the capital of France?", "q.wav");
    let story = question(
        dir.path(),
        "Tell me a long story about a dragon.",
        "story.wav",
    );
    let ns = Netns::new();
    let mut agent = Agent::start(&ns, 8447, &["max-tokens=300"]);
    let port = agent.http_port;
    let url = agent.url.clone();
    let place = |name: &str, q: &Path| -> std::process::Child {
        let mut c = ns.command(env!("CARGO_BIN_EXE_vox"));
        isolate(&mut c);
        c.args(["call", "--webrtc", &url, "--play"])
            .arg(q)
            .arg("--record")
            .arg(dir.path().join(name))
            .args(["--timeout-s", "60"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c.spawn().expect("vox call")
    };
    // A first call, whole, warms everything up: the baseline.
    assert!(place("first.wav", &q).wait().unwrap().success());
    ns.wait_metric(port, "vox_sessions_active", Duration::from_secs(15), |v| {
        v == 0.0
    });
    let baseline = rss_kib(agent.child.id());
    // The vanishing caller: killed while the agent answers.
    let mut gone = place("gone.wav", &story);
    agent
        .wait_for("heard \"Tell me a long story", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("{}", agent.drain_log()));
    std::thread::sleep(Duration::from_secs(2));
    gone.kill().unwrap();
    gone.wait().unwrap();
    let active = ns.wait_metric(port, "vox_sessions_active", Duration::from_secs(20), |v| {
        v == 0.0
    });
    assert_eq!(active, Some(0.0), "{}", agent.drain_log());
    // Others go on.
    let record = dir.path().join("after.wav");
    assert!(place("after.wav", &q).wait().unwrap().success());
    let agent_side = dir.path().join("agent.wav");
    channel(&record, 2, &agent_side);
    let heard = normalize(&check(vox().arg("transcribe").arg(&agent_side)));
    assert!(heard.contains("paris"), "the agent said: {heard}");
    ns.wait_metric(port, "vox_sessions_active", Duration::from_secs(15), |v| {
        v == 0.0
    });
    let after = rss_kib(agent.child.id());
    assert!(
        after < baseline + 30 * 1024,
        "memory grew from {baseline} KiB to {after} KiB over two more calls"
    );
    assert_eq!(ns.metric(port, "vox_sessions_failed_total"), Some(0.0));
}
