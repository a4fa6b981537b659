//! Which hub an agent dials, and when: an ordered list of hubs (its region's first), a circuit
//! breaker per hub, exponential backoff with full jitter, and a return to the preferred hub
//! once it is healthy again. Sans I/O: time comes in as `now`, randomness as an RNG.
//!
//! A hub that fails a dial (or refuses the agent, or goes silent) has its breaker opened: it
//! is skipped for a while that doubles with each consecutive failure, so the agent moves to
//! the next hub at once and a dead hub is not hammered. When the while is over the hub may be
//! tried again (half-open); one success closes the breaker. Between attempts the agent waits
//! a backoff drawn uniformly from zero to a cap that doubles with consecutive failures (full
//! jitter), so agents that lost the same hub do not return in step.

use std::time::{Duration, Instant};

use rand::Rng;

/// Timing of hub selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailoverTiming {
    /// First backoff cap after a failure.
    pub backoff_initial: Duration,
    /// Largest backoff cap.
    pub backoff_max: Duration,
    /// How long a hub's breaker first stays open after a failure.
    pub breaker_open: Duration,
    /// Longest a breaker stays open.
    pub breaker_open_max: Duration,
    /// A connection that stayed up this long counts as healthy: backoff starts over.
    pub stable_after: Duration,
    /// While on a less preferred hub, how often to try the preferred ones again.
    pub probe_preferred_every: Duration,
}

impl Default for FailoverTiming {
    fn default() -> Self {
        Self {
            backoff_initial: Duration::from_millis(200),
            backoff_max: Duration::from_secs(15),
            breaker_open: Duration::from_secs(2),
            breaker_open_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(10),
            probe_preferred_every: Duration::from_secs(5),
        }
    }
}

/// One hub's circuit breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Breaker {
    /// Failures since the last success.
    failures: u32,
    /// While set and in the future, the hub is skipped.
    open_until: Option<Instant>,
}

/// Chooses the hub to dial among an ordered list.
#[derive(Debug, Clone)]
pub struct HubSelector {
    breakers: Vec<Breaker>,
    timing: FailoverTiming,
    /// Failures of any hub since a connection last proved stable.
    consecutive_failures: u32,
}

/// What the selector says to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dial {
    /// The hub, by its position in the list (0 is the most preferred).
    pub hub: usize,
    /// When to dial it.
    pub at: Instant,
}

impl HubSelector {
    /// A selector over `hubs` hubs in order of preference; at least one.
    pub fn new(hubs: usize, timing: FailoverTiming) -> Self {
        Self { breakers: vec![Breaker::default(); hubs.max(1)], timing, consecutive_failures: 0 }
    }

    /// Adds a hub, least preferred (one the connected hub advertised).
    pub fn add_hub(&mut self) {
        self.breakers.push(Breaker::default());
    }

    /// How many hubs the selector chooses among.
    pub fn len(&self) -> usize {
        self.breakers.len()
    }

    /// Always false: a selector has at least one hub.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Whether a hub's breaker lets a dial through at `now`.
    pub fn is_available(&self, hub: usize, now: Instant) -> bool {
        self.breakers.get(hub).is_some_and(|b| b.open_until.is_none_or(|until| until <= now))
    }

    /// The most preferred hub whose breaker is closed (or due to be tried again), dialed
    /// after `backoff`; if every breaker is open, the one that closes first, when it does.
    pub fn next(&self, now: Instant, backoff: Duration) -> Dial {
        let after_backoff = now + backoff;
        if let Some(hub) = (0..self.breakers.len()).find(|&hub| self.is_available(hub, now)) {
            return Dial { hub, at: after_backoff };
        }
        let (hub, reopens) = self
            .breakers
            .iter()
            .enumerate()
            .map(|(hub, b)| (hub, b.open_until.unwrap_or(now)))
            .min_by_key(|(hub, until)| (*until, *hub))
            .unwrap_or((0, now));
        Dial { hub, at: reopens.max(after_backoff) }
    }

    /// The wait before the next dial: uniform between zero and a cap that doubles with each
    /// consecutive failure (full jitter); none before the first dial or right after a stable
    /// connection.
    pub fn backoff(&self, rng: &mut impl Rng) -> Duration {
        if self.consecutive_failures == 0 {
            return Duration::ZERO;
        }
        let doublings = self.consecutive_failures.saturating_sub(1).min(20);
        let cap = self.timing.backoff_initial.saturating_mul(1 << doublings);
        let cap = cap.min(self.timing.backoff_max);
        rng.gen_range(Duration::ZERO..=cap)
    }

    /// A dial to `hub` succeeded: its breaker closes.
    pub fn on_connected(&mut self, hub: usize) {
        if let Some(breaker) = self.breakers.get_mut(hub) {
            *breaker = Breaker::default();
        }
    }

