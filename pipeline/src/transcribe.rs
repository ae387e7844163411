//! Offline transcription of files through the `transcribe` graph.

use crate::graph::{self, GraphError};
use crate::runner::{self, Progress, RunError};
use crate::transcript::{Document, Segment, Word};
use std::path::Path;
use vox_common::events::Transcript;

#[derive(Debug, thiserror::Error)]
pub enum TranscribeError {
    #[error("input {0} does not exist")]
    Missing(String),
    #[error("input {0} is empty")]
    Empty(String),
    #[error("input {path} is a truncated WAV file: {why}")]
    TruncatedWav { path: String, why: String },
    #[error("cannot transcribe {path}: {why}")]
    Failed { path: String, why: String },
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Run(#[from] RunError),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub model: String,
    pub language: String,
    pub threads: u32,
    pub beam_size: u32,
    /// Sampling temperature (0: the likeliest words).
    pub temperature: f32,
    pub min_silence_ms: u32,
    /// Text that came before, to steer the decoder (Whisper's initial prompt).
    pub prompt: String,
    pub translate: bool,
    pub word_timestamps: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            model: vox_common::models::DEFAULT_WHISPER.into(),
            language: "en".into(),
            threads: 2,
            beam_size: 1,
            temperature: 0.0,
            min_silence_ms: 500,
            prompt: String::new(),
            translate: false,
            word_timestamps: false,
        }
    }
}

/// Checks what GStreamer would not: a missing or empty file, and a WAV file whose header
/// promises more audio than the file holds.
pub fn check_input(path: &Path) -> Result<(), TranscribeError> {
    let shown = path.display().to_string();
    let meta = std::fs::metadata(path).map_err(|_| TranscribeError::Missing(shown.clone()))?;
    if !meta.is_file() {
        return Err(TranscribeError::Missing(shown));
    }
    if meta.len() == 0 {
        return Err(TranscribeError::Empty(shown));
    }
    let mut head = [0u8; 12];
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| TranscribeError::Failed {
        path: shown.clone(),
        why: e.to_string(),
    })?;
    let n = f.read(&mut head).unwrap_or(0);
    if n == 12 && &head[0..4] == b"RIFF" && &head[8..12] == b"WAVE" {
        check_wav(path, meta.len())
            .map_err(|why| TranscribeError::TruncatedWav { path: shown, why })?;
    }
    Ok(())
}

/// Walks the RIFF chunks: the `data` chunk must fit in the file.
fn check_wav(path: &Path, file_len: u64) -> Result<(), String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut pos = 12u64;
    loop {
        if pos + 8 > file_len {
            return Err("no data chunk".into());
        }
        f.seek(SeekFrom::Start(pos)).map_err(|e| e.to_string())?;
        let mut hdr = [0u8; 8];
        f.read_exact(&mut hdr).map_err(|e| e.to_string())?;
        let size = u64::from(u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]));
        if &hdr[0..4] == b"data" {
            let available = file_len - pos - 8;
            // 0 and 0xFFFFFFFF are used by streaming writers for "unknown length".
            if size != 0 && size != 0xFFFF_FFFF && size > available {
                return Err(format!(
                    "its header declares {size} bytes of audio, the file holds {available}"
                ));
            }
            return Ok(());
        }
        pos += 8 + size + (size & 1);
    }
}

/// Transcribes one file; `on_progress` sees the position in the file as it is processed.
pub fn transcribe_file(
    input: &Path,
    options: &Options,
    mut on_progress: impl FnMut(Progress),
) -> Result<Document, TranscribeError> {
    check_input(input)?;
    let description = graph::render_named(
        "transcribe",
        &[
            ("input", input.display().to_string()),
            ("model", options.model.clone()),
            ("language", options.language.clone()),
            ("threads", options.threads.to_string()),
            ("beam-size", options.beam_size.to_string()),
            ("temperature", options.temperature.to_string()),
            ("min-silence-ms", options.min_silence_ms.to_string()),
            ("prompt", options.prompt.clone()),
            ("translate", options.translate.to_string()),
            ("word-timestamps", options.word_timestamps.to_string()),
        ],
    )?;
    let pipeline = runner::launch(&description)?;
    let mut transcripts: Vec<Transcript> = Vec::new();
    let mut length = gst::ClockTime::ZERO;
    let result = runner::run(
        &pipeline,
        |msg| {
            if let Some(t) = msg.structure().and_then(Transcript::from_structure)
                && !t.partial
            {
                transcripts.push(t);
            }
        },
        |p| {
            if let Some(d) = p.duration {
                length = length.max(d);
            }
            if let Some(pos) = p.position {
                length = length.max(pos);
            }
            on_progress(p);
        },
    );
    result.map_err(|e| TranscribeError::Failed {
        path: input.display().to_string(),
        why: e.to_string(),
    })?;
    Ok(document(transcripts, length))
}

/// One segment per utterance, times in seconds from the start of the file.
pub fn document(mut transcripts: Vec<Transcript>, length: gst::ClockTime) -> Document {
    transcripts.sort_by_key(|t| t.pts);
    let secs = |t: gst::ClockTime| t.nseconds() as f64 / 1e9;
    let segments: Vec<Segment> = transcripts
        .iter()
        .filter(|t| !t.text.trim().is_empty())
        .enumerate()
        .map(|(id, t)| Segment {
            id,
            start: secs(t.pts),
            end: secs(t.pts + t.duration),
            text: t.text.trim().to_string(),
            words: t
                .segments
                .iter()
                .flat_map(|s| s.words.iter())
                .map(|w| Word {
                    word: w.text.clone(),
                    start: secs(w.start),
                    end: secs(w.end),
                })
                .collect(),
        })
        .collect();
    let end = transcripts
        .iter()
        .map(|t| t.pts + t.duration)
        .max()
        .unwrap_or_default();
    Document {
        text: segments
            .iter()
            .map(|s| s.text.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        language: transcripts
            .first()
            .map(|t| t.language.clone())
            .unwrap_or_else(|| "en".into()),
        duration: secs(length.max(end)),
        segments,
    }
}
