//! Custom events and element messages shared by the elements.
//!
//! Speech boundaries travel as serialized custom downstream events (in order with the audio)
//! and are also posted as element messages for applications. Transcripts travel as text
//! buffers, each preceded by a serialized `vox-transcript` event holding the structured data
//! (segments, words, partial/final), and are posted as element messages with the same fields.

use gst::prelude::*;

pub const SPEECH_START: &str = "vox-speech-start";
pub const SPEECH_END: &str = "vox-speech-end";
/// Posted (a message only) at the first chunk that may be speech, before it is confirmed.
pub const SPEECH_ONSET: &str = "vox-speech-onset";
/// Posted (a message only) when an onset fell back to silence without being confirmed.
pub const SPEECH_CANCEL: &str = "vox-speech-cancel";
pub const TRANSCRIPT: &str = "vox-transcript";
/// Speech paused long enough that it may be ending (silerovad `speculate-ms`).
pub const SPEECH_PAUSE: &str = "vox-speech-pause";
/// Speech came back after a pause.
pub const SPEECH_RESUME: &str = "vox-speech-resume";
/// A reply made ahead of the end of the caller's turn: begun, confirmed or withdrawn.
pub const TURN: &str = "vox-turn";

/// The structure of a custom downstream event (how our events travel).
fn custom_downstream(event: &gst::EventRef) -> Option<&gst::StructureRef> {
    (event.type_() == gst::EventType::CustomDownstream)
        .then(|| event.structure())
        .flatten()
}

/// A speech boundary found by the VAD.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechBoundary {
    /// `true` for speech-start, `false` for speech-end.
    pub start: bool,
    /// Stream time (buffer timestamps) of the boundary, padding included.
    pub pts: gst::ClockTime,
    /// Running time of the boundary.
    pub running_time: gst::ClockTime,
    /// Speech probability: of the first speech chunk (start) or the mean over the utterance (end).
    pub probability: f64,
    /// Utterance counter, from 0, per stream.
    pub utterance: u64,
}

impl SpeechBoundary {
    pub fn to_structure(&self) -> gst::Structure {
        gst::Structure::builder(if self.start { SPEECH_START } else { SPEECH_END })
            .field("pts", self.pts)
            .field("running-time", self.running_time)
            .field("probability", self.probability)
            .field("utterance", self.utterance)
            .build()
    }

    pub fn from_structure(s: &gst::StructureRef) -> Option<Self> {
        let start = match s.name().as_str() {
            SPEECH_START => true,
            SPEECH_END => false,
            _ => return None,
        };
        Some(Self {
            start,
            pts: s.get("pts").ok()?,
            running_time: s.get("running-time").ok()?,
            probability: s.get("probability").ok()?,
            utterance: s.get("utterance").ok()?,
        })
    }

    pub fn to_event(&self) -> gst::Event {
        gst::event::CustomDownstream::new(self.to_structure())
    }

    pub fn from_event(event: &gst::EventRef) -> Option<Self> {
        Self::from_structure(custom_downstream(event)?)
    }
}

/// A tentative end of speech, or its withdrawal: serialized custom downstream events in order
/// with the audio (and element messages), sent between a speech-start and its speech-end.
/// After a pause the speech-end, if no resume comes first, is at the pause's `pts`: downstream
/// may start on the utterance at the pause (transcribe it ahead) and drop that work on a resume.
#[derive(Debug, Clone, PartialEq)]
pub struct SpeechPause {
    /// `false`: paused (`vox-speech-pause`); `true`: resumed (`vox-speech-resume`).
    pub resume: bool,
    /// Stream time where the speech would end (pause), or where it came back (resume).
    pub pts: gst::ClockTime,
    pub running_time: gst::ClockTime,
    /// The utterance it belongs to (as in [`SpeechBoundary`]).
    pub utterance: u64,
}