    /// A connection to `hub` ended after `uptime`. One that proved stable starts backoff over;
    /// one that died young counts as a failure of that hub.
    pub fn on_lost(&mut self, hub: usize, uptime: Duration, now: Instant) {
        if uptime >= self.timing.stable_after {
            self.consecutive_failures = 0;
            self.on_connected(hub);
        } else {
            self.on_failed(hub, now);
        }
    }

    /// A dial to `hub` failed, or the hub went silent: its breaker opens for a while that
    /// doubles with each consecutive failure of that hub.
    pub fn on_failed(&mut self, hub: usize, now: Instant) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        let timing = self.timing;
        let Some(breaker) = self.breakers.get_mut(hub) else { return };
        breaker.failures = breaker.failures.saturating_add(1);
        let doublings = breaker.failures.saturating_sub(1).min(20);
        let open = timing.breaker_open.saturating_mul(1 << doublings).min(timing.breaker_open_max);
        breaker.open_until = Some(now + open);
    }

    /// The hub refused the agent for now and said when to come back: it is skipped until then.
    pub fn on_refused(&mut self, hub: usize, retry_after: Duration, now: Instant) {
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if let Some(breaker) = self.breakers.get_mut(hub) {
            breaker.open_until = Some(now + retry_after);
        }
    }

    /// While connected to `current`, the more preferred hub worth trying now, if any.
    pub fn preferred_over(&self, current: usize, now: Instant) -> Option<usize> {
        (0..current.min(self.breakers.len())).find(|&hub| self.is_available(hub, now))
    }

    /// How often to look for a more preferred hub while connected to another.
    pub fn probe_every(&self) -> Duration {
        self.timing.probe_preferred_every
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    use super::*;

    fn timing() -> FailoverTiming {
        FailoverTiming {
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            breaker_open: Duration::from_secs(1),
            breaker_open_max: Duration::from_secs(8),
            stable_after: Duration::from_secs(10),
            probe_preferred_every: Duration::from_secs(5),
        }
    }

    #[test]
    fn the_preferred_hub_is_dialed_first_and_at_once() {
        let now = Instant::now();
        let selector = HubSelector::new(3, timing());
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(selector.backoff(&mut rng), Duration::ZERO);
        assert_eq!(selector.next(now, Duration::ZERO), Dial { hub: 0, at: now });
    }

    #[test]
    fn a_failed_hub_is_skipped_until_its_breaker_closes_and_the_wait_doubles() {
        let now = Instant::now();
        let mut selector = HubSelector::new(2, timing());
        selector.on_failed(0, now);
        assert_eq!(selector.next(now, Duration::ZERO).hub, 1, "moves to the next hub at once");
        assert_eq!(selector.preferred_over(1, now), None);
        let reopened = now + Duration::from_secs(1);
        assert_eq!(selector.preferred_over(1, reopened), Some(0), "tried again when half-open");
        // A second failure in a row keeps it open twice as long.
        selector.on_failed(0, reopened);
        assert!(!selector.is_available(0, reopened + Duration::from_millis(1999)));
        assert!(selector.is_available(0, reopened + Duration::from_secs(2)));
        // One success closes it.
        selector.on_connected(0);
        selector.on_failed(0, now);
        assert!(selector.is_available(0, now + Duration::from_secs(1)));
    }

    #[test]
    fn with_every_breaker_open_the_first_to_close_is_dialed_when_it_closes() {
        let now = Instant::now();
        let mut selector = HubSelector::new(2, timing());
        selector.on_failed(1, now);
        selector.on_failed(0, now + Duration::from_millis(300));
        let dial = selector.next(now + Duration::from_millis(400), Duration::ZERO);
        assert_eq!(dial, Dial { hub: 1, at: now + Duration::from_secs(1) });
    }

    #[test]
    fn a_refusal_holds_the_hub_back_for_as_long_as_it_asked() {
        let now = Instant::now();
        let mut selector = HubSelector::new(1, timing());
        selector.on_refused(0, Duration::from_millis(750), now);
        assert_eq!(selector.next(now, Duration::ZERO).at, now + Duration::from_millis(750));
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap_and_resets_after_a_stable_link() {
        let now = Instant::now();
        let mut selector = HubSelector::new(1, timing());
        let mut rng = StdRng::seed_from_u64(7);
        for failures in 1..=8u32 {
            selector.on_failed(0, now);
            let cap =
                Duration::from_millis(100 * (1 << (failures - 1))).min(Duration::from_secs(2));
            let draws: Vec<Duration> = (0..200).map(|_| selector.backoff(&mut rng)).collect();
            assert!(draws.iter().all(|d| *d <= cap), "failures {failures}");
            assert!(draws.iter().any(|d| *d < cap / 4), "jitter reaches low: {failures}");
            assert!(draws.iter().any(|d| *d > cap * 3 / 4), "jitter reaches high: {failures}");
        }
        selector.on_lost(0, Duration::from_secs(3), now);
        assert!(selector.backoff(&mut rng) > Duration::ZERO, "a young link is a failure");
        selector.on_lost(0, Duration::from_secs(10), now);
        assert_eq!(selector.backoff(&mut rng), Duration::ZERO);
    }
}
