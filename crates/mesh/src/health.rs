//! `grpc.health.v1` per service, driven by dependency probes: a service is
//! SERVING while the dependencies it needs answer, NOT_SERVING while one
//! does not, and flips back by itself when it returns. The overall status
//! (service "") needs every configured dependency. On shutdown everything
//! turns NOT_SERVING first, so load balancers stop sending new calls.

use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use trellis_store::Store;

use crate::server::Needs;

/// The services whose health this server reports, with what each needs.
#[derive(Debug, Clone)]
pub struct HealthMap {
    pub reporter: HealthReporter,
    pub services: Vec<(String, Needs)>,
}

impl HealthMap {
    fn status_for(needs: Needs, pg_up: bool, redis_up: bool) -> ServingStatus {
        if (needs.database && !pg_up) || (needs.redis && !redis_up) {
            ServingStatus::NotServing
        } else {
            ServingStatus::Serving
        }
    }

    /// Sets every status from one probe result.
    pub async fn apply(&self, pg_up: bool, redis_up: bool) {
        let overall = if pg_up && redis_up {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", overall).await;
        for (name, needs) in &self.services {
            self.reporter
                .set_service_status(name, Self::status_for(*needs, pg_up, redis_up))
                .await;
        }
    }

    pub async fn all_not_serving(&self) {
        self.reporter
            .set_service_status("", ServingStatus::NotServing)
            .await;
        for (name, _) in &self.services {
            self.reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
    }
}

/// Probes the store every `interval` and updates health on change. Runs
/// until the task is aborted.
pub async fn watch_dependencies(map: HealthMap, store: Store, interval: Duration) {
    let timeout = interval.clamp(Duration::from_millis(500), Duration::from_secs(3));
    let mut last: Option<(bool, bool)> = None;
    loop {
        let now = store.probe(timeout).await;
        if last != Some(now) {
            let (pg_up, redis_up) = now;
            if last.is_some() || !(pg_up && redis_up) {
                tracing::warn!(database_up = pg_up, redis_up, "dependency health changed");
            }
            map.apply(pg_up, redis_up).await;
            last = Some(now);
        }
        tokio::time::sleep(interval).await;
    }
}