impl SpeechPause {
    pub fn to_structure(&self) -> gst::Structure {
        gst::Structure::builder(if self.resume {
            SPEECH_RESUME
        } else {
            SPEECH_PAUSE
        })
        .field("pts", self.pts)
        .field("running-time", self.running_time)
        .field("utterance", self.utterance)
        .build()
    }

    pub fn from_structure(s: &gst::StructureRef) -> Option<Self> {
        let resume = match s.name().as_str() {
            SPEECH_PAUSE => false,
            SPEECH_RESUME => true,
            _ => return None,
        };
        Some(Self {
            resume,
            pts: s.get("pts").ok()?,
            running_time: s.get("running-time").ok()?,
            utterance: s.get("utterance").ok()?,
        })
    }

    pub fn to_event(&self) -> gst::Event {
        gst::event::CustomDownstream::new(self.to_structure())
    }

    pub fn from_event(event: &gst::EventRef) -> Option<Self> {
        Self::from_structure(custom_downstream(event)?)
    }
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Word {
    pub start: gst::ClockTime,
    pub end: gst::ClockTime,
    pub text: String,
    pub probability: f64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Segment {
    /// Stream time of the segment's start and end.
    pub start: gst::ClockTime,
    pub end: gst::ClockTime,
    pub text: String,
    pub words: Vec<Word>,
}

/// One utterance's transcript.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Transcript {
    pub text: String,
    /// Stream time of the utterance's start, and its length.
    pub pts: gst::ClockTime,
    pub duration: gst::ClockTime,
    /// Interim result while speech continues; a final one follows.
    pub partial: bool,
    pub language: String,
    pub utterance: u64,
    pub segments: Vec<Segment>,
    /// Wall time spent in the model for this result.
    pub inference_time: gst::ClockTime,
    /// Transcribed ahead, at a pause in the speech (before the end was confirmed).
    pub ahead: bool,
}

impl Transcript {
    pub fn to_structure(&self) -> gst::Structure {
        let segments: Vec<gst::glib::SendValue> = self
            .segments
            .iter()
            .map(|seg| {
                let words: Vec<gst::glib::SendValue> = seg
                    .words
                    .iter()
                    .map(|w| {
                        gst::Structure::builder("word")
                            .field("start", w.start)
                            .field("end", w.end)
                            .field("text", &w.text)
                            .field("probability", w.probability)
                            .build()
                            .to_send_value()
                    })
                    .collect();
                gst::Structure::builder("segment")
                    .field("start", seg.start)
                    .field("end", seg.end)
                    .field("text", &seg.text)
                    .field("words", gst::Array::from_values(words))
                    .build()
                    .to_send_value()
            })
            .collect();
        gst::Structure::builder(TRANSCRIPT)
            .field("text", &self.text)
            .field("pts", self.pts)
            .field("duration", self.duration)
            .field("partial", self.partial)
            .field("language", &self.language)
            .field("utterance", self.utterance)
            .field("inference-time", self.inference_time)
            .field("ahead", self.ahead)
            .field("segments", gst::Array::from_values(segments))
            .build()
    }

