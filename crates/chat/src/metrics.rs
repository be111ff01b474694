//! Chat metrics, registered in the server's registry.

use prometheus::core::Collector;
use prometheus::{Histogram, HistogramOpts, IntGauge};

#[derive(Debug, Clone)]
pub struct ChatMetrics {
    /// Open Converse, SendMessage, RegenerateMessage and WatchMessage streams.
    pub active_streams: IntGauge,
    /// Replies being generated on this replica.
    pub generating: IntGauge,
    pub ttft: Histogram,
    pub tokens_per_second: Histogram,
}

impl ChatMetrics {
    pub fn new() -> ChatMetrics {
        ChatMetrics {
            active_streams: IntGauge::new("chat_active_streams", "Open chat streams")
                .expect("static metric"),
            generating: IntGauge::new("chat_generating", "Replies being generated here")
                .expect("static metric"),
            ttft: Histogram::with_opts(
                HistogramOpts::new(
                    "chat_time_to_first_token_seconds",
                    "From a turn's acceptance to its first token",
                )
                .buckets(vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
            )
            .expect("static metric"),
            tokens_per_second: Histogram::with_opts(
                HistogramOpts::new(
                    "chat_tokens_per_second",
                    "Completion tokens per second after the first token",
                )
                .buckets(vec![
                    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0,
                ]),
            )
            .expect("static metric"),
        }
    }

    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.active_streams.clone()),
            Box::new(self.generating.clone()),
            Box::new(self.ttft.clone()),
            Box::new(self.tokens_per_second.clone()),
        ]
    }
}

impl Default for ChatMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts a stream as active while it lives.
#[derive(Debug)]
pub struct StreamGuard(IntGauge);

impl StreamGuard {
    pub fn new(g: &IntGauge) -> StreamGuard {
        g.inc();
        StreamGuard(g.clone())
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}
