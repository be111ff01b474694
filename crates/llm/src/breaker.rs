//! A circuit breaker per provider. Closed, it lets every call through and
//! counts consecutive failures; at `threshold` it opens and the provider is
//! skipped for `cooldown`; then one probe call goes through (half-open):
//! its success closes the breaker, its failure opens it again.
//!
//! Per process on purpose: a breaker reacts to what this replica sees, and
//! needs no round trip to decide.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    /// The gauge value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// A probe is in flight; everyone else is turned away.
    HalfOpen,
}

#[derive(Debug)]
pub struct Breaker {
    inner: Mutex<Inner>,
    threshold: u32,
    cooldown: Duration,
}

/// Permission to call the provider. `probe` marks the half-open trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admit {
    pub probe: bool,
}

impl Breaker {
    pub fn new(threshold: u32, cooldown: Duration) -> Breaker {
        Breaker {
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            threshold: threshold.max(1),
            cooldown,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a call may go to the provider now.
    pub fn admit(&self) -> Option<Admit> {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => Some(Admit { probe: false }),
            Inner::Open { until } if Instant::now() >= until => {
                *inner = Inner::HalfOpen;
                Some(Admit { probe: true })
            }
            Inner::Open { .. } | Inner::HalfOpen => None,
        }
    }

    pub fn success(&self) {
        *self.lock() = Inner::Closed { failures: 0 };
    }

    pub fn failure(&self) {
        let mut inner = self.lock();
        *inner = match *inner {
            Inner::Closed { failures } if failures + 1 < self.threshold => Inner::Closed {
                failures: failures + 1,
            },
            _ => Inner::Open {
                until: Instant::now() + self.cooldown,
            },
        };
    }

    /// A probe ended without a verdict (the caller went away): let the
    /// next call probe again.
    pub fn abandon_probe(&self) {
        let mut inner = self.lock();
        if matches!(*inner, Inner::HalfOpen) {
            *inner = Inner::Open {
                until: Instant::now(),
            };
        }
    }

    /// How long an open breaker keeps turning calls away (zero once a
    /// probe may go; None when closed or probing).
    pub fn retry_in(&self) -> Option<Duration> {
        match *self.lock() {
            Inner::Open { until } => Some(until.saturating_duration_since(Instant::now())),
            _ => None,
        }
    }

    /// The state as metrics show it: an open breaker whose cool-down has
    /// ended is half-open (the next call probes).
    pub fn state(&self) -> State {
        match *self.lock() {
            Inner::Closed { .. } => State::Closed,
            Inner::Open { until } if Instant::now() < until => State::Open,
            Inner::Open { .. } | Inner::HalfOpen => State::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_threshold_and_probes_after_cooldown() {
        let b = Breaker::new(3, Duration::from_millis(30));
        for _ in 0..2 {
            assert!(b.admit().is_some());
            b.failure();
        }
        assert_eq!(b.state(), State::Closed);
        b.failure();
        assert_eq!(b.state(), State::Open);
        assert!(b.admit().is_none(), "open breaker turns calls away");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.state(), State::HalfOpen, "cool-down over: half-open");
        assert_eq!(b.admit(), Some(Admit { probe: true }));
        assert_eq!(b.state(), State::HalfOpen);
        assert!(b.admit().is_none(), "one probe at a time");
        b.failure();
        assert_eq!(b.state(), State::Open, "a failed probe reopens");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(b.admit(), Some(Admit { probe: true }));
        b.success();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(), Some(Admit { probe: false }));
    }

    #[test]
    fn success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(60));
        b.failure();
        b.success();
        b.failure();
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let b = Breaker::new(1, Duration::from_millis(1));
        b.failure();
        std::thread::sleep(Duration::from_millis(5));
        assert!(b.admit().is_some_and(|a| a.probe));
        b.abandon_probe();
        assert!(b.admit().is_some_and(|a| a.probe));
    }
}
