//! A token bucket for log lines that peers can cause: a refused stream is worth a line at the
//! default level, but an attack (a scan of unknown node names, a flood of requests for a
//! forbidden port) must not turn the log into the attacker's megaphone. Lines past the bucket
//! are dropped and counted; the next line that gets through carries the count, so the operator
//! knows how many were lost.
//!
//! The clock is tokio's, so tests drive it with paused time.

use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// Burst of [`LogThrottle::default`]: lines written back to back before the rate applies.
pub const DEFAULT_BURST: u32 = 20;
/// Steady rate of [`LogThrottle::default`], in lines per second.
pub const DEFAULT_RATE: u32 = 10;

/// A token bucket: up to `burst` lines at once, then `rate` lines per second. Cheap to share
/// (one short lock per line); a process keeps one per kind of line it throttles.
#[derive(Debug)]
pub struct LogThrottle {
    burst: u32,
    /// Time one token takes to come back.
    period: Duration,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    tokens: u32,
    /// When the bucket last gained tokens (the start of the current period).
    refilled: Instant,
    /// Lines dropped since the last one that got through.
    suppressed: u64,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new(DEFAULT_BURST, DEFAULT_RATE)
    }
}

impl LogThrottle {
    /// A full bucket of `burst` lines refilled at `rate` lines per second (each at least 1).
    pub fn new(burst: u32, rate: u32) -> Self {
        let burst = burst.max(1);
        Self {
            burst,
            period: Duration::from_secs(1) / rate.max(1),
            state: Mutex::new(State {
                tokens: burst,
                refilled: Instant::now(),
                suppressed: 0,
            }),
        }
    }

    /// Takes a token for one line: `Some(n)` when the line may be written, `n` being the lines
    /// dropped since the last one written (report it on this line); `None` when the line must
    /// be dropped (it is counted).
    pub fn admit(&self) -> Option<u64> {
        // Every statement leaves the state consistent; a panic elsewhere cannot break it.
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let periods = now.saturating_duration_since(state.refilled).as_nanos()
            / self.period.as_nanos().max(1);
        if periods > 0 {
            let gained = u32::try_from(periods).unwrap_or(u32::MAX);
            state.tokens = state.tokens.saturating_add(gained).min(self.burst);
            // Keep the fraction of a period already elapsed; a bucket that was full for long
            // starts its next period now.
            state.refilled = if state.tokens == self.burst {
                now
            } else {
                state.refilled + self.period * gained
            };
        }
        if state.tokens == 0 {
            state.suppressed = state.suppressed.saturating_add(1);
            return None;
        }
        state.tokens -= 1;
        Some(std::mem::take(&mut state.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(throttle: &LogThrottle, lines: usize) -> Vec<Option<u64>> {
        (0..lines).map(|_| throttle.admit()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_passes_then_lines_are_dropped_and_counted() {
        let throttle = LogThrottle::new(3, 10);
        assert_eq!(admitted(&throttle, 3), vec![Some(0); 3]);
        assert_eq!(admitted(&throttle, 5), vec![None; 5]);
        // One period later one token is back, and its line reports the five dropped.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(throttle.admit(), Some(5));
        assert_eq!(throttle.admit(), None);
        tokio::time::advance(Duration::from_millis(100)).await;
        assert_eq!(throttle.admit(), Some(1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_held_to_the_rate() {
        let throttle = LogThrottle::default();
        let mut written = 0u64;
        let mut reported = 0u64;
        // 500 lines a second for ten seconds.
        for _ in 0..5000 {
            if let Some(n) = throttle.admit() {
                written += 1;
                reported += n;
            }
            tokio::time::advance(Duration::from_millis(2)).await;
        }
        // The burst, then ten a second (one more token may come back at the very end).
        let expected = u64::from(DEFAULT_BURST) + 10 * u64::from(DEFAULT_RATE);
        assert!(
            (expected - 1..=expected).contains(&written),
            "{written} lines written, {expected} expected"
        );
        // Every dropped line is accounted for on a later line, but for those dropped after the
        // last line written.
        assert!(reported + written <= 5000, "{reported} + {written}");
        assert!(5000 - (reported + written) < 250, "{reported} + {written}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_refills_to_its_burst_only() {
        let throttle = LogThrottle::new(4, 10);
        assert_eq!(admitted(&throttle, 4), vec![Some(0); 4]);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert_eq!(
            admitted(&throttle, 5),
            vec![Some(0), Some(0), Some(0), Some(0), None]
        );
        // The partial period after a full refill counts from the refill, not from long ago.
        tokio::time::advance(Duration::from_millis(99)).await;
        assert_eq!(throttle.admit(), None);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(throttle.admit(), Some(2));
    }
}
