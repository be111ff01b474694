//! streams-idle: many Converse streams held open at once, and trellisd's
//! resident memory with them.
//!
//! Each stream is opened with ChatService.Converse and made live with one
//! short turn (Send → Accepted, deltas, Completed, checked like every chat
//! turn), then left idle with both halves open: the server holds its
//! Converse task, its event channel and its HTTP/2 stream state. Streams
//! are spread over HTTP/2 connections ([`PER_CONNECTION`] each, as many
//! clients would share a connection behind a proxy) and opened a bounded
//! number at a time. trellisd's RSS (`VmRSS` in `/proc/<pid>/status`) is
//! read before the first stream opens, once half of them are open, once
//! they are all open and idle, and again after they are closed (the client
//! half-closes; the server ends each stream). The second half's growth is
//! the marginal cost of a stream, without the one-off growth the first
//! turns cause (pools, caches, allocator arenas); a run with fewer streams
//! than the target projects from it.

use std::time::Duration;

use futures::channel::mpsc;
use futures::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;
use tonic::Code;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;
use trellis_mesh::layers::metrics::code_name;
use trellis_proto::chat::v1::chat_event::Event as ChatEv;
use trellis_proto::chat::v1::chat_service_client::ChatServiceClient;
use trellis_proto::chat::v1::{ConverseRequest, ConverseResponse, Send, converse_request};

use crate::calls::{self, Rotation};
use crate::fakellm::{self, Script};
use crate::load::Outcome;

/// Streams per HTTP/2 connection.
pub const PER_CONNECTION: usize = 100;
/// Streams being opened (their turn running) at once.
pub const OPENING: usize = 32;
/// The target: trellisd's RSS at most this many MiB ...
pub const MAX_RSS_MB: f64 = 200.0;
/// ... with this many idle streams.
pub const TARGET_STREAMS: usize = 10_000;

/// What holding the streams measured.
#[derive(Debug, Clone, Default)]
pub struct IdleFacts {
    pub streams: usize,
    pub connections: usize,
    /// trellisd's RSS in KiB: before the first stream, with half of them
    /// open, with all of them open and idle, after they were closed.
    pub rss_before_kb: u64,
    pub rss_half_kb: u64,
    pub rss_with_kb: u64,
    pub rss_after_kb: u64,
    /// Time to open them all.
    pub opening: Duration,
}

impl IdleFacts {
    /// RSS growth per open stream, KiB, over all of them.
    pub fn per_stream_kb(&self) -> f64 {
        self.rss_with_kb.saturating_sub(self.rss_before_kb) as f64 / self.streams.max(1) as f64
    }

    /// RSS growth per stream of the second half, KiB: a stream's marginal
    /// cost.
    pub fn marginal_kb(&self) -> f64 {
        let second = self.streams - self.streams / 2;
        self.rss_with_kb.saturating_sub(self.rss_half_kb) as f64 / second.max(1) as f64
    }

    /// trellisd's RSS with [`TARGET_STREAMS`] streams, MiB: measured when
    /// that many were open, else projected from the measured RSS and the
    /// marginal cost of the streams missing.
    pub fn rss_at_target_mb(&self) -> f64 {
        let kb = if self.streams >= TARGET_STREAMS {
            self.rss_with_kb as f64
        } else {
            self.rss_with_kb as f64 + self.marginal_kb() * (TARGET_STREAMS - self.streams) as f64
        };
        kb / 1024.0
    }

    pub fn projected(&self) -> bool {
        self.streams < TARGET_STREAMS
    }
}

/// A process's resident set size in KiB (`VmRSS`).
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// An open stream: the request half (dropped to close it) and the
/// response half.
type Held = (
    mpsc::Sender<ConverseRequest>,
    tonic::Streaming<ConverseResponse>,
);

/// Opens one stream on `channel` and runs its turn in `session`.
async fn open(
    channel: Channel,
    bearer: MetadataValue<Ascii>,
    session: String,
) -> Result<Held, Code> {
    let (mut tx, rx) = mpsc::channel(4);
    tx.send(ConverseRequest {
        action: Some(converse_request::Action::Send(Send {
            session_id: session,
            content: fakellm::PROMPT.to_string(),
            ..Default::default()
        })),
    })
    .await
    .map_err(|_| Code::Internal)?;
    let mut req = tonic::Request::new(rx);
    req.metadata_mut().insert("authorization", bearer);
    let mut inbound = ChatServiceClient::new(channel)
        .converse(req)
        .await
        .map_err(|s| s.code())?
        .into_inner();
    let mut events = Vec::new();
    while let Some(m) = inbound.message().await.map_err(|s| s.code())? {
        let e = m.event.ok_or(Code::DataLoss)?;
        let last = matches!(e.event, Some(ChatEv::Completed(_) | ChatEv::Failed(_)));
        events.push(e);
        if last {
            break;
        }
    }
    calls::check_chat(&events, Script::SHORT)?;
    Ok((tx, inbound))
}

