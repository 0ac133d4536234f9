//! Per-node circuit breakers.
//!
//! A node that keeps failing (it cannot be reached, it is unavailable, it times out)
//! is not asked again on every call: after [`BreakerConfig::consecutive_failures`]
//! failures in a row, or a failure rate of at least [`BreakerConfig::failure_rate`]
//! over [`BreakerConfig::window`] (once [`BreakerConfig::min_calls`] calls were seen),
//! its breaker **opens** and calls to it fail at once with
//! [`ClientError::CircuitOpen`](crate::ClientError::CircuitOpen) (never sent, so
//! retryable even for writes). After a cool-down (jittered, doubling while probes keep
//! failing, up to [`BreakerConfig::max_open`]) it is **half-open**: one probe call at a
//! time goes through; a success closes the breaker, a failure opens it again.
//!
//! Only failures that say something about the node count: a node that answers
//! `NOT_LEADER` or "key too large" is healthy. The state machine is synchronous code
//! over an injected [`Instant`], so it is tested without sleeping.

use crate::error::ClientError;
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// When a node's breaker opens and how long it stays open.
#[derive(Debug, Clone, PartialEq)]
pub struct BreakerConfig {
    /// Open after this many failures in a row (0 disables the breaker).
    pub consecutive_failures: u32,
    /// Open when at least this share of the calls in the window failed (0 < r <= 1).
    pub failure_rate: f64,
    /// The window of the failure rate.
    pub window: Duration,
    /// The failure rate counts only once the window holds this many calls.
    pub min_calls: u32,
    /// The first cool-down before a half-open probe (drawn within ±20 %).
    pub open_for: Duration,
    /// The longest cool-down (it doubles after each failed probe).
    pub max_open: Duration,
}

impl Default for BreakerConfig {
    /// Open after 5 failures in a row or ≥ 50 % of ≥ 20 calls in 10 s; probe after
    /// 250 ms, backing off to 2 s (so a node that comes back is used again within about
    /// 2.4 s, even after a long outage).
    fn default() -> Self {
        BreakerConfig {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: Duration::from_secs(10),
            min_calls: 20,
            open_for: Duration::from_millis(250),
            max_open: Duration::from_secs(2),
        }
    }
}

/// The state of one node's breaker, as reported by [`Client::breakers`](crate::Client::breakers).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls fail at once until the cool-down ends.
    Open,
    /// One probe call at a time goes through.
    HalfOpen,
}

impl BreakerState {
    /// The state as a metric value: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> f64 {
        match self {
            BreakerState::Closed => 0.0,
            BreakerState::Open => 1.0,
            BreakerState::HalfOpen => 2.0,
        }
    }
}

/// Whether an error says the node itself is failing.
pub(crate) fn is_node_failure(error: &ClientError) -> bool {
    matches!(
        error,
        ClientError::Unreachable(_)
            | ClientError::Unavailable(_)
            | ClientError::Timeout(_)
            | ClientError::Connect { .. }
    )
}

/// One node's breaker.
#[derive(Debug, Clone)]
struct Breaker {
    state: BreakerState,
    /// Failures in a row.
    streak: u32,
    /// Calls and failures in the current window, and when it started.
    window_start: Instant,
    calls: u32,
    failures: u32,
    /// Open: when the next probe may go. Half-open: whether a probe is out.
    reopen_at: Instant,
    probing: bool,
    /// The cool-down used the last time it opened.
    cool_down: Duration,
}

impl Breaker {
    fn new(now: Instant) -> Breaker {
        Breaker {
            state: BreakerState::Closed,
            streak: 0,
            window_start: now,
            calls: 0,
            failures: 0,
            reopen_at: now,
            probing: false,
            cool_down: Duration::ZERO,
        }
    }