    pub fn from_structure(s: &gst::StructureRef) -> Option<Self> {
        if s.name() != TRANSCRIPT {
            return None;
        }
        let segments = s
            .get::<gst::Array>("segments")
            .ok()?
            .iter()
            .filter_map(|v| v.get::<gst::Structure>().ok())
            .map(|seg| Segment {
                start: seg.get("start").unwrap_or_default(),
                end: seg.get("end").unwrap_or_default(),
                text: seg.get("text").unwrap_or_default(),
                words: seg
                    .get::<gst::Array>("words")
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.get::<gst::Structure>().ok())
                            .map(|w| Word {
                                start: w.get("start").unwrap_or_default(),
                                end: w.get("end").unwrap_or_default(),
                                text: w.get("text").unwrap_or_default(),
                                probability: w.get("probability").unwrap_or_default(),
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            })
            .collect();
        Some(Self {
            text: s.get("text").ok()?,
            pts: s.get("pts").ok()?,
            duration: s.get("duration").ok()?,
            partial: s.get("partial").ok()?,
            language: s.get("language").unwrap_or_default(),
            utterance: s.get("utterance").unwrap_or_default(),
            inference_time: s.get("inference-time").unwrap_or_default(),
            ahead: s.get("ahead").unwrap_or_default(),
            segments,
        })
    }

    pub fn to_event(&self) -> gst::Event {
        gst::event::CustomDownstream::new(self.to_structure())
    }
}

/// Where a turn stands, for replies made ahead of its end (whisperstt `send-ahead`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnState {
    /// The transcript (or the reply text) that follows was made at a pause: the speech may go
    /// on. Downstream starts on it and holds what the caller would hear (serialized).
    Tentative,
    /// The speech ended at that pause: what was held goes out (out of band: it passes the
    /// text and audio queued behind it).
    Confirmed,
    /// The speech went on: what was made ahead is dropped (out of band).
    Withdrawn,
    /// The text that follows is of an ended turn, held for nothing (serialized).
    Final,
}

/// A `vox-turn` event: the state of the reply ahead numbered `id` (counted per stream by
/// whisperstt), or, with [`TurnState::Final`], that the text that follows is not ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnMark {
    pub state: TurnState,
    pub id: u64,
}

impl TurnMark {
    fn state_name(&self) -> &'static str {
        match self.state {
            TurnState::Tentative => "tentative",
            TurnState::Confirmed => "confirmed",
            TurnState::Withdrawn => "withdrawn",
            TurnState::Final => "final",
        }
    }

    pub fn to_structure(&self) -> gst::Structure {
        gst::Structure::builder(TURN)
            .field("state", self.state_name())
            .field("id", self.id)
            .build()
    }

    pub fn from_structure(s: &gst::StructureRef) -> Option<Self> {
        if s.name() != TURN {
            return None;
        }
        let state = match s.get::<&str>("state").ok()? {
            "tentative" => TurnState::Tentative,
            "confirmed" => TurnState::Confirmed,
            "withdrawn" => TurnState::Withdrawn,
            "final" => TurnState::Final,
            _ => return None,
        };
        Some(Self {
            state,
            id: s.get("id").ok()?,
        })
    }

    /// Serialized for a beginning (in order with the text it marks); out of band for a
    /// decision, which must overtake that text.
    pub fn to_event(&self) -> gst::Event {
        match self.state {
            TurnState::Tentative | TurnState::Final => {
                gst::event::CustomDownstream::new(self.to_structure())
            }
            TurnState::Confirmed | TurnState::Withdrawn => {
                gst::event::CustomDownstreamOob::new(self.to_structure())
            }
        }
    }

    pub fn from_event(event: &gst::EventRef) -> Option<Self> {
        matches!(
            event.type_(),
            gst::EventType::CustomDownstream | gst::EventType::CustomDownstreamOob
        )
        .then(|| event.structure())
        .flatten()
        .and_then(Self::from_structure)
    }
}

/// The decisions on replies made ahead, as an element receives them (out of band, from the
/// streaming thread) and its worker waits for them.
#[derive(Default)]
pub struct Decisions {
    /// The latest decisions: (id, confirmed, when).
    made: std::sync::Mutex<std::collections::VecDeque<(u64, bool, std::time::Instant)>>,
    changed: std::sync::Condvar,
}

impl Decisions {
    /// Decisions kept (ids only grow, and a reply waits for its own within a second or so).
    const KEPT: usize = 16;

    pub fn decide(&self, id: u64, confirmed: bool) {
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        made.push_back((id, confirmed, std::time::Instant::now()));
        while made.len() > Self::KEPT {
            made.pop_front();
        }
        self.changed.notify_all();
    }

    /// The decision on `id`, if made: confirmed or not, and when.
    pub fn get(&self, id: u64) -> Option<(bool, std::time::Instant)> {
        let made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        made.iter()
            .rev()
            .find(|(i, _, _)| *i == id)
            .map(|(_, c, at)| (*c, *at))
    }

