//! Retention rounds: a task that, every interval, deletes what is older
//! than a retention period (auth housekeeping, search history). Shared here
//! so every such job waits, skips rounds while PostgreSQL is down and
//! computes its cutoff the same way.

use std::future::Future;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::Store;

/// The moment `retention` ago (the distant past if it is too long to
/// subtract).
pub fn cutoff(retention: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(retention)
        .ok()
        .and_then(|r| Utc::now().checked_sub_signed(r))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// Runs `round(cutoff)` every `every` (the first one `every` after the
/// start) while PostgreSQL is up, until the task is aborted; `round` logs
/// its own outcome.
pub fn spawn<F, Fut>(
    store: Store,
    every: Duration,
    retention: Duration,
    round: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(Store, DateTime<Utc>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if store.pg_state.is_up() {
                round(store.clone(), cutoff(retention)).await;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cutoff_is_that_long_ago_or_the_distant_past() {
        let c = cutoff(Duration::from_secs(3600));
        let ago = Utc::now() - c;
        assert!((3599..=3601).contains(&ago.num_seconds()), "{ago}");
        assert_eq!(cutoff(Duration::MAX), DateTime::<Utc>::MIN_UTC);
    }
}
