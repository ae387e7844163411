//! Kokoro real-time factor and time to first audio for a three-sentence reply, 2 threads: ours
//! (kokorotts's core: normalisation, libespeak-ng phonemes, chunking, ONNX Runtime through ort,
//! one sentence after the other as the element streams them) against the Python
//! kokoro-onnx-style pipeline (onnxruntime + libespeak-ng through ctypes, same int8 model, same
//! voice, same thread count; `benches/kokoro_python.py`), run before and after ours in the same
//! run (its two medians averaged). Ours runs four times: with all the graph rewrites (8-bit
//! convolutions as `MatMulInteger`, the Snake and STFT operators: see `rewrite`; kokorotts's
//! default), with float convolutions and the operators, with the float convolutions only, and
//! as it is. Medians of 5 runs after a warm-up. Targets: RTF no worse than Python's; first
//! audio ≤ 40% of the whole reply's synthesis time.

use gstvoxkokoro::engine::Kokoro;
use gstvoxkokoro::phonemes::{self, Vocab};
use gstvoxkokoro::rewrite::Options;
use gstvoxkokoro::voices;
use std::time::Instant;
use vox_common::models::{ModelKind, resolve};

pub const REPLY: &str = "The capital of France is Paris. It is known for the Eiffel Tower, \
                         which was finished in 1889. Millions of people visit it every year.";
const RUNS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let model = resolve("kokoro", ModelKind::Tts).expect("run scripts/setup");
    let vocab_path = resolve("kokoro-vocab", ModelKind::Vocab).unwrap();
    let vocab = Vocab::load(&vocab_path).unwrap();
    let voices_path = resolve("kokoro-voices", ModelKind::Voices).unwrap();
    let voice = voices::load(&voices_path, "jf_alpha").unwrap();

    // The machine's speed drifts: Python runs before and after ours, and its two medians are
    // averaged.
    let python = || {
        let venv = std::env::var("VOX_BENCH_PYTHON").unwrap_or_else(|_| {
            format!(
                "{}/.cache/vox/bench-venv/bin/python",
                std::env::var("HOME").unwrap()
            )
        });
        let out = std::process::Command::new(&venv)
            .arg(
                vox_common::testing::crate_dir(env!("CARGO_MANIFEST_DIR"))
                    .join("benches/kokoro_python.py"),
            )
            .arg(&model)
            .arg(&voices_path)
            .arg(&vocab_path)
            .arg(REPLY)
            .arg(RUNS.to_string())
            .output()
            .expect("the Python anchor: scripts/bench makes its venv");
        let py = String::from_utf8_lossy(&out.stdout);
        let nums: Vec<f64> = py
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(
            nums.len(),
            3,
            "python anchor said: {py}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        nums
    };
    let before = python();

    // Ours with all the rewrites, with the float convolutions only, then as it is.
    let ours = |options: Options| {
        let loading = Instant::now();
        let kokoro = Kokoro::load(&model, 2, options).unwrap();
        let load = loading.elapsed().as_secs_f64();
        let mut first = Vec::new();
        let mut total = Vec::new();
        let mut rtf = Vec::new();
        for run in 0..=RUNS {
            let t = Instant::now();
            let mut first_audio = None;
            let mut samples = 0usize;
            for sentence in vox_common::text::sentences(REPLY) {
                for chunk in phonemes::chunks(&sentence, "en-us", &vocab).unwrap() {
                    let audio = kokoro
                        .synthesise(&chunk.ids, voice.style(chunk.ids.len()), 1.0)
                        .unwrap();
                    samples += audio.len();
                    first_audio.get_or_insert(t.elapsed().as_secs_f64());
                }
            }
            let took = t.elapsed().as_secs_f64();
            if run > 0 {
                first.push(first_audio.unwrap());
                total.push(took);
                rtf.push(took / (samples as f64 / 24000.0));
            }
        }
        [median(first), median(total), median(rtf), load]
    };
    let default = ours(Options::ALL);
    let float = ours(Options {
        int8_convs: false,
        ..Options::ALL
    });
    let convs = ours(Options {
        float_convs: true,
        ..Options::NONE
    });
    let int8 = ours(Options::NONE);
    let after = python();
    let nums: Vec<f64> = before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a + b) / 2.0)
        .collect();

    println!(
        "Kokoro TTS, three-sentence reply, 2 threads (medians of {RUNS} runs; 8-bit \
         convolutions {} on this CPU)",
        if gstvoxkokoro::qconv::exact() {
            "taken"
        } else {
            "not taken: no VNNI, float instead"
        }
    );
    println!("| system | first audio | whole reply | RTF | first audio / whole |");
    println!("|---|---|---|---|---|");
    for (name, [first, total, rtf, load]) in [
        ("graph rewritten (default)", default),
        ("float convolutions and the operators", float),
        ("float convolutions only", convs),
        ("graph as it is", int8),
    ] {
        println!(
            "| vox kokorotts core (ort, libespeak-ng), {name}, sentence by sentence | {first:.3} s | {total:.3} s | {rtf:.3} | {:.0}% |",
            100.0 * first / total
        );
        eprintln!("{name}: model loaded in {load:.2} s");
    }
    println!(
        "| Python onnxruntime + libespeak-ng (kokoro-onnx style), sentence by sentence | {:.3} s | {:.3} s | {:.3} | {:.0}% |",
        nums[0],
        nums[1],
        nums[2],
        100.0 * nums[0] / nums[1]
    );
    println!(
        "ours / Python, whole reply: {:.2}× faster with the graph rewritten, {:.2}× with float \
         convolutions, {:.2}× as it is",
        nums[1] / default[1],
        nums[1] / float[1],
        nums[1] / int8[1]
    );
}