    pub fn withdrawn(&self, id: u64) -> bool {
        self.get(id).is_some_and(|(confirmed, _)| !confirmed)
    }

    /// Waits for the decision on `id`; `None` when `cancelled()` first (looked at every 10 ms,
    /// without the lock: it may look at the decisions itself).
    pub fn wait(
        &self,
        id: u64,
        cancelled: &dyn Fn() -> bool,
    ) -> Option<(bool, std::time::Instant)> {
        loop {
            if let Some(decision) = self.get(id) {
                return Some(decision);
            }
            if cancelled() {
                return None;
            }
            let made = self.made.lock().unwrap_or_else(|p| p.into_inner());
            if made.iter().any(|(i, _, _)| *i == id) {
                continue;
            }
            let _ = self
                .changed
                .wait_timeout(made, std::time::Duration::from_millis(10))
                .unwrap_or_else(|p| p.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structures_round_trip() {
        gst::init().unwrap();
        let b = SpeechBoundary {
            start: true,
            pts: gst::ClockTime::from_mseconds(1500),
            running_time: gst::ClockTime::from_mseconds(1500),
            probability: 0.93,
            utterance: 2,
        };
        assert_eq!(SpeechBoundary::from_event(&b.to_event()), Some(b));
        for resume in [false, true] {
            let p = SpeechPause {
                resume,
                pts: gst::ClockTime::from_mseconds(2500),
                running_time: gst::ClockTime::from_mseconds(2600),
                utterance: 3,
            };
            assert_eq!(SpeechBoundary::from_event(&p.to_event()), None);
            assert_eq!(SpeechPause::from_event(&p.to_event()), Some(p));
        }
        let t = Transcript {
            text: "hello world".into(),
            pts: gst::ClockTime::from_seconds(1),
            duration: gst::ClockTime::from_seconds(2),
            partial: false,
            language: "en".into(),
            utterance: 1,
            segments: vec![Segment {
                start: gst::ClockTime::from_seconds(1),
                end: gst::ClockTime::from_seconds(3),
                text: "hello world".into(),
                words: vec![Word {
                    start: gst::ClockTime::from_seconds(1),
                    end: gst::ClockTime::from_mseconds(1500),
                    text: "hello".into(),
                    probability: 0.9,
                }],
            }],
            inference_time: gst::ClockTime::from_mseconds(120),
            ahead: true,
        };
        assert_eq!(Transcript::from_structure(&t.to_structure()), Some(t));
        for state in [
            TurnState::Tentative,
            TurnState::Confirmed,
            TurnState::Withdrawn,
            TurnState::Final,
        ] {
            let m = TurnMark { state, id: 7 };
            let e = m.to_event();
            assert_eq!(TurnMark::from_event(&e), Some(m));
            // A beginning keeps its place among the text; a decision overtakes it.
            let serialized = matches!(state, TurnState::Tentative | TurnState::Final);
            assert_eq!(e.is_serialized(), serialized, "{state:?}");
        }
    }

    #[test]
    fn decisions_are_waited_for_and_a_wait_can_be_cancelled() {
        let d = std::sync::Arc::new(Decisions::default());
        assert_eq!(d.get(1), None);
        assert_eq!(d.wait(1, &|| true), None);
        // The cancel test may look at the decisions itself.
        assert_eq!(d.wait(1, &|| d.get(1).is_none()), None);
        let decider = {
            let d = d.clone();
            std::thread::spawn(move || {
                std::thread::sleep(std::time::Duration::from_millis(50));
                d.decide(1, true);
                d.decide(2, false);
            })
        };
        assert!(d.wait(1, &|| false).is_some_and(|(confirmed, _)| confirmed));
        decider.join().unwrap();
        assert!(d.withdrawn(2) && !d.withdrawn(1));
        for id in 3..40 {
            d.decide(id, true);
        }
        assert_eq!(d.get(1), None, "old decisions are forgotten");
    }
}
