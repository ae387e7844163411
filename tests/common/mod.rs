//! Helpers shared by the integration tests: fixtures, speech made at test time, WER, and
//! running `vox` isolated from any installed copy of our plugins.
#![allow(dead_code)]

pub mod netns;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The checkout's root (scripts, graphs, k8s), as cargo gives it at run time.
pub fn repo() -> PathBuf {
    vox_common::testing::crate_dir(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/fixtures` beside the checkout.
pub fn fixture(name: &str) -> PathBuf {
    let p = repo().join("../shared/fixtures").join(name);
    assert!(
        p.is_file(),
        "fixture {} is missing: the tests read ../shared/fixtures beside the checkout",
        p.display()
    );
    p
}

pub const JFK_TEXT: &str = "And so, my fellow Americans, ask not what your country can do for \
                            you, ask what you can do for your country.";

/// Lower case, punctuation removed, words separated by single spaces.
pub fn normalize(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '\'' {
                c
            } else {
                ' '
            }
        })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Word error rate of `hyp` against `reference`, after normalisation.
pub fn wer(reference: &str, hyp: &str) -> f64 {
    let r: Vec<String> = normalize(reference).split(' ').map(String::from).collect();
    let h: Vec<String> = normalize(hyp)
        .split(' ')
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect();
    let mut prev: Vec<usize> = (0..=h.len()).collect();
    for (i, rw) in r.iter().enumerate() {
        let mut cur = vec![i + 1; h.len() + 1];
        for (j, hw) in h.iter().enumerate() {
            let sub = prev[j] + usize::from(rw != hw);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[h.len()] as f64 / r.len().max(1) as f64
}

pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

pub fn check(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8 output")
}

/// `sox`/`espeak-ng` are installed by scripts/setup.
pub fn tool(name: &str) -> Command {
    installed(name, "run scripts/setup (it installs espeak-ng and sox)")
}

/// `name` from the PATH; a failure saying how to get it (`how`) when it is not there.
pub fn installed(name: &str, how: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{name} is missing: {how}");
    Command::new(name)
}

/// A program of the venv that scripts/k8s-tools makes (kubernetes-validate, checkov, and a
/// python with PyYAML); `$VOX_K8S_VENV` names another.
pub fn k8s_venv(program: &str) -> Command {
    let dir = std::env::var_os("VOX_K8S_VENV").map_or_else(
        || {
            PathBuf::from(std::env::var_os("HOME").expect("HOME is set"))
                .join(".cache/vox/k8s-venv")
        },
        PathBuf::from,
    );
    let path = dir.join("bin").join(program);
    assert!(
        path.exists(),
        "{} is missing: run scripts/k8s-tools (it installs kubernetes-validate, checkov and PyYAML)",
        path.display()
    );
    Command::new(path)
}

/// Speaks `text` with espeak-ng into a 16 kHz mono s16 WAV file.
pub fn speak(text: &str, out: &Path) {
    let raw = out.with_extension("raw.wav");
    check(
        tool("espeak-ng")
            .args(["-v", "en-us", "-s", "160", "-w"])
            .arg(&raw)
            .arg(text),
    );
    check(
        tool("sox")
            .arg(&raw)
            .args(["-r", "16000", "-c", "1", "-b", "16"])
            .arg(out),
    );
    std::fs::remove_file(raw).ok();
}

/// `text` spoken by our own TTS (`vox speak`) into `dir/name`.
pub fn spoken(dir: &Path, text: &str, name: &str) -> PathBuf {
    let path = dir.join(name);
    check(vox().args(["speak", text, "-o"]).arg(&path));
    path
}

pub fn silence(seconds: f64, out: &Path) {
    check(
        tool("sox")
            .args(["-n", "-r", "16000", "-c", "1", "-b", "16"])
            .arg(out)
            .args(["trim", "0", &seconds.to_string()]),
    );
}

pub fn concat(parts: &[PathBuf], out: &Path) {
    check(tool("sox").args(parts).arg(out));
}

/// Reads a 16-bit mono WAV as f32 samples and its rate.
pub fn read_wav(path: &Path) -> (Vec<f32>, u32) {
    let mut r = hound::WavReader::open(path).expect("readable wav");
    let rate = r.spec().sample_rate;
    let s = r
        .samples::<i16>()
        .map(|s| f32::from(s.expect("sample")) / 32768.0)
        .collect();
    (s, rate)
}

/// Spans of non-silent audio (`|x| > 0.003` within 50 ms windows), in seconds: the truth for
/// speech made by espeak-ng, whose pauses are digital silence.
pub fn energy_spans(samples: &[f32], rate: u32, min_gap: f64) -> Vec<(f64, f64)> {
    let mut spans: Vec<(f64, f64)> = Vec::new();
    let mut last_loud: Option<usize> = None;
    let mut start = 0;
    for (i, x) in samples.iter().enumerate() {
        if x.abs() > 0.003 {
            match last_loud {
                Some(l) if (i - l) as f64 / f64::from(rate) < min_gap => {}
                Some(l) => {
                    spans.push((start as f64 / f64::from(rate), l as f64 / f64::from(rate)));
                    start = i;
                }
                None => start = i,
            }
            last_loud = Some(i);
        }
    }
    if let Some(l) = last_loud {
        spans.push((start as f64 / f64::from(rate), l as f64 / f64::from(rate)));
    }
    spans
}

/// The sentences of the multi-utterance test file (no numbers, so WER needs no number words).
pub const SENTENCES: &[&str] = &[
    "The weather today is sunny and warm.",
    "Please turn off the lights in the kitchen.",
    "What time does the train leave tomorrow morning?",
    "My favorite color is blue.",
    "Send a message to my brother about dinner.",
    "How many people live in this city?",
];

/// Makes the multi-utterance file: each sentence followed by `gap` seconds of silence.
pub fn multi_utterance_file(dir: &Path, gap: f64) -> PathBuf {
    let pause = dir.join("pause.wav");
    silence(gap, &pause);
    let mut parts = Vec::new();
    for (i, s) in SENTENCES.iter().enumerate() {
        let p = dir.join(format!("s{i}.wav"));
        speak(s, &p);
        parts.push(p);
        parts.push(pause.clone());
    }
    let out = dir.join("multi.wav");
    concat(&parts, &out);
    out
}

/// `vox`, as built by cargo, isolated from installed plugin copies: a private registry and
/// only the system plugin directory, so the plugins it loads are the ones beside it.
pub fn vox() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vox"));
    isolate(&mut c);
    c
}

pub fn isolate(c: &mut Command) {
    let registry =
        std::env::temp_dir().join(format!("vox-test-registry-{}.bin", std::process::id()));
    c.env("GST_REGISTRY_1_0", registry);
    c.env("GST_PLUGIN_SYSTEM_PATH_1_0", system_plugin_dir());
    c.env_remove("GST_PLUGIN_PATH_1_0");
    c.env_remove("GST_PLUGIN_PATH");
    // This checkout's graphs, not those of the source tree `vox` was built in.
    c.env("VOX_GRAPHS", repo().join("graphs"));
}

pub fn system_plugin_dir() -> String {
    let out = Command::new("pkg-config")
        .args(["--variable=pluginsdir", "gstreamer-1.0"])
        .output()
        .expect("pkg-config is installed by scripts/setup");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Asserts the shape of a failure: non-zero exit, exactly one error line naming `needle`, no
/// panic.
pub fn assert_one_line_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got success; stderr: {stderr}"
    );
    assert_ne!(
        out.status.code(),
        Some(101),
        "exit code 101 means a panic: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {stderr}");
    assert!(lines[0].starts_with("vox: error: "), "{stderr}");
    assert!(
        lines[0].to_lowercase().contains(&needle.to_lowercase()),
        "error line does not mention {needle:?}: {stderr}"
    );
}
