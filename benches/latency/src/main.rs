//! End of speech → final transcript on a live-paced source (`clocksync`, real time), ours
//! (`silerovad ! whisperstt`) against gst-plugins-rs `whispertranscriber` 0.15.2, on the same
//! audio (three ~3 s utterances made with espeak-ng, 8 s apart) and the same ggml tiny.en (8-bit) model,
//! 2 threads each, in one run. Prints a table of medians.
//!
//! Run: `cargo run --release --manifest-path benches/latency/Cargo.toml` (after scripts/setup;
//! our plugins are loaded from `$VOX_PLUGIN_DIR`, default ~/.cache/vox/target/release).

use gst::prelude::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const SENTENCES: &[&str] = &[
    "Please turn off the lights in the kitchen tonight.",
    "What time does the next train leave for the city?",
    "Remind me to call my sister after lunch tomorrow.",
];
const GAP: f64 = 8.0;
const MIN_SILENCE_MS: u32 = 500;

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (run scripts/setup)"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn read(path: &Path) -> Vec<f32> {
    let mut r = hound::WavReader::open(path).unwrap();
    r.samples::<i16>().map(|s| f32::from(s.unwrap()) / 32768.0).collect()
}

/// Builds the test file; returns it with the (start, end) of each utterance in seconds.
fn make_audio(dir: &Path) -> (PathBuf, Vec<(f64, f64)>) {
    let mut parts = Vec::new();
    let mut truth = Vec::new();
    let lead = dir.join("lead.wav");
    sh(Command::new("sox").args(["-n", "-r", "16000", "-c", "1", "-b", "16"]).arg(&lead).args(["trim", "0", "1"]));
    let gap = dir.join("gap.wav");
    sh(Command::new("sox").args(["-n", "-r", "16000", "-c", "1", "-b", "16"]).arg(&gap).args(["trim", "0", &GAP.to_string()]));
    parts.push(lead);
    let mut t = 1.0;
    for (i, s) in SENTENCES.iter().enumerate() {
        let raw = dir.join(format!("raw{i}.wav"));
        let wav = dir.join(format!("s{i}.wav"));
        sh(Command::new("espeak-ng").args(["-v", "en-us", "-s", "150", "-w"]).arg(&raw).arg(s));
        sh(Command::new("sox").arg(&raw).args(["-r", "16000", "-c", "1", "-b", "16"]).arg(&wav));
        let samples = read(&wav);
        let loud: Vec<usize> = samples
            .iter()
            .enumerate()
            .filter(|(_, x)| x.abs() > 0.003)
            .map(|(i, _)| i)
            .collect();
        let (a, b) = (loud[0] as f64 / 16000.0, *loud.last().unwrap() as f64 / 16000.0);
        truth.push((t + a, t + b));
        t += samples.len() as f64 / 16000.0 + GAP;
        parts.push(wav);
        parts.push(gap.clone());
    }
    let out = dir.join("live.wav");
    sh(Command::new("sox").args(&parts).arg(&out));
    (out, truth)
}

/// Runs `stt` on the live-paced file; returns (arrival running time in s, text) per buffer.
fn run(input: &Path, stt: &str) -> Vec<(f64, String)> {
    let description = format!(
        "filesrc location={} ! wavparse ! audioconvert ! audioresample ! \
         audio/x-raw,format=F32LE,rate=16000,channels=1 ! clocksync ! \
         queue max-size-time=5000000000 max-size-buffers=0 max-size-bytes=0 ! {stt} ! \
         appsink name=out sync=false",
        input.display()
    );
    let pipeline = gst::parse::launch(&description)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let sink = pipeline
        .by_name("out")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let mut out = Vec::new();
    loop {
        if let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_mseconds(50)) {
            let now = pipeline.current_running_time().unwrap_or_default();
            let buf = sample.buffer().unwrap();
            let text = String::from_utf8_lossy(&buf.map_readable().unwrap()).to_string();
            out.push((now.nseconds() as f64 / 1e9, text));
        } else if sink.is_eos() {
            break;
        }
        let bus = pipeline.bus().unwrap();
        while let Some(msg) = bus.pop() {
            if let gst::MessageView::Error(e) = msg.view() {
                panic!("{stt}: {} ({:?})", e.error(), e.debug());
            }
        }
    }
    pipeline.set_state(gst::State::Null).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    out
}

