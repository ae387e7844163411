//! Text to speech into a WAV file through the `speak` graph.

use crate::graph::{self, GraphError};
use crate::runner::{self, RunError};
use std::path::Path;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum SpeakError {
    #[error("nothing to speak: the text is empty")]
    Empty,
    #[error("nothing to speak: the text has no letters or digits")]
    NoWords,
    #[error("speed {0} is out of range: give 0.5 to 2")]
    Speed(f32),
    #[error("no audio was produced for the text")]
    NoAudio,
    #[error("cannot write the text to a temporary file: {0}")]
    Temp(String),
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Run(#[from] RunError),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub voice: String,
    pub speed: f32,
    pub threads: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            voice: "jf_alpha".into(),
            speed: 1.0,
            threads: 2,
        }
    }
}

/// What synthesis took.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub audio: Duration,
    pub synthesis: Duration,
    pub first_audio: Option<Duration>,
}

/// Speaks `text` into the WAV file `output` (written whole or not at all).
pub fn speak(text: &str, output: &Path, options: &Options) -> Result<Report, SpeakError> {
    if text.trim().is_empty() {
        return Err(SpeakError::Empty);
    }
    if !text.chars().any(char::is_alphanumeric) {
        return Err(SpeakError::NoWords);
    }
    if !(0.5..=2.0).contains(&options.speed) {
        return Err(SpeakError::Speed(options.speed));
    }
    let mut input = tempfile::Builder::new()
        .prefix("vox-speak-")
        .suffix(".txt")
        .tempfile()
        .map_err(|e| SpeakError::Temp(e.to_string()))?;
    std::io::Write::write_all(&mut input, text.as_bytes())
        .map_err(|e| SpeakError::Temp(e.to_string()))?;
    let description = graph::render_named(
        "speak",
        &[
            ("input", input.path().display().to_string()),
            ("output", output.display().to_string()),
            ("voice", options.voice.clone()),
            ("speed", options.speed.to_string()),
            ("threads", options.threads.to_string()),
        ],
    )?;
    let pipeline = runner::launch(&description)?;
    let outputs = runner::AtomicOutputs::redirect(&pipeline)?;
    let mut report = Report::default();
    runner::run(
        &pipeline,
        |msg| {
            let Some(s) = msg.structure() else { return };
            let ns = |f: &str| s.get::<u64>(f).ok().map(Duration::from_nanos);
            match s.name().as_str() {
                "vox-tts-first-audio" => {
                    report.first_audio = report.first_audio.or(ns("time-to-first-audio"))
                }
                "vox-tts-done" => {
                    report.audio += ns("audio-duration").unwrap_or_default();
                    report.synthesis += ns("synthesis-time").unwrap_or_default();
                }
                _ => {}
            }
        },
        |_| {},
    )?;
    if report.audio.is_zero() {
        return Err(SpeakError::NoAudio);
    }
    outputs.commit()?;
    Ok(report)
}