    fn admit(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed => true,
            BreakerState::Open if now >= self.reopen_at => {
                self.state = BreakerState::HalfOpen;
                self.probing = true;
                true
            }
            BreakerState::Open => false,
            BreakerState::HalfOpen if !self.probing => {
                self.probing = true;
                true
            }
            BreakerState::HalfOpen => false,
        }
    }

    /// Records an outcome; true when this call opened the breaker.
    fn record(&mut self, config: &BreakerConfig, failed: bool, now: Instant, jitter: f64) -> bool {
        if now.duration_since(self.window_start) >= config.window {
            self.window_start = now;
            self.calls = 0;
            self.failures = 0;
        }
        self.calls += 1;
        if failed {
            self.failures += 1;
            self.streak += 1;
        } else {
            self.streak = 0;
        }
        match self.state {
            BreakerState::HalfOpen => {
                self.probing = false;
                if failed {
                    let next = (self.cool_down * 2).min(config.max_open);
                    self.open(next, now, jitter);
                    return true;
                }
                self.state = BreakerState::Closed;
                self.calls = 0;
                self.failures = 0;
                self.window_start = now;
                false
            }
            BreakerState::Closed if failed => {
                let by_streak = self.streak >= config.consecutive_failures;
                let by_rate = self.calls >= config.min_calls
                    && f64::from(self.failures) >= config.failure_rate * f64::from(self.calls);
                if by_streak || by_rate {
                    self.open(config.open_for, now, jitter);
                    return true;
                }
                false
            }
            // A late answer of a call admitted before the breaker opened.
            BreakerState::Closed | BreakerState::Open => false,
        }
    }

    fn open(&mut self, cool_down: Duration, now: Instant, jitter: f64) {
        self.state = BreakerState::Open;
        self.cool_down = cool_down;
        self.reopen_at = now + cool_down.mul_f64(jitter);
        self.probing = false;
    }
}

/// The breakers of a client, by node address.
#[derive(Debug)]
pub(crate) struct Breakers {
    config: BreakerConfig,
    nodes: Mutex<HashMap<String, Breaker>>,
}

