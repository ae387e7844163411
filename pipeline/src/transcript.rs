//! Transcript documents and their formats: plain text, SRT, WebVTT and OpenAI's
//! `verbose_json` shape. Times are seconds from the start of the file.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Txt,
    Srt,
    Vtt,
    Json,
}

impl Format {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "txt" | "text" => Self::Txt,
            "srt" => Self::Srt,
            "vtt" => Self::Vtt,
            "json" | "verbose_json" => Self::Json,
            _ => return None,
        })
    }

    pub fn extension(self) -> &'static str {
        match self {
            Self::Txt => "txt",
            Self::Srt => "srt",
            Self::Vtt => "vtt",
            Self::Json => "json",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Word {
    pub word: String,
    pub start: f64,
    pub end: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    pub id: usize,
    pub start: f64,
    pub end: f64,
    pub text: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub words: Vec<Word>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Document {
    pub text: String,
    pub language: String,
    pub duration: f64,
    pub segments: Vec<Segment>,
}

impl Document {
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Txt => self
                .segments
                .iter()
                .map(|s| format!("{}\n", s.text))
                .collect(),
            Format::Srt => self
                .segments
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    format!(
                        "{}\n{} --> {}\n{}\n\n",
                        i + 1,
                        timestamp(s.start, ','),
                        timestamp(s.end, ','),
                        s.text
                    )
                })
                .collect(),
            Format::Vtt => {
                let mut out = String::from("WEBVTT\n\n");
                for s in &self.segments {
                    out.push_str(&format!(
                        "{} --> {}\n{}\n\n",
                        timestamp(s.start, '.'),
                        timestamp(s.end, '.'),
                        s.text.replace("-->", "->")
                    ));
                }
                out
            }
            Format::Json => {
                let mut s = serde_json::to_string_pretty(self).expect("plain data serialises");
                s.push('\n');
                s
            }
        }
    }
}

/// `HH:MM:SS,mmm` (SRT) or `HH:MM:SS.mmm` (WebVTT).
pub fn timestamp(seconds: f64, sep: char) -> String {
    let ms = (seconds.max(0.0) * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}{sep}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc() -> Document {
        Document {
            text: "Hello there. General Kenobi.".into(),
            language: "en".into(),
            duration: 3725.5,
            segments: vec![
                Segment {
                    id: 0,
                    start: 0.25,
                    end: 1.5,
                    text: "Hello there.".into(),
                    words: vec![],
                },
                Segment {
                    id: 1,
                    start: 3723.0,
                    end: 3725.125,
                    text: "General Kenobi.".into(),
                    words: vec![],
                },
            ],
        }
    }

    #[test]
    fn srt_and_vtt_are_time_aligned() {
        let srt = doc().render(Format::Srt);
        assert!(srt.starts_with("1\n00:00:00,250 --> 00:00:01,500\nHello there.\n\n2\n"));
        assert!(srt.contains("01:02:03,000 --> 01:02:05,125\nGeneral Kenobi."));
        let vtt = doc().render(Format::Vtt);
        assert!(vtt.starts_with("WEBVTT\n\n00:00:00.250 --> 00:00:01.500\n"));
    }

    #[test]
    fn json_has_openai_verbose_shape() {
        let v: serde_json::Value = serde_json::from_str(&doc().render(Format::Json)).unwrap();
        assert_eq!(v["language"], "en");
        assert_eq!(v["segments"][1]["id"], 1);
        assert_eq!(v["segments"][1]["start"], 3723.0);
        assert!(v["segments"][0].get("words").is_none());
    }

    #[test]
    fn formats_parse() {
        assert_eq!(Format::parse("vtt"), Some(Format::Vtt));
        assert_eq!(Format::parse("docx"), None);
    }
}
