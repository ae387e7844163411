//! Kokoro's int8 graph rewritten (`rewrite`: 8-bit or float convolutions, the Snake and STFT
//! operators), on the real model: every `ConvInteger`, Snake chain and `STFT` goes, the speech
//! keeps its length and spectrum, and what is not a model is an error, not a panic.

use gstvoxkokoro::engine::Kokoro;
use gstvoxkokoro::phonemes::{self, Vocab};
use gstvoxkokoro::rewrite::{Options, rewrite};
use gstvoxkokoro::voices;
use vox_common::models::{ModelKind, resolve};

fn model() -> std::path::PathBuf {
    resolve("kokoro", ModelKind::Tts).expect("the Kokoro model: run scripts/setup")
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

/// Log-magnitude spectra of 512-sample Hann windows every 256 samples (a naive DFT over 64
/// bins up to 3 kHz, where speech's formants are).
fn spectrum(audio: &[f32]) -> Vec<f64> {
    let n = 512;
    let mut out = Vec::new();
    for start in (0..audio.len().saturating_sub(n)).step_by(256) {
        for bin in 1..=64 {
            let (mut re, mut im) = (0.0f64, 0.0f64);
            for (k, &x) in audio[start..start + n].iter().enumerate() {
                let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * k as f64 / n as f64).cos();
                let phase = 2.0 * std::f64::consts::PI * bin as f64 * k as f64 / n as f64;
                re += w * x as f64 * phase.cos();
                im -= w * x as f64 * phase.sin();
            }
            out.push((re.hypot(im) + 1e-4).ln());
        }
    }
    out
}

