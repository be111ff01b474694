//! The gateway's Prometheus metrics, registered in the server's registry
//! (served at `/metrics` with everything else).

use std::sync::Arc;

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts};

use crate::breaker::Breaker;

#[derive(Debug, Clone)]
pub struct LlmMetrics {
    /// Upstream call duration by provider and outcome.
    pub upstream: HistogramVec,
    /// Time to first token by provider.
    pub ttft: HistogramVec,
    /// Tokens by provider and kind (prompt, completion).
    pub tokens: IntCounterVec,
    /// Cost in micro-dollars by provider.
    pub cost: IntCounterVec,
    /// Failovers away from a provider, by reason.
    pub failovers: IntCounterVec,
    /// Breaker state by provider: 0 closed, 1 open, 2 half-open; set from
    /// the breakers at each scrape by [`BreakerGauge`].
    breaker: IntGaugeVec,
}

/// The breaker gauge, read from the breakers when scraped, so that it is
/// right without waiting for a call (an open breaker whose cool-down has
/// ended shows half-open).
struct BreakerGauge {
    gauge: IntGaugeVec,
    breakers: Vec<(String, Arc<Breaker>)>,
}

impl Collector for BreakerGauge {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        for (name, b) in &self.breakers {
            self.gauge
                .with_label_values(&[name.as_str()])
                .set(b.state().gauge());
        }
        self.gauge.collect()
    }
}

impl LlmMetrics {
    pub fn new() -> LlmMetrics {
        let buckets = vec![
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ];
        LlmMetrics {
            upstream: HistogramVec::new(
                HistogramOpts::new(
                    "llm_upstream_duration_seconds",
                    "Upstream chat-completions calls by provider and outcome",
                )
                .buckets(buckets.clone()),
                &["provider", "outcome"],
            )
            .expect("static metric"),
            ttft: HistogramVec::new(
                HistogramOpts::new(
                    "llm_time_to_first_token_seconds",
                    "Time from the upstream request to its first token",
                )
                .buckets(buckets),
                &["provider"],
            )
            .expect("static metric"),
            tokens: IntCounterVec::new(
                Opts::new("llm_tokens_total", "Tokens by provider and kind"),
                &["provider", "kind"],
            )
            .expect("static metric"),
            cost: IntCounterVec::new(
                Opts::new("llm_cost_micros_total", "Cost in micro-dollars by provider"),
                &["provider"],
            )
            .expect("static metric"),
            failovers: IntCounterVec::new(
                Opts::new(
                    "llm_failovers_total",
                    "Calls that left a provider for the next one, by reason",
                ),
                &["provider", "reason"],
            )
            .expect("static metric"),
            breaker: IntGaugeVec::new(
                Opts::new(
                    "llm_breaker_state",
                    "Circuit breaker per provider: 0 closed, 1 open, 2 half-open",
                ),
                &["provider"],
            )
            .expect("static metric"),
        }
    }

    /// Everything to register with the server's registry; `breakers` by
    /// provider name feed the breaker gauge.
    pub fn collectors(&self, breakers: Vec<(String, Arc<Breaker>)>) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.upstream.clone()),
            Box::new(self.ttft.clone()),
            Box::new(self.tokens.clone()),
            Box::new(self.cost.clone()),
            Box::new(self.failovers.clone()),
            Box::new(BreakerGauge {
                gauge: self.breaker.clone(),
                breakers,
            }),
        ]
    }
}

impl Default for LlmMetrics {
    fn default() -> Self {
        Self::new()
    }
}
