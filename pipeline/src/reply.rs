//! Answering a spoken question out loud through the `voice-reply` graph, with the time each
//! stage took.

use crate::graph::{self, GraphError};
use crate::runner::{self, RunError};
use crate::transcribe::{TranscribeError, check_input};
use std::path::Path;
use std::time::{Duration, Instant};
use vox_common::events::Transcript;

#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error(transparent)]
    Input(#[from] TranscribeError),
    #[error("no speech was found in {0}")]
    NoSpeech(String),
    #[error("no answer audio was produced")]
    NoAudio,
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error(transparent)]
    Run(#[from] RunError),
}

#[derive(Debug, Clone)]
pub struct Options {
    pub stt_model: String,
    /// Where answers come from: `embedded` (llama.cpp in-process) or a server URL.
    pub llm: String,
    pub llm_model: String,
    pub voice: String,
    pub threads: u32,
    pub min_silence_ms: u32,
    /// Where speech is transcribed / spoken: `local`, or a speech service URL.
    pub stt: String,
    pub tts: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            stt_model: vox_common::models::DEFAULT_WHISPER.into(),
            llm: "embedded".into(),
            llm_model: String::new(),
            voice: "jf_alpha".into(),
            threads: 2,
            min_silence_ms: 500,
            stt: "local".into(),
            tts: "local".into(),
        }
    }
}

/// When each stage reached its mark, measured on the bus as the graph ran.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub end_of_speech: Option<Instant>,
    pub transcript: Option<Instant>,
    pub first_token: Option<Instant>,
    pub first_sentence: Option<Instant>,
    pub first_audio: Option<Instant>,
    pub done: Option<Instant>,
    /// Model compute inside the voice-to-voice span: Whisper on the question, the LLM up to its
    /// first sentence, Kokoro on the first piece of speech.
    pub stt_compute: Duration,
    pub llm_compute: Duration,
    pub tts_compute: Duration,
}

impl Timings {
    /// `(stage, since end of speech, since the previous stage)` rows.
    pub fn rows(&self) -> Vec<(&'static str, Option<Duration>, Option<Duration>)> {
        let marks = [
            ("end of speech (VAD)", self.end_of_speech),
            ("transcript ready", self.transcript),
            ("first token", self.first_token),
            ("first sentence", self.first_sentence),
            ("first audio", self.first_audio),
        ];
        let mut rows = Vec::new();
        let mut previous = self.end_of_speech;
        for (name, at) in marks {
            let since_start = at
                .zip(self.end_of_speech)
                .map(|(a, e)| a.saturating_duration_since(e));
            let step = at
                .zip(previous)
                .map(|(a, p)| a.saturating_duration_since(p));
            rows.push((name, since_start, step));
            if at.is_some() {
                previous = at;
            }
        }
        rows
    }

    /// What the framework itself added to voice-to-voice: the total minus model compute
    /// (queues, thread hand-offs, pushes, bus messages).
    pub fn framework(&self) -> Option<Duration> {
        self.voice_to_voice()
            .map(|v| v.saturating_sub(self.stt_compute + self.llm_compute + self.tts_compute))
    }

    /// End of the user's speech → first answer audio.
    pub fn voice_to_voice(&self) -> Option<Duration> {
        self.first_audio
            .zip(self.end_of_speech)
            .map(|(a, e)| a.saturating_duration_since(e))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub transcript: String,
    pub answer: String,
    pub timings: Timings,
    pub audio: Duration,
}

fn ns(s: &gst::StructureRef, field: &str) -> Duration {
    Duration::from_nanos(s.get::<u64>(field).unwrap_or(0))
}

/// Answers the question in `input` into the WAV file `output` (written whole or not at all).
pub fn reply(input: &Path, output: &Path, options: &Options) -> Result<Reply, ReplyError> {
    check_input(input)?;
    let description = graph::render_named(
        "voice-reply",
        &[
            ("input", input.display().to_string()),
            ("output", output.display().to_string()),
            ("stt-model", options.stt_model.clone()),
            ("llm", options.llm.clone()),
            ("llm-model", options.llm_model.clone()),
            ("voice", options.voice.clone()),
            ("threads", options.threads.to_string()),
            ("min-silence-ms", options.min_silence_ms.to_string()),
            ("stt", options.stt.clone()),
            ("tts", options.tts.clone()),
        ],
    )?;
    let pipeline = runner::launch(&description)?;
    let outputs = runner::AtomicOutputs::redirect(&pipeline)?;
    let mut out = Reply::default();
    let mut transcripts = Vec::new();
    let mut replies = Vec::new();
    runner::run(
        &pipeline,
        |msg| {
            let Some(s) = msg.structure() else { return };
            let now = Instant::now();
            let t = &mut out.timings;
            match s.name().as_str() {
                "vox-speech-end" => t.end_of_speech = t.end_of_speech.or(Some(now)),
                "vox-llm-first-token" => t.first_token = t.first_token.or(Some(now)),
                "vox-llm-first-sentence" => {
                    if t.first_sentence.is_none() {
                        t.first_sentence = Some(now);
                        t.llm_compute = ns(s, "elapsed");
                    }
                }
                "vox-tts-first-audio" => {
                    if t.first_audio.is_none() {
                        t.first_audio = Some(now);
                        t.tts_compute = ns(s, "synthesis-time");
                    }
                }
                "vox-llm-turn" => {
                    if let Ok(r) = s.get::<&str>("reply") {
                        replies.push(r.to_string());
                    }
                }
                "vox-tts-done" => {
                    t.done = Some(now);
                    out.audio += Duration::from_nanos(s.get::<u64>("audio-duration").unwrap_or(0));
                }
                _ => {
                    if let Some(tr) = Transcript::from_structure(s)
                        && !tr.partial
                    {
                        if t.transcript.is_none() {
                            t.transcript = Some(now);
                            t.stt_compute = Duration::from_nanos(tr.inference_time.nseconds());
                        }
                        transcripts.push(tr.text);
                    }
                }
            }
        },
        |_| {},
    )?;
    out.transcript = transcripts.join(" ").trim().to_string();
    out.answer = replies.join(" ").trim().to_string();
    if out.transcript.is_empty() {
        return Err(ReplyError::NoSpeech(input.display().to_string()));
    }
    if out.audio.is_zero() {
        return Err(ReplyError::NoAudio);
    }
    outputs.commit()?;
    Ok(out)
}
