//! A circuit breaker for a backend that keeps failing (an LLM server, a speech service): no
//! GStreamer types.

use std::time::{Duration, Instant};

/// Skips a failing backend for a while: after `threshold` failures in a row it opens for
/// `backoff`, doubling (up to `max_backoff`) each time it opens again without a success between.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    base: Duration,
    max_backoff: Duration,
    failures: u32,
    opened: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    pub fn new(threshold: u32, backoff: Duration) -> Self {
        Self {
            threshold: threshold.max(1),
            base: backoff,
            max_backoff: backoff * 16,
            failures: 0,
            opened: 0,
            open_until: None,
        }
    }

    /// Whether the backend may be called now.
    pub fn allows(&self, now: Instant) -> bool {
        self.open_until.is_none_or(|until| now >= until)
    }

    pub fn is_open(&self, now: Instant) -> bool {
        !self.allows(now)
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.opened = 0;
        self.open_until = None;
    }

    /// Counts a failure; returns the back-off if this opened the breaker.
    pub fn failure(&mut self, now: Instant) -> Option<Duration> {
        self.failures += 1;
        if self.failures < self.threshold {
            return None;
        }
        let backoff = (self.base * 2u32.saturating_pow(self.opened)).min(self.max_backoff);
        self.opened += 1;
        self.failures = 0;
        self.open_until = Some(now + backoff);
        Some(backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_repeated_failures_and_backs_off() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(10));
        assert_eq!(b.failure(t0), None);
        assert_eq!(b.failure(t0), None);
        assert_eq!(b.failure(t0), Some(Duration::from_secs(10)));
        assert!(b.is_open(t0 + Duration::from_secs(9)));
        assert!(b.allows(t0 + Duration::from_secs(10)));
        // Failing again right after the back-off doubles it.
        let t1 = t0 + Duration::from_secs(10);
        b.failure(t1);
        b.failure(t1);
        assert_eq!(b.failure(t1), Some(Duration::from_secs(20)));
        b.success();
        assert!(b.allows(t1));
        b.failure(t1);
        b.failure(t1);
        assert_eq!(b.failure(t1), Some(Duration::from_secs(10)));
    }
}
