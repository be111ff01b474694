//! Replies being generated: this replica's registry (content so far, an
//! event broadcast for the streams that started them, a stop switch), and
//! the Redis fan-out that lets any replica watch or cancel a reply: events
//! of message M are published on `<prefix>chat:msg:M`, cancellations on
//! `<prefix>chat:cancel`. Each process follows both through one shared
//! pub/sub connection (the [`Hub`]), with a bounded broadcast per watched
//! reply: a watcher that falls behind is told it lagged and catches up from
//! the stored content.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use prost::Message as _;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{broadcast, mpsc, watch};
use trellis_proto::chat::v1 as pb;
use trellis_store::Store;
use uuid::Uuid;

use crate::error::ChatError;

/// Why a generation should stop early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Cancel,
    /// The server is shutting down.
    Interrupt,
}

/// A reply being generated on this replica.
#[derive(Debug)]
pub struct Live {
    pub content: Mutex<String>,
    pub events: broadcast::Sender<pb::ChatEvent>,
    pub stop: watch::Sender<Option<Stop>>,
}

impl Live {
    pub fn content(&self) -> String {
        self.content
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// This replica's replies in progress.
#[derive(Debug, Default)]
pub struct Registry {
    map: Mutex<HashMap<Uuid, Arc<Live>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<Live>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers reply `id`; the receiver is subscribed before anything is
    /// published.
    pub fn add(&self, id: Uuid, buffer: usize) -> (Arc<Live>, broadcast::Receiver<pb::ChatEvent>) {
        let (events, rx) = broadcast::channel(buffer.max(16));
        let (stop, _) = watch::channel(None);
        let live = Arc::new(Live {
            content: Mutex::new(String::new()),
            events,
            stop,
        });
        self.lock().insert(id, live.clone());
        (live, rx)
    }

    pub fn get(&self, id: Uuid) -> Option<Arc<Live>> {
        self.lock().get(&id).cloned()
    }

    pub fn remove(&self, id: Uuid) {
        self.lock().remove(&id);
    }

    /// The replies generating here.
    pub fn ids(&self) -> Vec<Uuid> {
        self.lock().keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stops reply `id` if it runs here.
    pub fn stop(&self, id: Uuid, why: Stop) -> bool {
        match self.get(id) {
            Some(live) => {
                live.stop.send_replace(Some(why));
                true
            }
            None => false,
        }
    }

    /// Stops every reply (shutdown).
    pub fn stop_all(&self, why: Stop) {
        for live in self.lock().values() {
            live.stop.send_replace(Some(why));
        }
    }
}

/// Events queued for publishing before a reply's generation waits.
const PUBLISH_QUEUE: usize = 4096;
/// Most PUBLISH commands sent in one pipeline.
const PUBLISH_BATCH: usize = 256;

/// Publishing and subscribing across replicas.
#[derive(Debug, Clone)]
pub struct Fanout {
    store: Store,
    /// Reply events, published in order by [`Fanout::publisher`]: a reply's
    /// generation does not wait for Redis, and events queued together go
    /// out in one pipeline (one round trip) rather than one each.
    queue: mpsc::Sender<(String, Vec<u8>)>,
}

impl Fanout {
    /// Needs a tokio runtime: it starts the publishing task, which ends
    /// when the last clone is dropped.
    pub fn new(store: Store) -> Fanout {
        let (queue, rx) = mpsc::channel(PUBLISH_QUEUE);
        tokio::spawn(Self::publisher(store.clone(), rx));
        Fanout { store, queue }
    }

    async fn publisher(store: Store, mut rx: mpsc::Receiver<(String, Vec<u8>)>) {
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        while rx.recv_many(&mut batch, PUBLISH_BATCH).await > 0 {
            let mut pipe = redis::pipe();
            for (channel, payload) in batch.drain(..) {
                pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
            }
            let sent = match store.redis_shared().await {
                Ok(mut conn) => pipe
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(ChatError::from),
                Err(e) => Err(e.into()),
            };
            if let Err(e) = sent {
                // Watchers on other replicas catch up from the stored
                // content; a broken connection is replaced on the next use.
                store.redis_shared_reset().await;
                tracing::warn!(error = %e, "could not publish chat events");
            }
        }
    }

    pub fn message_channel(&self, id: Uuid) -> String {
        self.store.key(&format!("chat:msg:{id}"))
    }

    pub fn cancel_channel(&self) -> String {
        self.store.key("chat:cancel")
    }

    async fn publish_bytes(&self, channel: String, payload: Vec<u8>) -> Result<(), ChatError> {
        let mut conn = self.store.redis_shared().await?;
        let result: Result<(), redis::RedisError> = redis::cmd("PUBLISH")
            .arg(channel)
            .arg(payload)
            .query_async(&mut conn)
            .await;
        if let Err(e) = result {
            // A broken connection is replaced on the next publish.
            self.store.redis_shared_reset().await;
            return Err(e.into());
        }
        Ok(())
    }

    /// Queues an event of reply `id` for publishing, in order; waits only
    /// while the queue is full. Failures are logged (watchers on other
    /// replicas then catch up from the stored content).
    pub async fn publish(&self, id: Uuid, event: &pb::ChatEvent) {
        let item = (self.message_channel(id), event.encode_to_vec());
        if self.queue.send(item).await.is_err() {
            tracing::warn!("chat event publisher has stopped");
        }
    }

    pub async fn publish_cancel(&self, id: Uuid) -> Result<(), ChatError> {
        self.publish_bytes(self.cancel_channel(), id.to_string().into_bytes())
            .await
    }
}

/// This process's one pub/sub connection: the cancel feed and every
/// watched reply's channel, subscribed while someone watches it.
#[derive(Debug)]
pub struct Hub {
    fanout: Fanout,
    registry: Arc<Registry>,
    cancel_channel: String,
    buffer: usize,
    /// None while disconnected. Held across (un)subscribe commands, so
    /// they are ordered with the map below.
    sink: tokio::sync::Mutex<Option<PubSubSink>>,
    up: watch::Sender<bool>,
    channels: Mutex<HashMap<String, broadcast::Sender<pb::ChatEvent>>>,
}

/// Reply events from the [`Hub`]; unsubscribes when the last watcher of
/// the reply drops its subscription.
#[derive(Debug)]
pub struct Subscription {
    hub: Arc<Hub>,
    channel: String,
    rx: Option<broadcast::Receiver<pb::ChatEvent>>,
}

impl Subscription {
    /// The next event; `Lagged` when this watcher fell behind (catch up
    /// from the stored content).
    pub async fn recv(&mut self) -> Result<pb::ChatEvent, broadcast::error::RecvError> {
        match self.rx.as_mut() {
            Some(rx) => rx.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.rx = None;
        let idle = {
            let mut map = self.hub.lock_channels();
            match map.get(&self.channel) {
                Some(tx) if tx.receiver_count() == 0 => {
                    map.remove(&self.channel);
                    true
                }
                _ => false,
            }
        };
        if !idle {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let hub = self.hub.clone();
        let channel = std::mem::take(&mut self.channel);
        rt.spawn(async move {
            let mut sink = hub.sink.lock().await;
            // Watched again meanwhile: keep the subscription.
            let wanted = hub.lock_channels().contains_key(&channel);
            if let (false, Some(sink)) = (wanted, sink.as_mut()) {
                let _ = sink.unsubscribe(&channel).await;
            }
        });
    }
}

impl Hub {
    pub fn new(fanout: Fanout, registry: Arc<Registry>, buffer: usize) -> Arc<Hub> {
        Arc::new(Hub {
            cancel_channel: fanout.cancel_channel(),
            fanout,
            registry,
            buffer: buffer.max(16),
            sink: tokio::sync::Mutex::new(None),
            up: watch::channel(false).0,
            channels: Mutex::new(HashMap::new()),
        })
    }

    fn lock_channels(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<pb::ChatEvent>>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps the connection up (reconnecting after errors, re-subscribing
    /// what is watched) and dispatches what arrives.
    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                match me.connect().await {
                    Ok(mut stream) => {
                        while let Some(msg) = stream.next().await {
                            me.dispatch(&msg);
                        }
                        tracing::warn!("chat live feed interrupted; reconnecting");
                    }
                    Err(e) => tracing::warn!(error = %e, "chat live feed unavailable; retrying"),
                }
                *me.sink.lock().await = None;
                me.up.send_replace(false);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    async fn connect(&self) -> Result<PubSubStream, ChatError> {
        let pubsub = self.fanout.store.redis_client()?.get_async_pubsub().await?;
        let (mut sink, stream) = pubsub.split();
        let mut held = self.sink.lock().await;
        sink.subscribe(&self.cancel_channel).await?;
        let watched: Vec<String> = self.lock_channels().keys().cloned().collect();
        if !watched.is_empty() {
            sink.subscribe(&watched).await?;
        }
        *held = Some(sink);
        self.up.send_replace(true);
        Ok(stream)
    }

    fn dispatch(&self, msg: &redis::Msg) {
        let channel = msg.get_channel_name();
        if channel == self.cancel_channel {
            if let Some(id) = msg
                .get_payload::<String>()
                .ok()
                .and_then(|s| Uuid::parse_str(&s).ok())
            {
                self.registry.stop(id, Stop::Cancel);
            }
            return;
        }
        let Some(event) = msg
            .get_payload::<Vec<u8>>()
            .ok()
            .and_then(|b| pb::ChatEvent::decode(b.as_slice()).ok())
        else {
            return;
        };
        if let Some(tx) = self.lock_channels().get(channel) {
            let _ = tx.send(event);
        }
    }

    /// Follows reply `id`'s events; subscribed (confirmed by Redis) when
    /// this returns, so nothing published afterwards is missed.
    pub async fn subscribe(self: &Arc<Self>, id: Uuid) -> Result<Subscription, ChatError> {
        let unavailable = || ChatError::Upstream(trellis_core::error::unavailable("redis"));
        if !self.fanout.store.has_redis() {
            return Err(unavailable());
        }
        let mut up = self.up.subscribe();
        let connected = tokio::time::timeout(Duration::from_secs(2), up.wait_for(|u| *u))
            .await
            .is_ok_and(|r| r.is_ok());
        if !connected {
            return Err(unavailable());
        }
        let channel = self.fanout.message_channel(id);
        let mut held = self.sink.lock().await;
        let Some(sink) = held.as_mut() else {
            return Err(unavailable());
        };
        let (rx, fresh) = {
            let mut map = self.lock_channels();
            match map.get(&channel) {
                Some(tx) => (tx.subscribe(), false),
                None => {
                    let (tx, rx) = broadcast::channel(self.buffer);
                    map.insert(channel.clone(), tx);
                    (rx, true)
                }
            }
        };
        let sub = Subscription {
            hub: self.clone(),
            channel,
            rx: Some(rx),
        };
        if fresh {
            sink.subscribe(&sub.channel).await?;
        }
        Ok(sub)
    }
}
