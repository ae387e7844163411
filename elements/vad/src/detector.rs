//! Speech/silence hysteresis over per-chunk speech probabilities (no model, no GStreamer).
//!
//! The rules follow Silero's own streaming iterator, plus a minimum speech length so that
//! coughs and clicks do not open an utterance:
//! - speech may start on a chunk with probability ≥ `threshold`; it is confirmed once it has
//!   lasted `min_speech` samples without a chunk below `neg_threshold`;
//! - confirmed speech ends after `min_silence` samples of chunks below `neg_threshold`
//!   (the hang-over); a chunk ≥ `threshold` cancels a pending end;
//! - boundaries are reported padded by `speech_pad` on both sides.
//!
//! Positions are sample offsets from the start of the stream.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorConfig {
    pub threshold: f32,
    pub neg_threshold: f32,
    pub min_speech: u64,
    pub min_silence: u64,
    pub speech_pad: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Boundary {
    /// Speech starts at this sample (padding included); probability of the opening chunk.
    Start { sample: u64, probability: f32 },
    /// Speech ended at this sample (padding included); mean probability of the utterance.
    End { sample: u64, probability: f32 },
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
enum State {
    #[default]
    Silence,
    /// Above threshold since `start`, not yet long enough.
    Candidate { start: u64, probability: f32 },
    Speech {
        /// Where the current run of silence began, if one is pending.
        silence_since: Option<u64>,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Detector {
    config: Option<DetectorConfig>,
    state: State,
    /// End of the last reported end boundary: a new start never goes before it.
    floor: u64,
    prob_sum: f64,
    prob_count: u64,
}

impl Detector {
    pub fn new(config: DetectorConfig) -> Self {
        Self {
            config: Some(config),
            ..Default::default()
        }
    }

    pub fn config(&self) -> DetectorConfig {
        self.config.expect("detector built with new()")
    }

    pub fn in_speech(&self) -> bool {
        matches!(self.state, State::Speech { .. })
    }

    pub fn reset(&mut self) {
        *self = Self::new(self.config());
    }

    /// Feeds the probability of the chunk covering samples `[offset, offset + len)`.
    pub fn push(&mut self, offset: u64, len: u64, probability: f32) -> Option<Boundary> {
        let c = self.config();
        let end = offset + len;
        match self.state {
            State::Silence => {
                if probability >= c.threshold {
                    self.state = State::Candidate {
                        start: offset,
                        probability,
                    };
                    self.prob_sum = 0.0;
                    self.prob_count = 0;
                    self.accumulate(probability);
                    return self.confirm(end);
                }
                None
            }
            State::Candidate { .. } => {
                if probability < c.neg_threshold {
                    self.state = State::Silence;
                    return None;
                }
                self.accumulate(probability);
                self.confirm(end)
            }
            State::Speech { silence_since } => {
                self.accumulate(probability);
                if probability >= c.threshold {
                    self.state = State::Speech {
                        silence_since: None,
                    };
                    return None;
                }
                if probability >= c.neg_threshold {
                    return None;
                }
                let since = silence_since.unwrap_or(offset);
                if end - since >= c.min_silence {
                    self.state = State::Silence;
                    let sample = since + c.speech_pad;
                    self.floor = sample;
                    return Some(Boundary::End {
                        sample,
                        probability: self.mean(),
                    });
                }
                self.state = State::Speech {
                    silence_since: Some(since),
                };
                None
            }
        }
    }

    /// Ends open speech at `position` (end of stream).
    pub fn finish(&mut self, position: u64) -> Option<Boundary> {
        let was_speech = self.in_speech();
        let since = match self.state {
            State::Speech { silence_since } => silence_since,
            _ => None,
        };
        self.state = State::Silence;
        if !was_speech {
            return None;
        }
        let sample = since
            .map(|s| (s + self.config().speech_pad).min(position))
            .unwrap_or(position);
        self.floor = sample;
        Some(Boundary::End {
            sample,
            probability: self.mean(),
        })
    }

    fn confirm(&mut self, end: u64) -> Option<Boundary> {
        let State::Candidate { start, probability } = self.state else {
            return None;
        };
        let c = self.config();
        if end - start < c.min_speech.max(1) {
            return None;
        }
        self.state = State::Speech {
            silence_since: None,
        };
        Some(Boundary::Start {
            sample: start.saturating_sub(c.speech_pad).max(self.floor),
            probability,
        })
    }

    fn accumulate(&mut self, p: f32) {
        self.prob_sum += f64::from(p);
        self.prob_count += 1;
    }

    fn mean(&self) -> f32 {
        if self.prob_count == 0 {
            0.0
        } else {
            (self.prob_sum / self.prob_count as f64) as f32
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: u64 = 512;

    fn config() -> DetectorConfig {
        DetectorConfig {
            threshold: 0.5,
            neg_threshold: 0.35,
            min_speech: 4 * N,
            min_silence: 8 * N,
            speech_pad: 100,
        }
    }

    fn run(probs: &[f32]) -> Vec<Boundary> {
        let mut d = Detector::new(config());
        let mut out: Vec<_> = probs
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| d.push(i as u64 * N, N, p))
            .collect();
        out.extend(d.finish(probs.len() as u64 * N));
        out
    }

    #[test]
    fn one_utterance_with_padding() {
        let mut p = vec![0.0; 10];
        p.extend(vec![0.9; 20]);
        p.extend(vec![0.0; 20]);
        let b = run(&p);
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[0],
            Boundary::Start {
                sample: 10 * N - 100,
                probability: 0.9
            }
        );
        match b[1] {
            Boundary::End { sample, probability } => {
                assert_eq!(sample, 30 * N + 100);
                assert!(probability > 0.5 && probability < 0.9);
            }
            _ => panic!("expected end"),
        }
    }

    #[test]
    fn short_blip_is_not_speech() {
        let mut p = vec![0.0; 10];
        p.extend(vec![0.9; 2]);
        p.extend(vec![0.0; 20]);
        assert!(run(&p).is_empty());
    }

    #[test]
    fn short_pause_does_not_split() {
        let mut p = vec![0.9; 10];
        p.extend(vec![0.1; 5]);
        p.extend(vec![0.9; 10]);
        p.extend(vec![0.1; 10]);
        let b = run(&p);
        assert_eq!(b.len(), 2, "{b:?}");
    }

    #[test]
    fn between_thresholds_keeps_state() {
        let mut p = vec![0.9; 10];
        p.extend(vec![0.4; 30]);
        let b = run(&p);
        assert_eq!(b.len(), 2);
        assert_eq!(b[1], Boundary::End { sample: 40 * N, probability: b[1].probability() });
    }

    #[test]
    fn end_of_stream_closes_speech() {
        let b = run(&[0.9; 10]);
        assert_eq!(b.len(), 2);
        assert!(matches!(b[1], Boundary::End { sample, .. } if sample == 10 * N));
    }

    impl Boundary {
        fn probability(&self) -> f32 {
            match *self {
                Boundary::Start { probability, .. } | Boundary::End { probability, .. } => {
                    probability
                }
            }
        }
    }
}
