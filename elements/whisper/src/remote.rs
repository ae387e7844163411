//! Transcription by a speech service instead of the model in-process: each utterance goes up as
//! a 16 kHz WAV to OpenAI's `/v1/audio/transcriptions` (or `translations`), as `vox serve stt`
//! and other compatible servers offer it, and `verbose_json` comes back. No GStreamer types.

use crate::engine::{Error, Options, Output, Result, SAMPLE_RATE, SegmentOut, WordOut};
use serde_json::Value;
use vox_common::remote::Remote;

/// Transcribes `samples` (16 kHz mono) with `model` on the service.
pub fn transcribe(
    remote: &Remote,
    model: &str,
    samples: &[f32],
    opts: &Options,
    cancelled: impl Fn() -> bool,
) -> Result<Output> {
    let wav = wav(samples);
    let url = remote.endpoint(if opts.translate {
        "audio/translations"
    } else {
        "audio/transcriptions"
    });
    let mut fields: Vec<(&str, String)> = vec![
        ("model", model.to_string()),
        ("response_format", "verbose_json".into()),
        ("timestamp_granularities[]", "segment".into()),
    ];
    if opts.word_timestamps {
        fields.push(("timestamp_granularities[]", "word".into()));
    }
    if opts.language != "auto" && !opts.translate {
        fields.push(("language", opts.language.clone()));
    }
    if !opts.initial_prompt.is_empty() {
        fields.push(("prompt", opts.initial_prompt.clone()));
    }
    if opts.temperature > 0.0 {
        fields.push(("temperature", opts.temperature.to_string()));
    }
    let (content_type, body) = multipart(&fields, "utterance.wav", "audio/wav", &wav);
    let response = remote
        .send(
            |client| {
                client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, content_type.as_str())
                    .body(body.clone())
            },
            cancelled,
        )
        .map_err(|e| Error::Service(e.to_string()))?;
    let body: Value = response
        .json()
        .map_err(|e| Error::Service(format!("unreadable answer from {url}: {e}")))?;
    Ok(output(&body, opts, samples.len()))
}

/// Our output from a `verbose_json` answer (times in the clip, in ms).
fn output(v: &Value, opts: &Options, samples: usize) -> Output {
    let ms = |x: &Value| (x.as_f64().unwrap_or(0.0) * 1000.0).round().max(0.0) as u64;
    let text = v["text"].as_str().unwrap_or_default().trim().to_string();
    let words: Vec<WordOut> = v["words"]
        .as_array()
        .map(|ws| {
            ws.iter()
                .map(|w| WordOut {
                    start_ms: ms(&w["start"]),
                    end_ms: ms(&w["end"]),
                    text: w["word"].as_str().unwrap_or_default().trim().to_string(),
                    probability: 1.0,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut segments: Vec<SegmentOut> = v["segments"]
        .as_array()
        .map(|ss| {
            ss.iter()
                .map(|s| SegmentOut {
                    start_ms: ms(&s["start"]),
                    end_ms: ms(&s["end"]),
                    text: s["text"].as_str().unwrap_or_default().trim().to_string(),
                    words: Vec::new(),
                })
                .filter(|s| !s.text.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if segments.is_empty() && !text.is_empty() {
        segments.push(SegmentOut {
            start_ms: 0,
            end_ms: (samples * 1000 / SAMPLE_RATE) as u64,
            text: text.clone(),
            words: Vec::new(),
        });
    }
    // Each word to the segment it starts in (the last one takes the rest).
    let last = segments.len().saturating_sub(1);
    for w in words {
        let i = segments
            .iter()
            .position(|s| w.start_ms < s.end_ms)
            .unwrap_or(last);
        if let Some(s) = segments.get_mut(i) {
            s.words.push(w);
        }
    }
    let language = match (opts.language.as_str(), v["language"].as_str()) {
        ("auto", Some("english")) => "en".to_string(),
        ("auto", Some(l)) => l.to_string(),
        (l, _) => l.to_string(),
    };
    Output {
        text,
        language,
        segments,
    }
}

/// A `multipart/form-data` body (RFC 7578) of text `fields` and one file, and its content type.
/// Built whole here: reqwest's blocking form streams through a pipe, and a refused connection
/// then shows as a broken body instead of as what it is.
fn multipart(
    fields: &[(&str, String)],
    filename: &str,
    mime: &str,
    file: &[u8],
) -> (String, Vec<u8>) {
    let boundary = format!("vox-{:016x}", {
        use std::hash::{BuildHasher, RandomState};
        RandomState::new().hash_one(file.len())
    });
    let mut body = Vec::with_capacity(file.len() + 1024);
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: {mime}\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// 16-bit PCM WAV bytes of `samples`.
fn wav(samples: &[f32]) -> Vec<u8> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE as u32,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut out = std::io::Cursor::new(Vec::new());
    {
        let mut w = hound::WavWriter::new(&mut out, spec).expect("writing to memory");
        for s in samples {
            let _ = w.write_sample((s.clamp(-1.0, 1.0) * 32767.0) as i16);
        }
        let _ = w.finalize();
    }
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn verbose_json_becomes_segments_with_their_words() {
        let v = json!({
            "text": " Hello there. General Kenobi.",
            "language": "english",
            "segments": [
                {"start": 0.0, "end": 1.2, "text": " Hello there."},
                {"start": 1.5, "end": 3.0, "text": " General Kenobi."}
            ],
            "words": [
                {"word": "Hello", "start": 0.1, "end": 0.5},
                {"word": "there", "start": 0.6, "end": 1.1},
                {"word": "General", "start": 1.6, "end": 2.1},
                {"word": "Kenobi", "start": 2.2, "end": 2.9}
            ]
        });
        let opts = Options {
            language: "auto".into(),
            ..Options::default()
        };
        let out = output(&v, &opts, 48000);
        assert_eq!(out.text, "Hello there. General Kenobi.");
        assert_eq!(out.language, "en");
        assert_eq!(out.segments.len(), 2);
        assert_eq!(out.segments[1].start_ms, 1500);
        assert_eq!(out.segments[0].words.len(), 2);
        assert_eq!(out.segments[1].words[1].text, "Kenobi");
        // A plain answer (no segments) is one segment over the clip.
        let out = output(&json!({"text": "Hi."}), &Options::default(), 32000);
        assert_eq!(out.segments.len(), 1);
        assert_eq!(out.segments[0].end_ms, 2000);
    }

    #[test]
    fn wav_is_16_bit_mono_at_16_khz() {
        let bytes = wav(&[0.0, 0.5, -0.5]);
        let r = hound::WavReader::new(std::io::Cursor::new(bytes)).unwrap();
        assert_eq!(r.spec().sample_rate, 16000);
        assert_eq!(r.len(), 3);
    }
}
