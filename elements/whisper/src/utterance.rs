//! Collects the audio of each utterance (no model, no GStreamer).
//!
//! Sample positions are counted from the start of the stream. A short look-back history is kept
//! so that a speech-start boundary that refers back in time (VAD confirmation delay and padding)
//! still finds its audio. Without a VAD ("continuous" mode) every sample belongs to an utterance
//! and utterances are cut at the maximum length.

use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq)]
pub struct Utterance {
    /// Sample position of the first sample.
    pub start: u64,
    pub samples: Vec<f32>,
}

#[derive(Debug)]
pub struct UtteranceBuffer {
    lookback: usize,
    max_len: usize,
    gated: bool,
    history: VecDeque<f32>,
    /// Position of `history[0]`.
    history_start: u64,
    current: Option<Utterance>,
}

impl UtteranceBuffer {
    /// `lookback` and `max_len` in samples; `max_len` ≥ 1.
    pub fn new(lookback: usize, max_len: usize) -> Self {
        Self {
            lookback,
            max_len: max_len.max(1),
            gated: false,
            history: VecDeque::with_capacity(lookback),
            history_start: 0,
            current: None,
        }
    }

    /// Position just after the last pushed sample.
    pub fn position(&self) -> u64 {
        self.history_start + self.history.len() as u64
    }

    /// Whether a VAD decides utterance boundaries (set once one is seen upstream).
    pub fn is_gated(&self) -> bool {
        self.gated
    }

    /// Switches to VAD-gated mode: audio outside speech boundaries is dropped.
    pub fn set_gated(&mut self) {
        if !self.gated {
            self.gated = true;
            self.current = None;
        }
    }

    pub fn in_utterance(&self) -> bool {
        self.current.is_some()
    }

    pub fn current(&self) -> Option<&Utterance> {
        self.current.as_ref()
    }

    pub fn reset(&mut self) {
        self.history.clear();
        self.history_start = 0;
        self.current = None;
    }

    /// Moves the position to `pos` without audio (a new stream, or a jump too long to fill).
    /// An open utterance that starts before `pos` is dropped; one that starts later is kept.
    pub fn seek(&mut self, pos: u64) {
        self.history.clear();
        self.history_start = pos;
        if self.current.as_ref().is_some_and(|u| u.start < pos) {
            self.current = None;
        }
    }

    /// Appends audio; returns utterances cut at the maximum length.
    pub fn push(&mut self, samples: &[f32]) -> Vec<Utterance> {
        let mut out = Vec::new();
        let mut rest = samples;
        while !rest.is_empty() {
            let pos = self.position();
            if self.current.is_none() && !self.gated {
                self.current = Some(Utterance {
                    start: pos,
                    samples: Vec::new(),
                });
            }
            // Audio before an utterance that starts later is history only.
            let skip = match &self.current {
                Some(u) if u.start > pos => ((u.start - pos) as usize).min(rest.len()),
                _ => 0,
            };
            if skip > 0 {
                self.append_history(&rest[..skip]);
                rest = &rest[skip..];
                continue;
            }
            let take = match &self.current {
                Some(u) => self.max_len.saturating_sub(u.samples.len()).min(rest.len()),
                None => rest.len(),
            };
            let (now, later) = rest.split_at(take);
            if let Some(u) = self.current.as_mut() {
                u.samples.extend_from_slice(now);
            }
            self.append_history(now);
            if let Some(u) = &self.current
                && u.samples.len() >= self.max_len
            {
                let full = self.current.take().expect("checked");
                let next = full.start + full.samples.len() as u64;
                out.push(full);
                if self.gated {
                    // Still in speech: the next utterance continues right after.
                    self.current = Some(Utterance {
                        start: next,
                        samples: Vec::new(),
                    });
                }
            }
            rest = later;
        }
        out
    }

    fn append_history(&mut self, samples: &[f32]) {
        self.history.extend(samples.iter().copied());
        let excess = self.history.len().saturating_sub(self.lookback);
        self.history.drain(..excess);
        self.history_start += excess as u64;
    }