fn correlation(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let ma = a.iter().sum::<f64>() / n as f64;
    let mb = b.iter().sum::<f64>() / n as f64;
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

const ALL: Options = Options::ALL;
const NONE: Options = Options::NONE;

#[test]
fn every_int8_convolution_snake_and_stft_is_rewritten_and_the_speech_stays_the_same() {
    let path = model();
    let bytes = std::fs::read(&path).unwrap();
    let before = count(&bytes, b"ConvInteger");
    assert!(
        before > 0,
        "{} has no ConvInteger: not the int8 model",
        path.display()
    );
    let rewritten = rewrite(&bytes, ALL)
        .unwrap()
        .expect("the int8 model's chains are rewritten");
    assert_eq!(
        (rewritten.int8_convs, rewritten.convs),
        (87, 0),
        "Kokoro-82M int8 has 87 quantised convolutions, all 1-D of one group"
    );
    assert_eq!(
        rewritten.snakes, 48,
        "Kokoro-82M's generator has 48 Snake activations"
    );
    assert_eq!(count(&rewritten.model, b"ConvInteger"), 0);
    // Three sines are left: the harmonic source's, the phase's and the inverse STFT's
    // ("\x22\x03Sin" is `op_type: "Sin"` on the wire).
    assert_eq!(count(&bytes, b"\x22\x03Sin"), 51);
    assert_eq!(count(&rewritten.model, b"\x22\x03Sin"), 3);
    // `kokorotts int8-convolutions=false`: float convolutions instead.
    let float_all = Options {
        int8_convs: false,
        ..ALL
    };
    let floats = rewrite(&bytes, float_all).unwrap().unwrap();
    assert_eq!((floats.int8_convs, floats.convs), (0, 87));
    // And neither: the other rewrites only.
    let int8_ops = Options {
        int8_convs: false,
        float_convs: false,
        ..ALL
    };
    let ops = rewrite(&bytes, int8_ops).unwrap().unwrap();
    assert_eq!(
        (ops.int8_convs, ops.convs, ops.snakes, ops.stfts),
        (0, 0, 48, 1)
    );
    assert_eq!(count(&ops.model, b"ConvInteger"), 87);
    let only_convs = Options {
        float_convs: true,
        ..NONE
    };
    let only_int8 = Options {
        int8_convs: true,
        ..NONE
    };
    drop(bytes);

    let vocab = Vocab::load(&resolve("kokoro-vocab", ModelKind::Vocab).unwrap()).unwrap();
    let voices_path = resolve("kokoro-voices", ModelKind::Voices).unwrap();
    let voice = voices::load(&voices_path, "jf_alpha").unwrap();
    let chunk = phonemes::chunks("The capital of France is Paris.", "en-us", &vocab)
        .unwrap()
        .remove(0);
    let speak = |options: Options| {
        Kokoro::load(&path, 2, options)
            .unwrap()
            .synthesise(&chunk.ids, voice.style(chunk.ids.len()), 1.0)
            .unwrap()
    };
    // Against the graph as it is, the float convolutions leave out the 8-bit quantisation of
    // every convolution's input: close, not the same.
    let original = speak(NONE);
    let float = speak(only_convs);
    let ratio = float.len() as f64 / original.len() as f64;
    assert!(
        (0.95..1.05).contains(&ratio),
        "{} against {} samples",
        float.len(),
        original.len()
    );
    let r = correlation(&spectrum(&float), &spectrum(&original));
    assert!(
        r > 0.9,
        "log spectra correlate {r:.3}: the float convolutions changed the speech"
    );
    // The Snake operators compute what the chains computed, to a float's rounding (compared in
    // float: in the int8 graph, the next quantisation turns a last-bit difference into a step).
    let snakes = speak(Options {
        stft: false,
        ..float_all
    });
    assert_eq!(snakes.len(), float.len());
    let worst = snakes
        .iter()
        .zip(&float)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(
        worst < 1e-4,
        "the Snake operators changed a sample by {worst}"
    );
    // The STFT operator is within 2e-7 of a double-precision DFT where ONNX Runtime's is within
    // ~1e-5 (both measured against numpy's rfft), and the generator takes the phase of every bin, near-silent ones too: a change of
    // 1e-6 in the window moves samples by up to 0.03. Same length, same spectrum.
    let all = speak(float_all);
    assert_eq!(all.len(), float.len());
    let r = correlation(&spectrum(&all), &spectrum(&snakes));
    assert!(
        r > 0.98,
        "log spectra correlate {r:.3}: the STFT operator changed the speech"
    );
    // The 8-bit convolutions multiply and sum the int8 graph's own values; only the bias is
    // added in float where the graph rounds it to the input's steps first.
    // (Without the CPU's exact 8-bit dot products, loading leaves them out: the graph as it is.)
    let products = speak(only_int8);
    // (A rounding step apart in a duration can move the length a little.)
    let alike = |a: &[f32], r_min: f64, what: &str| {
        let ratio = a.len() as f64 / original.len() as f64;
        assert!(
            (0.95..1.05).contains(&ratio),
            "{what}: {} samples against {}",
            a.len(),
            original.len()
        );
        let r = correlation(&spectrum(a), &spectrum(&original));
        assert!(
            r > r_min,
            "log spectra correlate {r:.3}: {what} changed the speech"
        );
    };
    alike(&products, 0.98, "the 8-bit convolutions");
    if !gstvoxkokoro::qconv::exact() {
        assert_eq!(
            products, original,
            "no 8-bit dot products: the graph as it is"
        );
    }
    alike(&speak(ALL), 0.9, "the default rewrites");
    // And the operators in the int8 graph.
    let int8 = speak(int8_ops);
    assert_eq!(int8.len(), original.len());
    let r = correlation(&spectrum(&int8), &spectrum(&original));
    assert!(
        r > 0.9,
        "log spectra correlate {r:.3}: the Snake and STFT operators changed the speech"
    );
}

#[test]
fn a_model_without_quantised_convolutions_is_left_as_it_is() {
    let vad = resolve("silero-vad", ModelKind::Vad).expect("the Silero model: run scripts/setup");
    assert!(
        rewrite(&std::fs::read(vad).unwrap(), ALL)
            .unwrap()
            .is_none()
    );
}

#[test]
fn what_is_not_a_model_is_an_error_naming_the_file() {
    assert!(rewrite(b"\xff\xff\xff\xff not a model", ALL).is_err());
    let bytes = std::fs::read(model()).unwrap();
    let cut = &bytes[..bytes.len() / 2];
    assert!(rewrite(cut, ALL).unwrap_err().contains("truncated"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("half.onnx");
    std::fs::write(&path, cut).unwrap();
    let err = Kokoro::load(&path, 1, ALL)
        .err()
        .expect("a half model fails to load")
        .to_string();
    assert!(
        err.contains("half.onnx") && err.contains("truncated"),
        "{err}"
    );
}
