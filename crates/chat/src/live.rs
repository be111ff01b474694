//! Replies being generated: this replica's registry (content so far, an
//! event broadcast for the streams that started them, a stop switch), and
//! the Redis fan-out that lets any replica watch or cancel a reply: events
//! of message M are published on `<prefix>chat:msg:M`, cancellations on
//! `<prefix>chat:cancel`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use prost::Message as _;
use tokio::sync::{broadcast, watch};
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

/// Publishing and subscribing across replicas.
#[derive(Debug, Clone)]
pub struct Fanout {
    store: Store,
}

impl Fanout {
    pub fn new(store: Store) -> Fanout {
        Fanout { store }
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

    /// Publishes an event of reply `id`; failures are logged (watchers on
    /// other replicas then catch up from the stored content).
    pub async fn publish(&self, id: Uuid, event: &pb::ChatEvent) {
        if let Err(e) = self
            .publish_bytes(self.message_channel(id), event.encode_to_vec())
            .await
        {
            tracing::warn!(error = %e, "could not publish a chat event");
        }
    }

    pub async fn publish_cancel(&self, id: Uuid) -> Result<(), ChatError> {
        self.publish_bytes(self.cancel_channel(), id.to_string().into_bytes())
            .await
    }

    /// A subscription to reply `id`'s events.
    pub async fn subscribe(
        &self,
        id: Uuid,
    ) -> Result<impl futures::Stream<Item = pb::ChatEvent> + Send + use<>, ChatError> {
        let mut pubsub = self.store.redis_client()?.get_async_pubsub().await?;
        pubsub.subscribe(self.message_channel(id)).await?;
        Ok(pubsub.into_on_message().filter_map(|msg| async move {
            let bytes: Vec<u8> = msg.get_payload().ok()?;
            pb::ChatEvent::decode(bytes.as_slice()).ok()
        }))
    }

    /// Follows cancellations published anywhere and stops the matching
    /// local replies; reconnects after errors.
    pub fn spawn_cancel_listener(&self, registry: Arc<Registry>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = me.listen_cancels(&registry).await {
                    tracing::warn!(error = %e, "chat cancel feed interrupted; reconnecting");
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    }

    async fn listen_cancels(&self, registry: &Registry) -> Result<(), ChatError> {
        let mut pubsub = self.store.redis_client()?.get_async_pubsub().await?;
        pubsub.subscribe(self.cancel_channel()).await?;
        let mut messages = pubsub.on_message();
        while let Some(msg) = messages.next().await {
            if let Some(id) = msg
                .get_payload::<String>()
                .ok()
                .and_then(|s| Uuid::parse_str(&s).ok())
            {
                registry.stop(id, Stop::Cancel);
            }
        }
        Ok(())
    }
}