    /// Opens an utterance at position `at`: in the look-back history (clamped to it), or ahead
    /// of what has been pushed (audio before it is then skipped).
    pub fn start(&mut self, at: u64) {
        if self.current.is_some() {
            return;
        }
        if at >= self.position() {
            self.current = Some(Utterance {
                start: at,
                samples: Vec::new(),
            });
            return;
        }
        // The look-back may not exceed the maximum length: keep its most recent part.
        let at = at
            .max(self.history_start)
            .max(self.position().saturating_sub(self.max_len as u64));
        let offset = (at - self.history_start) as usize;
        self.current = Some(Utterance {
            start: at,
            samples: self.history.range(offset..).copied().collect(),
        });
    }

    /// Closes the open utterance at position `at` (clamped to what has been pushed).
    pub fn end(&mut self, at: u64) -> Option<Utterance> {
        let mut u = self.current.take()?;
        let len = at.saturating_sub(u.start).min(u.samples.len() as u64) as usize;
        u.samples.truncate(len);
        (!u.samples.is_empty()).then_some(u)
    }

    /// Closes the open utterance at the end of the stream.
    pub fn finish(&mut self) -> Option<Utterance> {
        let at = self.position();
        self.end(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(from: u64, n: usize) -> Vec<f32> {
        (0..n).map(|i| (from + i as u64) as f32).collect()
    }

    #[test]
    fn gated_start_reaches_back_into_history() {
        let mut b = UtteranceBuffer::new(100, 1000);
        b.set_gated();
        assert!(b.push(&ramp(0, 300)).is_empty());
        b.start(250);
        b.push(&ramp(300, 100));
        let u = b.end(380).unwrap();
        assert_eq!(u.start, 250);
        assert_eq!(u.samples, ramp(250, 130));
        assert!(!b.in_utterance());
    }

    #[test]
    fn start_is_clamped_to_history() {
        let mut b = UtteranceBuffer::new(100, 1000);
        b.set_gated();
        b.push(&ramp(0, 300));
        b.start(10);
        assert_eq!(b.current().unwrap().start, 200);
    }

    #[test]
    fn start_ahead_of_the_audio_skips_to_it() {
        let mut b = UtteranceBuffer::new(100, 1000);
        b.set_gated();
        b.push(&ramp(0, 50));
        b.start(120);
        b.push(&ramp(50, 100));
        let u = b.end(140).unwrap();
        assert_eq!(u.start, 120);
        assert_eq!(u.samples, ramp(120, 20));
    }

    #[test]
    fn look_back_never_exceeds_max_len() {
        let mut b = UtteranceBuffer::new(1000, 100);
        b.set_gated();
        b.push(&ramp(0, 500));
        b.start(0);
        assert_eq!(b.current().unwrap().start, 400);
        let cut = b.push(&ramp(500, 10));
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].samples.len(), 100);
    }

    #[test]
    fn continuous_mode_cuts_at_max_len() {
        let mut b = UtteranceBuffer::new(10, 100);
        let cut = b.push(&ramp(0, 250));
        assert_eq!(cut.len(), 2);
        assert_eq!(cut[1].start, 100);
        assert_eq!(cut[1].samples, ramp(100, 100));
        let last = b.finish().unwrap();
        assert_eq!(last.start, 200);
        assert_eq!(last.samples.len(), 50);
    }

    #[test]
    fn gated_long_speech_is_split_and_continues() {
        let mut b = UtteranceBuffer::new(10, 100);
        b.set_gated();
        b.start(0);
        let cut = b.push(&ramp(0, 150));
        assert_eq!(cut.len(), 1);
        assert!(b.in_utterance());
        assert_eq!(b.end(150).unwrap().start, 100);
    }

    #[test]
    fn gated_silence_is_dropped() {
        let mut b = UtteranceBuffer::new(10, 100);
        b.set_gated();
        assert!(b.push(&ramp(0, 500)).is_empty());
        assert!(b.finish().is_none());
        assert_eq!(b.position(), 500);
    }
}
