//! The native Silero engine against ONNX Runtime on the same model file: the same speech
//! probabilities chunk by chunk (real speech at 16 kHz and 8 kHz, noise, silence), the same
//! state carried across calls and reset; and model files the native engine cannot read.

use gstvoxvad::silero::{EngineKind, SileroVad};
use vox_common::testing::fixture_samples;

fn load(rate: u32, kind: EngineKind) -> SileroVad {
    SileroVad::load_with("silero-vad", rate, kind)
        .expect("Silero model and ONNX Runtime: run scripts/setup")
}

/// Probabilities of every whole chunk of `audio`.
fn scores(vad: &mut SileroVad, audio: &[f32]) -> Vec<f32> {
    audio
        .chunks_exact(vad.chunk_len())
        .map(|c| vad.process(c).expect("inference"))
        .collect()
}

fn assert_same(rate: u32, audio: &[f32]) {
    let mut native = load(rate, EngineKind::Native);
    let mut onnx = load(rate, EngineKind::OnnxRuntime);
    assert_eq!((native.engine(), onnx.engine()), ("native", "onnxruntime"));
    let (a, b) = (scores(&mut native, audio), scores(&mut onnx, audio));
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "{rate} Hz: probabilities differ by {worst}");
    // The audio must exercise both sides of the threshold, or the comparison proves little.
    assert!(
        b.iter().any(|p| *p > 0.9) && b.iter().any(|p| *p < 0.1),
        "{b:?}"
    );

    // After a reset both start again from the same state.
    native.reset();
    onnx.reset();
    let (a, b) = (scores(&mut native, audio), scores(&mut onnx, audio));
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4));
}

/// JFK with silence and low noise around it, so chunks run from silence to clear speech.
fn jfk_with_margins() -> Vec<f32> {
    let speech = fixture_samples("jfk.wav");
    let noise = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i + seed) * 7919 % 1009) as f32 / 1009.0 - 0.5) * 0.002)
            .collect()
    };
    let mut audio = vec![0.0; 8000];
    audio.extend(noise(16000, 1));
    audio.extend(speech);
    audio.extend(noise(16000, 2));
    audio
}

#[test]
fn native_matches_onnxruntime_at_16k() {
    assert_same(16000, &jfk_with_margins());
}

#[test]
fn native_matches_onnxruntime_at_8k() {
    // Every other sample after a 4-tap moving average: crude, but real speech at 8 kHz.
    let audio = jfk_with_margins();
    let low: Vec<f32> = audio
        .windows(4)
        .step_by(2)
        .map(|w| w.iter().sum::<f32>() / 4.0)
        .collect();
    assert_same(8000, &low);
}

#[test]
fn auto_picks_native_for_the_official_model() {
    assert_eq!(load(16000, EngineKind::Auto).engine(), "native");
}

#[test]
fn unreadable_model_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let model = std::fs::read(
        vox_common::models::resolve("silero-vad", vox_common::models::ModelKind::Vad)
            .expect("run scripts/setup"),
    )
    .unwrap();
    let truncated = dir.path().join("truncated.onnx");
    std::fs::write(&truncated, &model[..model.len() / 2]).unwrap();
    let path = truncated.to_str().unwrap();

    // The native engine says it cannot read the file and which engine can try other layouts.
    let err = SileroVad::load_with(path, 16000, EngineKind::Native)
        .err()
        .expect("a truncated model must not load")
        .to_string();
    assert!(
        err.contains("truncated.onnx") && err.contains("engine=onnxruntime"),
        "{err}"
    );

    // auto falls back to ONNX Runtime, which also refuses it, naming the file.
    let err = SileroVad::load_with(path, 16000, EngineKind::Auto)
        .err()
        .expect("a truncated model must not load")
        .to_string();
    assert!(err.contains("truncated.onnx"), "{err}");
}
