//! Speech/silence hysteresis over per-chunk speech probabilities (no model, no GStreamer).
//!
//! The rules follow Silero's own streaming iterator, plus a minimum speech length so that
//! coughs and clicks do not open an utterance:
//! - speech may start on a chunk with probability ≥ `threshold`; it is confirmed once it has
//!   lasted `min_speech` samples without a chunk below `neg_threshold`;
//! - confirmed speech ends after `min_silence` samples of chunks below `neg_threshold`
//!   (the hang-over); a chunk ≥ `threshold` cancels a pending end;
//! - the reported boundaries are placed where the evidence is, not where the decision was
//!   taken: speech starts at the beginning of the run of chunks ≥ `neg_threshold` that led to
//!   the first chunk ≥ `threshold` (Silero's probability rises over a few chunks at an onset),
//!   and ends at the end of the last chunk ≥ `threshold` (it decays slowly after speech);
//! - boundaries are reported padded by `speech_pad` on both sides;
//! - before speech is confirmed, its first chunk ≥ `threshold` is reported as an onset (unpadded,
//!   where the chunk starts), and a candidate that falls back to silence as cancelled: a live
//!   agent pauses its own voice at an onset and resumes it when the onset was only a cough;
//! - with `early_silence` (shorter than `min_silence`), confirmed speech followed by that much
//!   silence is reported as paused, at the place its end would be reported: a tentative end on
//!   which downstream may start work (transcribe, answer) before the end is confirmed. Speech
//!   coming back before the end is reported as resumed, and the work is to be dropped.
//!
//! Positions are sample offsets from the start of the stream.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectorConfig {
    pub threshold: f32,
    pub neg_threshold: f32,
    pub min_speech: u64,
    pub min_silence: u64,
    pub speech_pad: u64,
    /// Silence after which speech is reported paused (0: never).
    pub early_silence: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Boundary {
    /// Speech starts at this sample (padding included); probability of the opening chunk.
    Start { sample: u64, probability: f32 },
    /// Speech ended at this sample (padding included); mean probability of the utterance.
    End { sample: u64, probability: f32 },
    /// Possible speech from this sample on, not yet long enough to be confirmed.
    Onset { sample: u64, probability: f32 },
    /// The onset at `since` fell back to silence at `sample` before it was confirmed.
    Cancel { since: u64, sample: u64 },
    /// Speech paused long enough to be ending: if no speech comes back, the end will be
    /// reported at this same sample.
    Pause { sample: u64 },
    /// Speech came back at this sample after a pause: the pause was not the end.
    Resume { sample: u64 },
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
        /// End of the last chunk at or above the threshold.
        last_strong: u64,
        /// The pending silence was reported as a pause.
        paused: bool,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Detector {
    config: Option<DetectorConfig>,
    state: State,
    /// End of the last reported end boundary: a new start never goes before it.
    floor: u64,
    /// In silence: start of the current run of chunks at or above the negative threshold.
    rising_since: Option<u64>,
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
                if probability < c.neg_threshold {
                    self.rising_since = None;
                    return None;
                }
                let since = *self.rising_since.get_or_insert(offset);
                if probability >= c.threshold {
                    self.state = State::Candidate {
                        start: since,
                        probability,
                    };
                    self.rising_since = None;
                    self.prob_sum = 0.0;
                    self.prob_count = 0;
                    self.accumulate(probability);
                    return self.confirm(end).or(Some(Boundary::Onset {
                        sample: offset,
                        probability,
                    }));
                }
                None
            }
            State::Candidate { start, .. } => {
                if probability < c.neg_threshold {
                    self.state = State::Silence;
                    return Some(Boundary::Cancel {
                        since: start,
                        sample: offset,
                    });
                }
                self.accumulate(probability);
                self.confirm(end)
            }
            State::Speech {
                silence_since,
                last_strong,
                paused,
            } => {
                self.accumulate(probability);
                if probability >= c.threshold {
                    self.state = State::Speech {
                        silence_since: None,
                        last_strong: end,
                        paused: false,
                    };
                    return paused.then_some(Boundary::Resume { sample: offset });
                }
                if probability >= c.neg_threshold {
                    return None;
                }
                let since = silence_since.unwrap_or(offset);
                if end - since >= c.min_silence {
                    self.state = State::Silence;
                    self.rising_since = None;
                    let sample = last_strong + c.speech_pad;
                    self.floor = sample;
                    return Some(Boundary::End {
                        sample,
                        probability: self.mean(),
                    });
                }
                let pause = !paused && c.early_silence > 0 && end - since >= c.early_silence;
                self.state = State::Speech {
                    silence_since: Some(since),
                    last_strong,
                    paused: paused || pause,
                };
                pause.then_some(Boundary::Pause {
                    sample: last_strong + c.speech_pad,
                })
            }
        }
    }

    /// Ends open speech at `position` (end of stream).
    pub fn finish(&mut self, position: u64) -> Option<Boundary> {
        let State::Speech { last_strong, .. } = self.state else {
            self.state = State::Silence;
            return None;
        };
        self.state = State::Silence;
        self.rising_since = None;
        let sample = (last_strong + self.config().speech_pad).min(position);
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
            last_strong: end,
            paused: false,
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
            early_silence: 0,
        }
    }

    /// Every boundary, onsets and cancels included.
    fn run_all(probs: &[f32]) -> Vec<Boundary> {
        let mut d = Detector::new(config());
        let mut out: Vec<_> = probs
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| d.push(i as u64 * N, N, p))
            .collect();
        out.extend(d.finish(probs.len() as u64 * N));
        out
    }

    /// Starts and ends only.
    fn run(probs: &[f32]) -> Vec<Boundary> {
        run_all(probs)
            .into_iter()
            .filter(|b| matches!(b, Boundary::Start { .. } | Boundary::End { .. }))
            .collect()
    }

    #[test]
    fn onsets_come_first_and_blips_are_cancelled() {
        // A blip: onset at its first strong chunk, cancelled when it falls back.
        let mut p = vec![0.0; 10];
        p.extend(vec![0.9; 2]);
        p.extend(vec![0.0; 5]);
        assert_eq!(
            run_all(&p),
            [
                Boundary::Onset {
                    sample: 10 * N,
                    probability: 0.9
                },
                Boundary::Cancel {
                    since: 10 * N,
                    sample: 12 * N
                }
            ]
        );
        // Speech: onset, then the confirmed start (which reaches back), then the end.
        let mut p = vec![0.0; 10];
        p.extend(vec![0.9; 10]);
        p.extend(vec![0.0; 10]);
        let b = run_all(&p);
        assert!(
            matches!(b[0], Boundary::Onset { sample, .. } if sample == 10 * N),
            "{b:?}"
        );
        assert!(matches!(b[1], Boundary::Start { .. }), "{b:?}");
        assert!(matches!(b[2], Boundary::End { .. }), "{b:?}");
        assert_eq!(b.len(), 3);
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
            Boundary::End {
                sample,
                probability,
            } => {
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
        // Weak chunks after strong ones: the end is placed after the last strong chunk.
        assert_eq!(
            b[1],
            Boundary::End {
                sample: 10 * N + 100,
                probability: b[1].probability()
            }
        );
    }

    #[test]
    fn start_reaches_back_over_the_rising_run() {
        let mut p = vec![0.0; 10];
        p.extend([0.4, 0.4]);
        p.extend(vec![0.9; 10]);
        p.extend(vec![0.0; 20]);
        let b = run(&p);
        assert!(matches!(b[0], Boundary::Start { sample, .. } if sample == 10 * N - 100));
    }

    #[test]
    fn end_of_stream_closes_speech() {
        let b = run(&[0.9; 10]);
        assert_eq!(b.len(), 2);
        assert!(matches!(b[1], Boundary::End { sample, .. } if sample == 10 * N));
    }

    #[test]
    fn a_pause_comes_before_the_end_at_the_same_place() {
        let mut d = Detector::new(DetectorConfig {
            early_silence: 3 * N,
            ..config()
        });
        let mut p = vec![0.0; 10];
        p.extend(vec![0.9; 10]);
        // A pause that speech resumes after, then one that becomes the end.
        p.extend(vec![0.1; 4]);
        p.extend(vec![0.9; 5]);
        p.extend(vec![0.1; 12]);
        let b: Vec<_> = p
            .iter()
            .enumerate()
            .filter_map(|(i, &p)| d.push(i as u64 * N, N, p))
            .filter(|b| !matches!(b, Boundary::Onset { .. }))
            .collect();
        assert_eq!(b.len(), 5, "{b:?}");
        assert!(matches!(b[0], Boundary::Start { .. }), "{b:?}");
        assert_eq!(
            b[1],
            Boundary::Pause {
                sample: 20 * N + 100
            }
        );
        assert_eq!(b[2], Boundary::Resume { sample: 24 * N });
        assert_eq!(
            b[3],
            Boundary::Pause {
                sample: 29 * N + 100
            }
        );
        assert!(
            matches!(b[4], Boundary::End { sample, .. } if sample == 29 * N + 100),
            "{b:?}"
        );
        // Off by default: no pause at all.
        assert!(
            !run_all(&p)
                .iter()
                .any(|b| matches!(b, Boundary::Pause { .. }))
        );
    }

    impl Boundary {
        fn probability(&self) -> f32 {
            match *self {
                Boundary::Start { probability, .. }
                | Boundary::End { probability, .. }
                | Boundary::Onset { probability, .. } => probability,
                Boundary::Cancel { .. } | Boundary::Pause { .. } | Boundary::Resume { .. } => 0.0,
            }
        }
    }
}
