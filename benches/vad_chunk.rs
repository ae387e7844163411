//! Silero VAD cost per 32 ms chunk (512 samples at 16 kHz) on one thread, through our
//! `SileroVad` core on both engines: native (the default) and ONNX Runtime 1.32 (loaded
//! dynamically). Anchor: Python onnxruntime on this machine, 0.113–0.12 ms per chunk
//! (shared/notes/anchors.md; `scripts/bench` runs it beside this). Target: ≤ 0.1 ms.

use criterion::{Criterion, black_box, criterion_group, criterion_main};
use gstvoxvad::silero::{EngineKind, SileroVad};

fn chunks() -> (Vec<f32>, Vec<f32>) {
    let silence = vec![0.0f32; 512];
    // A voiced-like signal: harmonics of 140 Hz with a little noise.
    let speech = (0..512)
        .map(|i| {
            let t = i as f32 / 16000.0;
            (1..6)
                .map(|h| (2.0 * std::f32::consts::PI * 140.0 * h as f32 * t).sin() / h as f32)
                .sum::<f32>()
                * 0.2
                + ((i * 7919 % 97) as f32 / 97.0 - 0.5) * 0.01
        })
        .collect();
    (silence, speech)
}

fn bench(c: &mut Criterion) {
    let (silence, speech) = chunks();
    for (name, kind) in [
        ("native", EngineKind::Native),
        ("onnxruntime", EngineKind::OnnxRuntime),
    ] {
        let mut vad = SileroVad::load_with("silero-vad", 16000, kind)
            .expect("Silero model and ONNX Runtime: run scripts/setup");
        let mut group = c.benchmark_group(format!("silero_vad_chunk_16k_1thread/{name}"));
        group.bench_function("silence", |b| {
            b.iter(|| vad.process(black_box(&silence)).unwrap())
        });
        group.bench_function("speech", |b| {
            b.iter(|| vad.process(black_box(&speech)).unwrap())
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
