//! Per-user quotas in Redis, shared by every replica: requests per minute,
//! tokens per day, cost per month and concurrent streams. One Lua script
//! checks every quota and takes a request slot and a stream lease in one
//! atomic step before the upstream is called; tokens and cost are charged
//! when the call ends. Windows are calendar windows in UTC (minute, day,
//! month), so `reset_time` is exact. A stream lease is a sorted-set member
//! that expires on its own, so a crashed replica cannot leak concurrency.

use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use trellis_core::config::{LimitsConfig, LlmConfig};
use trellis_store::Store;
use uuid::Uuid;

use crate::error::LlmError;

/// The quotas that apply to a user holding `roles`: per quota, the most
/// generous among the roles listed in `role_limits` (0, unlimited, wins),
/// or `default_limits` when none is listed.
pub fn effective(config: &LlmConfig, roles: &[String]) -> LimitsConfig {
    let listed: Vec<&LimitsConfig> = roles
        .iter()
        .filter_map(|r| config.role_limits.get(r))
        .collect();
    if listed.is_empty() {
        return config.default_limits;
    }
    let best = |f: fn(&LimitsConfig) -> u64| {
        let values: Vec<u64> = listed.iter().map(|l| f(l)).collect();
        if values.contains(&0) {
            0
        } else {
            values.into_iter().max().unwrap_or(0)
        }
    };
    LimitsConfig {
        requests_per_minute: best(|l| l.requests_per_minute),
        tokens_per_day: best(|l| l.tokens_per_day),
        cost_micros_per_month: best(|l| l.cost_micros_per_month),
        concurrent_streams: best(|l| l.concurrent_streams),
    }
}

/// The Redis keys and window ends of one user at one instant.
struct Windows {
    rpm: String,
    tokens: String,
    cost: String,
    streams: String,
    minute_end: DateTime<Utc>,
    day_end: DateTime<Utc>,
    month_end: DateTime<Utc>,
}

impl Windows {
    fn at(store: &Store, user: Uuid, now: DateTime<Utc>) -> Windows {
        let minute_start = now
            .with_second(0)
            .and_then(|t| t.with_nanosecond(0))
            .unwrap_or(now);
        let day_start = Utc
            .with_ymd_and_hms(now.year(), now.month(), now.day(), 0, 0, 0)
            .single()
            .unwrap_or(now);
        let (ny, nm) = if now.month() == 12 {
            (now.year() + 1, 1)
        } else {
            (now.year(), now.month() + 1)
        };
        let month_end = Utc
            .with_ymd_and_hms(ny, nm, 1, 0, 0, 0)
            .single()
            .unwrap_or(now);
        Windows {
            rpm: store.key(&format!(
                "llm:rpm:{user}:{}",
                minute_start.format("%Y%m%d%H%M")
            )),
            tokens: store.key(&format!("llm:tok:{user}:{}", now.format("%Y%m%d"))),
            cost: store.key(&format!("llm:cost:{user}:{}", now.format("%Y%m"))),
            streams: store.key(&format!("llm:streams:{user}")),
            minute_end: minute_start + chrono::Duration::minutes(1),
            day_end: day_start + chrono::Duration::days(1),
            month_end,
        }
    }
}

fn until(t: DateTime<Utc>, now: DateTime<Utc>) -> Duration {
    (t - now).to_std().unwrap_or(Duration::from_secs(1))
}

const ACQUIRE: &str = r#"
-- KEYS: rpm, tokens, cost, streams
-- ARGV: rpm limit, rpm ttl ms, token limit, cost limit, stream limit,
--       now ms, lease expiry ms, lease id
local now = tonumber(ARGV[6])
local tok_limit = tonumber(ARGV[3])
if tok_limit > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= tok_limit then
  return {2, 0}
end
local cost_limit = tonumber(ARGV[4])
if cost_limit > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= cost_limit then
  return {3, 0}
end
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local stream_limit = tonumber(ARGV[5])
if stream_limit > 0 and redis.call('ZCARD', KEYS[4]) >= stream_limit then
  return {4, 0}
end
local rpm_limit = tonumber(ARGV[1])
if rpm_limit > 0 and tonumber(redis.call('GET', KEYS[1]) or '0') >= rpm_limit then
  return {1, 0}