/// Opens `streams` streams to `addr` as the holder of `bearer`, each in
/// the next session of `sessions`; measures trellisd (`pid`) with them.
/// The outcome's latencies are each stream's opening (its turn included).
pub async fn run(
    addr: std::net::SocketAddr,
    pid: u32,
    bearer: MetadataValue<Ascii>,
    sessions: Rotation<String>,
    streams: usize,
    call_timeout: Duration,
) -> anyhow::Result<(Outcome, IdleFacts)> {
    let connections = streams.div_ceil(PER_CONNECTION).max(1);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(calls::grpc_channel(addr).await?);
    }
    let open_range = |range: std::ops::Range<usize>| {
        futures::stream::iter(range)
            .map(|i| {
                let channel = channels[i % connections].clone();
                let bearer = bearer.clone();
                let session = sessions.take().1.clone();
                async move {
                    let started = Instant::now();
                    let r = tokio::time::timeout(call_timeout, open(channel, bearer, session))
                        .await
                        .unwrap_or(Err(Code::DeadlineExceeded));
                    (r, started.elapsed())
                }
            })
            .buffer_unordered(OPENING)
            .collect::<Vec<(Result<Held, Code>, Duration)>>()
    };
    // Settle: earlier scenarios' work finished, their memory returned.
    let settle = Duration::from_millis(500);
    tokio::time::sleep(settle).await;
    let rss_before_kb = rss_kb(pid).unwrap_or(0);
    let t0 = Instant::now();
    let mut opened = open_range(0..streams / 2).await;
    let first_half = t0.elapsed();
    tokio::time::sleep(settle).await;
    let rss_half_kb = rss_kb(pid).unwrap_or(0);
    let t1 = Instant::now();
    opened.extend(open_range(streams / 2..streams).await);
    let opening = first_half + t1.elapsed();
    let mut outcome = Outcome::new();
    let mut held = Vec::with_capacity(streams);
    for (r, took) in opened {
        match r {
            Ok(h) => {
                outcome.ok += 1;
                let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
                outcome.latency.saturating_record(ns.max(1));
                held.push(h);
            }
            Err(code) => *outcome.errors.entry(code_name(code)).or_default() += 1,
        }
    }
    outcome.last_done = Some(Instant::now());
    // Idle, all open: let the turns' finalisation and flushes settle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_with_kb = rss_kb(pid).unwrap_or(0);
    // Every stream must still be open: the server has not ended any.
    let mut ended = 0u64;
    for (_, inbound) in &mut held {
        // Polled once: a message, an error or the end means not idle.
        if tokio::time::timeout(Duration::ZERO, inbound.next())
            .await
            .is_ok()
        {
            ended += 1;
        }
    }
    if ended > 0 {
        *outcome.errors.entry("STREAM_ENDED_WHILE_IDLE").or_default() += ended;
    }
    let n = held.len();
    drop(held);
    drop(channels);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after_kb = rss_kb(pid).unwrap_or(0);
    Ok((
        outcome,
        IdleFacts {
            streams: n,
            connections,
            rss_before_kb,
            rss_half_kb,
            rss_with_kb,
            rss_after_kb,
            opening,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_rss() {
        assert!(rss_kb(std::process::id()).is_some_and(|kb| kb > 0));
    }

    #[test]
    fn projects_to_the_target_count() {
        // 1,000 KiB for the first 100 (warm-up included), 400 for the next.
        let f = IdleFacts {
            streams: 200,
            rss_before_kb: 50 * 1024,
            rss_half_kb: 50 * 1024 + 1000,
            rss_with_kb: 50 * 1024 + 1400,
            ..IdleFacts::default()
        };
        assert!((f.per_stream_kb() - 7.0).abs() < 1e-9);
        assert!((f.marginal_kb() - 4.0).abs() < 1e-9);
        assert!(f.projected());
        let want = (50.0 * 1024.0 + 1400.0 + 4.0 * (TARGET_STREAMS - 200) as f64) / 1024.0;
        assert!((f.rss_at_target_mb() - want).abs() < 1e-9);
        let full = IdleFacts {
            streams: TARGET_STREAMS,
            rss_before_kb: 1024,
            rss_with_kb: 100 * 1024,
            ..IdleFacts::default()
        };
        assert!(!full.projected());
        assert!((full.rss_at_target_mb() - 100.0).abs() < 1e-9);
    }
}
