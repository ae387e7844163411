//! Offline transcription real-time factor, tiny.en (8-bit), 2 threads, on about a minute of speech with
//! pauses (made here with espeak-ng): ours (`vox transcribe`'s pipeline: silerovad skips the
//! silence, whisperstt transcribes the speech in batched passes with the encoder window sized to
//! the audio) against whisper-rs called
//! directly on the whole file, in the same run. Prints a table; medians of 3 runs after a
//! warm-up. Target: RTF ≤ 0.15 and faster than the direct call.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;
use whisper_rs::{FullParams, SamplingStrategy, WhisperContext, WhisperContextParameters};

const RUNS: usize = 3;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Three passes over the six sentences with 1.2 s pauses: about a minute.
    let once = common::multi_utterance_file(dir.path(), 1.2);
    let input = dir.path().join("minute.wav");
    common::concat(&[once.clone(), once.clone(), once], &input);
    let (samples, rate) = common::read_wav(&input);
    assert_eq!(rate, 16000);
    let seconds = samples.len() as f64 / 16000.0;
    let reference = format!("{0} {0} {0}", common::SENTENCES.join(" "));

    // Ours, in process (plugins from the build directory, model loaded once).
    vox_pipeline::runner::init().expect("GStreamer and our plugins");
    let ours_run = |beam_size: u32, model: &str| {
        let opts = vox_pipeline::transcribe::Options {
            threads: 2,
            beam_size,
            model: model.into(),
            ..Default::default()
        };
        let mut text = String::new();
        let mut times = Vec::new();
        for i in 0..=RUNS {
            let t = Instant::now();
            let doc = vox_pipeline::transcribe::transcribe_file(&input, &opts, |_| {}).unwrap();
            if i > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
            text = doc.text;
        }
        (median(times), text)
    };
    let default = vox_common::models::DEFAULT_WHISPER;
    let (o, ours_text) = ours_run(1, default);
    let (o5, ours5_text) = ours_run(5, default);
    // The lossless f16 conversion of the same weights, for the 8-bit model's cost in accuracy.
    vox_common::models::resolve("tiny.en", vox_common::models::ModelKind::Whisper)
        .expect("the f16 model: vox models fetch tiny.en");
    let (f, f16_text) = ours_run(1, "tiny.en");
    if std::env::var_os("VOX_BENCH_TEXT").is_some() {
        eprintln!("8-bit: {ours_text}\nf16:   {f16_text}");
    }

    // whisper-rs directly on the whole file (30 s windows, as its users call it).
    let model = vox_common::models::resolve(
        vox_common::models::DEFAULT_WHISPER,
        vox_common::models::ModelKind::Whisper,
    )
    .expect("run scripts/setup");
    let ctx = WhisperContext::new_with_params(&model, WhisperContextParameters::default()).unwrap();
    let mut state = ctx.create_state().unwrap();
    let mut direct = Vec::new();
    let mut direct_text = String::new();
    for i in 0..=RUNS {
        let mut p = FullParams::new(SamplingStrategy::Greedy { best_of: 1 });
        p.set_n_threads(2);
        // Greedy, as in our greedy row.
        p.set_language(Some("en"));
        p.set_print_progress(false);
        p.set_print_realtime(false);
        p.set_print_special(false);
        let t = Instant::now();
        state.full(p, &samples).unwrap();
        if i > 0 {
            direct.push(t.elapsed().as_secs_f64());
        }
        direct_text = state
            .as_iter()
            .map(|s| s.to_str_lossy().unwrap().to_string())
            .collect::<Vec<_>>()
            .join(" ");
    }
    let d = median(direct);
    println!(
        "\nOffline transcription, tiny.en 8-bit, 2 threads, {seconds:.1} s of speech with 1.2 s pauses"
    );
    println!("| system | wall (median of {RUNS}) | RTF | WER |");
    println!("|---|---|---|---|");
    println!(
        "| vox transcribe (silerovad + whisperstt, batched), greedy (default) | {o:.2} s | {:.3} | {:.1}% |",
        o / seconds,
        common::wer(&reference, &ours_text) * 100.0
    );
    println!(
        "| vox transcribe, greedy, f16 model (`-m tiny.en`) | {f:.2} s | {:.3} | {:.1}% |",
        f / seconds,
        common::wer(&reference, &f16_text) * 100.0
    );
    println!(
        "| vox transcribe, --beam-size 5 | {o5:.2} s | {:.3} | {:.1}% |",
        o5 / seconds,
        common::wer(&reference, &ours5_text) * 100.0
    );
    println!(
        "| whisper-rs direct, whole file | {d:.2} s | {:.3} | {:.1}% |",
        d / seconds,
        common::wer(&reference, &direct_text) * 100.0
    );
    println!("| speed-up, greedy vs greedy | {:.2}x | | |", d / o);
}