impl Breakers {
    pub(crate) fn new(config: BreakerConfig) -> Breakers {
        Breakers {
            config,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    fn enabled(&self) -> bool {
        self.config.consecutive_failures > 0
    }

    /// Whether a call to `addr` may go now (a half-open breaker lets one probe through).
    ///
    /// # Errors
    /// [`ClientError::CircuitOpen`] when it may not.
    pub(crate) fn admit(&self, addr: &str, now: Instant) -> Result<(), ClientError> {
        if !self.enabled() {
            return Ok(());
        }
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let breaker = nodes
            .entry(addr.to_owned())
            .or_insert_with(|| Breaker::new(now));
        if breaker.admit(now) {
            Ok(())
        } else {
            Err(ClientError::CircuitOpen(addr.to_owned()))
        }
    }

    /// Records the outcome of an admitted call to `addr`.
    pub(crate) fn record<T>(&self, addr: &str, outcome: &Result<T, ClientError>, now: Instant) {
        if !self.enabled() {
            return;
        }
        let failed = outcome.as_ref().err().is_some_and(is_node_failure);
        let jitter = rand::rng().random_range(0.8..=1.2);
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let breaker = nodes
            .entry(addr.to_owned())
            .or_insert_with(|| Breaker::new(now));
        let before = breaker.state;
        if breaker.record(&self.config, failed, now, jitter) {
            tracing::warn!(node = addr, "circuit breaker opened");
            metrics::counter!("raftcache_client_breaker_opened_total").increment(1);
        } else if before != BreakerState::Closed && breaker.state == BreakerState::Closed {
            tracing::info!(node = addr, "circuit breaker closed");
        }
        metrics::gauge!("raftcache_client_breaker_state", "node" => addr.to_owned())
            .set(breaker.state.as_gauge());
    }

    /// Every known node's breaker state (an open breaker whose cool-down ended shows as
    /// half-open).
    pub(crate) fn states(&self, now: Instant) -> Vec<(String, BreakerState)> {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let mut states: Vec<(String, BreakerState)> = nodes
            .iter()
            .map(|(addr, b)| {
                let state = match b.state {
                    BreakerState::Open if now >= b.reopen_at => BreakerState::HalfOpen,
                    state => state,
                };
                (addr.clone(), state)
            })
            .collect();
        states.sort_by(|a, b| a.0.cmp(&b.0));
        states
    }

    /// `addr` answered a request that does not go through the breaker (a cluster-map
    /// fetch): an open breaker may probe at once instead of waiting out its cool-down,
    /// so a node that comes back after a long outage is used again within one retry.
    pub(crate) fn node_answered(&self, addr: &str, now: Instant) {
        let mut nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = nodes.get_mut(addr) {
            if b.state == BreakerState::Open {
                b.reopen_at = b.reopen_at.min(now);
            }
        }
    }

    /// Forgets every breaker (the client follows another cluster now: what the old
    /// one's nodes did says nothing about the new one's).
    pub(crate) fn reset(&self) {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Whether `addr`'s breaker is open now (cool-down not over).
    pub(crate) fn is_open(&self, addr: &str, now: Instant) -> bool {
        let nodes = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        nodes
            .get(addr)
            .is_some_and(|b| b.state == BreakerState::Open && now < b.reopen_at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail() -> Result<(), ClientError> {
        Err(ClientError::Unreachable("refused".into()))
    }

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            window: Duration::from_secs(10),
            min_calls: 10,
            open_for: Duration::from_millis(100),
            max_open: Duration::from_millis(400),
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_the_cool_down() {
        let b = Breakers::new(config());
        let t0 = Instant::now();
        for _ in 0..2 {
            b.admit("n1", t0).unwrap();
            b.record("n1", &fail(), t0);
        }
        assert!(!b.is_open("n1", t0), "two failures do not open it");
        b.admit("n1", t0).unwrap();
        b.record("n1", &fail(), t0);
        assert!(b.is_open("n1", t0));
        assert_eq!(
            b.admit("n1", t0),
            Err(ClientError::CircuitOpen("n1".into()))
        );
        // Other nodes are unaffected.
        b.admit("n2", t0).unwrap();
        // After the (jittered, at most +20 %) cool-down one probe goes through.
        let later = t0 + Duration::from_millis(121);
        b.admit("n1", later).unwrap();
        assert!(b.admit("n1", later).is_err(), "one probe at a time");
        b.record("n1", &Ok(()), later);
        assert_eq!(b.states(later)[0], ("n1".into(), BreakerState::Closed));
        b.admit("n1", later).unwrap();
    }

    #[test]
    fn a_node_that_answers_a_map_fetch_is_probed_at_once() {
        let b = Breakers::new(config());
        let t0 = Instant::now();
        for _ in 0..3 {
            b.admit("n1", t0).unwrap();
            b.record("n1", &fail(), t0);
        }
        assert!(b.admit("n1", t0).is_err());
        b.node_answered("n1", t0);
        b.node_answered("unknown", t0);
        b.admit("n1", t0).unwrap();
        assert!(b.admit("n1", t0).is_err(), "still one probe at a time");
        b.record("n1", &Ok(()), t0);
        b.admit("n1", t0).unwrap();
    }

    #[test]
    fn a_failed_probe_doubles_the_cool_down_up_to_the_cap() {
        let b = Breakers::new(config());
        let mut now = Instant::now();
        for _ in 0..3 {
            b.admit("n1", now).unwrap();
            b.record("n1", &fail(), now);
        }
        let mut cool_downs = Vec::new();
        for _ in 0..4 {
            // Find when the probe is admitted, in 10 ms steps.
            let opened = now;
            while b.admit("n1", now).is_err() {
                now += Duration::from_millis(10);
            }
            cool_downs.push(now.duration_since(opened).as_millis());
            b.record("n1", &fail(), now);
        }
        // 100, 200, 400, 400 ms, each within ±20 % (and the 10 ms step).
        for (got, want) in cool_downs.iter().zip([100u128, 200, 400, 400]) {
            assert!(
                *got >= want * 8 / 10 && *got <= want * 12 / 10 + 10,
                "{cool_downs:?}"
            );
        }
    }

    #[test]
    fn opens_on_the_failure_rate_and_ignores_answers_from_healthy_nodes() {
        let b = Breakers::new(config());
        let t0 = Instant::now();
        // Alternate: never three in a row, but half of the calls fail (the last one
        // too: the rate is looked at on a failure).
        for i in 0..10 {
            b.admit("n1", t0).unwrap();
            if i % 2 == 1 {
                b.record("n1", &fail(), t0);
            } else {
                b.record("n1", &Ok(()), t0);
            }
        }
        assert!(b.is_open("n1", t0));
        // NOT_LEADER, key too large: the node answered, so it is healthy.
        for _ in 0..20 {
            b.admit("n2", t0).unwrap();
            b.record::<()>(
                "n2",
                &Err(ClientError::NotLeader {
                    partition: Some(1),
                    leader_id: None,
                    leader_addr: None,
                }),
                t0,
            );
        }
        assert!(!b.is_open("n2", t0));
    }

    #[test]
    fn the_rate_window_restarts() {
        let b = Breakers::new(config());
        let t0 = Instant::now();
        for i in 0..9 {
            b.admit("n1", t0).unwrap();
            let outcome = if i % 2 == 0 { fail() } else { Ok(()) };
            b.record("n1", &outcome, t0);
        }
        // The window ends before the 10th call: the rate starts over.
        let t1 = t0 + Duration::from_secs(11);
        b.admit("n1", t1).unwrap();
        b.record("n1", &fail(), t1);
        assert!(!b.is_open("n1", t1));
    }

    #[test]
    fn disabled_with_zero_failures() {
        let b = Breakers::new(BreakerConfig {
            consecutive_failures: 0,
            ..config()
        });
        let t0 = Instant::now();
        for _ in 0..100 {
            b.admit("n1", t0).unwrap();
            b.record("n1", &fail(), t0);
        }
        assert!(b.admit("n1", t0).is_ok());
    }
}
