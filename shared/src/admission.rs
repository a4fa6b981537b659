//! Admission of connecting agents at a bounded rate, so that a hub restart does not turn into
//! a reconnect storm: a token bucket refills at `rate_per_s` up to `burst`; an agent that
//! finds it empty is told how long until a token is free, spread over the queue already told
//! to wait so that refused agents do not all return at the same instant. Sans I/O.

use std::time::{Duration, Instant};

/// A token bucket for new connections.
#[derive(Debug, Clone)]
pub struct Admission {
    rate_per_s: f64,
    burst: f64,
    tokens: f64,
    refilled_at: Option<Instant>,
    /// Refusals in the current second, which spread the retry times handed out.
    refused_recently: u32,
    refused_window_start: Option<Instant>,
}

impl Admission {
    /// Admits `rate_per_s` connections per second on average, up to `burst` at once.
    /// A rate of zero admits everyone.
    pub fn new(rate_per_s: u32, burst: u32) -> Self {
        Self {
            rate_per_s: f64::from(rate_per_s),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            refilled_at: None,
            refused_recently: 0,
            refused_window_start: None,
        }
    }

    /// Admits a connection at `now`, or says after how long to try again.
    pub fn try_admit(&mut self, now: Instant) -> Result<(), Duration> {
        if self.rate_per_s <= 0.0 {
            return Ok(());
        }
        let elapsed =
            self.refilled_at.map_or(0.0, |at| now.saturating_duration_since(at).as_secs_f64());
        self.tokens = (self.tokens + elapsed * self.rate_per_s).min(self.burst);
        self.refilled_at = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if self.refused_window_start.is_none_or(|start| now >= start + Duration::from_secs(1)) {
            self.refused_window_start = Some(now);
            self.refused_recently = 0;
        }
        self.refused_recently = self.refused_recently.saturating_add(1);
        // The refused queue drains at the admission rate: the n-th refused agent of this
        // second comes back when n tokens have been refilled.
        let needed = (1.0 - self.tokens) + f64::from(self.refused_recently - 1);
        Err(Duration::from_secs_f64(needed / self.rate_per_s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_admitted_then_the_rate_applies() {
        let now = Instant::now();
        let mut admission = Admission::new(10, 5);
        for _ in 0..5 {
            assert_eq!(admission.try_admit(now), Ok(()));
        }
        let retry = admission.try_admit(now).unwrap_err();
        assert!(retry > Duration::ZERO && retry <= Duration::from_millis(100), "{retry:?}");
        assert_eq!(admission.try_admit(now + Duration::from_millis(100)), Ok(()));
    }

    #[test]
    fn refused_agents_are_spread_over_the_time_the_queue_takes_to_drain() {
        let now = Instant::now();
        let mut admission = Admission::new(100, 1);
        assert_eq!(admission.try_admit(now), Ok(()));
        let retries: Vec<Duration> =
            (0..200).map(|_| admission.try_admit(now).unwrap_err()).collect();
        assert!(retries.windows(2).all(|w| w[0] < w[1]), "each later than the last");
        let last = retries[retries.len() - 1];
        assert!(
            last >= Duration::from_millis(1990) && last <= Duration::from_millis(2010),
            "{last:?}"
        );
    }

    #[test]
    fn admitted_connections_never_exceed_burst_plus_rate_times_time() {
        let start = Instant::now();
        let mut admission = Admission::new(50, 20);
        let mut admitted = 0u32;
        for ms in 0..3000u64 {
            for _ in 0..5 {
                if admission.try_admit(start + Duration::from_millis(ms)).is_ok() {
                    admitted += 1;
                }
            }
        }
        assert!(admitted <= 20 + 50 * 3, "{admitted}");
        assert!(admitted >= 50 * 3, "{admitted}");
    }

    #[test]
    fn a_zero_rate_admits_everyone() {
        let now = Instant::now();
        let mut admission = Admission::new(0, 0);
        assert!((0..1000).all(|_| admission.try_admit(now).is_ok()));
    }
}