end
if redis.call('INCR', KEYS[1]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
redis.call('ZADD', KEYS[4], ARGV[7], ARGV[8])
redis.call('PEXPIREAT', KEYS[4], ARGV[7])
return {0, 0}
"#;

/// A held stream lease; give it back with [`Limiter::release`].
#[derive(Debug, Clone)]
pub struct Lease {
    pub user: Uuid,
    pub id: String,
}

/// The quota checks of the gateway.
#[derive(Debug, Clone)]
pub struct Limiter {
    store: Store,
    script: redis::Script,
}

impl Limiter {
    pub fn new(store: Store) -> Limiter {
        Limiter {
            store,
            script: redis::Script::new(ACQUIRE),
        }
    }

    /// A Redis error; a broken shared connection is dropped so that the
    /// next call dials again.
    fn broken(&self, e: redis::RedisError) -> LlmError {
        if e.is_io_error() || e.is_connection_dropped() || e.is_unrecoverable_error() {
            let store = self.store.clone();
            tokio::spawn(async move { store.redis_shared_reset().await });
        }
        LlmError::Redis(e)
    }

    /// Checks every quota and takes a request slot and a stream lease for
    /// `lease_for` (how long the call may run at most).
    pub async fn acquire(
        &self,
        user: Uuid,
        limits: &LimitsConfig,
        lease_for: Duration,
    ) -> Result<Lease, LlmError> {
        let now = Utc::now();
        let w = Windows::at(&self.store, user, now);
        let lease = Lease {
            user,
            id: Uuid::now_v7().to_string(),
        };
        let now_ms = now.timestamp_millis();
        let mut conn = self.store.redis_shared().await?;
        let (code, _): (i64, i64) = self
            .script
            .key(&w.rpm)
            .key(&w.tokens)
            .key(&w.cost)
            .key(&w.streams)
            .arg(limits.requests_per_minute)
            .arg(until(w.minute_end, now).as_millis() as u64 + 1000)
            .arg(limits.tokens_per_day)
            .arg(limits.cost_micros_per_month)
            .arg(limits.concurrent_streams)
            .arg(now_ms)
            .arg(now_ms + lease_for.as_millis() as i64)
            .arg(&lease.id)
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        match code {
            0 => Ok(lease),
            1 => Err(LlmError::Quota {
                quota: "requests_per_minute",
                description: format!("at most {} requests per minute", limits.requests_per_minute),
                retry_after: until(w.minute_end, now),
            }),
            2 => Err(LlmError::Quota {
                quota: "tokens_per_day",
                description: format!("at most {} tokens per day", limits.tokens_per_day),
                retry_after: until(w.day_end, now),
            }),
            3 => Err(LlmError::Quota {
                quota: "cost_micros_per_month",
                description: format!(
                    "monthly budget of {} micro-dollars used up",
                    limits.cost_micros_per_month
                ),
                retry_after: until(w.month_end, now),
            }),
            _ => Err(LlmError::Quota {
                quota: "concurrent_streams",
                description: format!("at most {} generations at once", limits.concurrent_streams),
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    /// Charges what a finished call used and gives its lease back.
    pub async fn settle(
        &self,
        lease: &Lease,
        tokens: u64,
        cost_micros: u64,
    ) -> Result<(), LlmError> {
        let now = Utc::now();
        let w = Windows::at(&self.store, lease.user, now);
        let mut conn = self.store.redis_shared().await?;
        let mut pipe = redis::pipe();
        pipe.zrem(&w.streams, &lease.id).ignore();
        if tokens > 0 {
            pipe.incr(&w.tokens, tokens)
                .ignore()
                .cmd("PEXPIREAT")
                .arg(&w.tokens)
                .arg((w.day_end + chrono::Duration::hours(1)).timestamp_millis())
                .ignore();
        }
        if cost_micros > 0 {
            pipe.incr(&w.cost, cost_micros)
                .ignore()
                .cmd("PEXPIREAT")
                .arg(&w.cost)
                .arg((w.month_end + chrono::Duration::hours(1)).timestamp_millis())
                .ignore();
        }
        let () = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.broken(e))?;
        Ok(())
    }

    /// Each limited quota with what remains of it and when it resets.
    pub async fn remaining(
        &self,
        user: Uuid,
        limits: &LimitsConfig,
    ) -> Result<Vec<Remaining>, LlmError> {
        let now = Utc::now();
        let w = Windows::at(&self.store, user, now);
        let mut conn = self.store.redis_shared().await?;
        let (rpm, tokens, cost, streams): (Option<u64>, Option<u64>, Option<u64>, u64) =
            redis::pipe()
                .get(&w.rpm)
                .get(&w.tokens)
                .get(&w.cost)
                .zcount(&w.streams, now.timestamp_millis(), "+inf")
                .query_async(&mut conn)
                .await
                .map_err(|e| self.broken(e))?;
        let mut out = Vec::new();
        let mut push = |name: &'static str, limit: u64, used: u64, reset: Option<DateTime<Utc>>| {
            if limit > 0 {
                out.push(Remaining {
                    name,
                    limit,
                    remaining: limit.saturating_sub(used),
                    reset,
                });
            }
        };
        push(
            "requests_per_minute",
            limits.requests_per_minute,
            rpm.unwrap_or(0),
            Some(w.minute_end),
        );
        push(
            "tokens_per_day",
            limits.tokens_per_day,
            tokens.unwrap_or(0),
            Some(w.day_end),
        );
        push(
            "cost_micros_per_month",
            limits.cost_micros_per_month,
            cost.unwrap_or(0),
            Some(w.month_end),
        );
        push(
            "concurrent_streams",
            limits.concurrent_streams,
            streams,
            None,
        );
        Ok(out)
    }
}

/// One quota's state.
#[derive(Debug, Clone)]
pub struct Remaining {
    pub name: &'static str,
    pub limit: u64,
    pub remaining: u64,
    pub reset: Option<DateTime<Utc>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_most_generous_role_wins_per_quota() {
        let mut c = LlmConfig::default();
        c.role_limits.insert(
            "a".into(),
            LimitsConfig {
                requests_per_minute: 10,
                tokens_per_day: 100,
                cost_micros_per_month: 0,
                concurrent_streams: 1,
            },
        );
        c.role_limits.insert(
            "b".into(),
            LimitsConfig {
                requests_per_minute: 20,
                tokens_per_day: 50,
                cost_micros_per_month: 5,
                concurrent_streams: 2,
            },
        );
        let l = effective(&c, &["a".into(), "b".into()]);
        assert_eq!(l.requests_per_minute, 20);
        assert_eq!(l.tokens_per_day, 100);
        assert_eq!(l.cost_micros_per_month, 0, "unlimited wins");
        assert_eq!(l.concurrent_streams, 2);
        assert_eq!(effective(&c, &["member".into()]), c.default_limits);
        assert_eq!(effective(&c, &["admin".into()]), LimitsConfig::UNLIMITED);
    }
}