/// Latency of each utterance: arrival of the last buffer that belongs to it, minus its end.
fn latencies(outputs: &[(f64, String)], truth: &[(f64, f64)]) -> Vec<f64> {
    truth
        .iter()
        .enumerate()
        .map(|(i, (start, end))| {
            let next = truth.get(i + 1).map(|t| t.0).unwrap_or(f64::MAX);
            let last = outputs
                .iter()
                .filter(|(t, text)| *t > *start && *t < next && is_words(text))
                .map(|(t, _)| *t)
                .fold(f64::NAN, f64::max);
            last - end
        })
        .collect()
}

/// Text that is words, not empty or an annotation such as whisper.cpp's "[BLANK_AUDIO]".
fn is_words(text: &str) -> bool {
    let t = text.trim();
    !t.is_empty() && !(t.starts_with('[') && t.ends_with(']'))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    gst::init().unwrap();
    gstwhisper::plugin_register_static().unwrap();
    let plugin_dir = std::env::var_os("VOX_PLUGIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs_home().join(".cache/vox/target/release"));
    for so in ["libgstvoxvad.so", "libgstvoxwhisper.so"] {
        gst::Plugin::load_file(plugin_dir.join(so))
            .unwrap_or_else(|e| panic!("{so} in {}: {e} (run scripts/setup)", plugin_dir.display()));
    }
    let models = std::env::var_os("VOX_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dirs_home().join(".cache/vox/models"));
    let model = models.join("ggml-tiny.en-q8_0.bin");
    assert!(model.is_file(), "{} missing: run scripts/setup", model.display());

    let dir = tempfile::tempdir().unwrap();
    let (input, truth) = make_audio(dir.path());
    let lengths: Vec<String> = truth.iter().map(|(a, b)| format!("{:.2}", b - a)).collect();

    let ours_stt = format!("silerovad min-silence-ms={MIN_SILENCE_MS} ! whisperstt threads=2");
    let theirs_stt = format!(
        "whispertranscriber model-path={} model-preset=tiny-en n-threads=2 use-gpu=false",
        model.display()
    );
    let ours = run(&input, &ours_stt);
    let theirs = run(&input, &theirs_stt);
    let lo = latencies(&ours, &truth);
    let lt = latencies(&theirs, &truth);
    let text = |o: &[(f64, String)]| o.iter().map(|(_, t)| t.trim()).collect::<Vec<_>>().join(" ");

    println!("\nEnd of speech -> final transcript, live-paced, tiny.en 8-bit, 2 threads; utterances of {} s", lengths.join(", "));
    println!("| system | per utterance (s) | median |");
    println!("|---|---|---|");
    let row = |name: &str, l: &[f64]| {
        let per: Vec<String> = l.iter().map(|x| format!("{x:.2}")).collect();
        println!("| {name} | {} | {:.2} s |", per.join(", "), median(l.to_vec()));
    };
    row(&format!("vox silerovad (min-silence {MIN_SILENCE_MS} ms) + whisperstt"), &lo);
    row("gst-plugins-rs whispertranscriber 0.15.2 (defaults, 2 threads)", &lt);
    println!(
        "| ratio | | {:.2}x |",
        median(lt.clone()) / median(lo.clone())
    );
    println!("\nours:   {}", text(&ours));
    println!("theirs: {}", text(&theirs));
}

fn dirs_home() -> PathBuf {
    PathBuf::from(std::env::var_os("HOME").expect("HOME"))
}
