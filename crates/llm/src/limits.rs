//! Per-user quotas in Redis, shared by every replica: requests per minute,
//! tokens per day, cost per month and concurrent streams. One Lua script
//! checks every quota and takes a request slot, a stream lease and a
//! reservation of the call's worst case (prompt tokens + `max_tokens`, and
//! its cost) in one atomic step before the upstream is called, so calls
//! running at the same time cannot together overshoot a budget; when the
//! call ends the reservation is settled to what it used. Windows are
//! calendar windows in UTC (minute, day, month), so `reset_time` is exact.
//! A stream lease is a sorted-set member that expires on its own, so a
//! crashed replica cannot leak concurrency.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
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
--       now ms, lease expiry ms, lease id, tokens to reserve, cost to
--       reserve, tokens expire at ms, cost expires at ms
-- The token and cost counters hold what settled calls used plus what
-- running calls reserved.
local now = tonumber(ARGV[6])
local tok_limit = tonumber(ARGV[3])
local tok_want = tonumber(ARGV[9])
local tok_used = tonumber(redis.call('GET', KEYS[2]) or '0')
if tok_limit > 0 and tok_used + tok_want > tok_limit then
  return {2, tok_used}
end
local cost_limit = tonumber(ARGV[4])
local cost_want = tonumber(ARGV[10])
local cost_used = tonumber(redis.call('GET', KEYS[3]) or '0')
if cost_limit > 0 and cost_used + cost_want > cost_limit then
  return {3, cost_used}
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
if tok_limit > 0 and tok_want > 0 then
  redis.call('INCRBY', KEYS[2], tok_want)
  redis.call('PEXPIREAT', KEYS[2], ARGV[11])
end
if cost_limit > 0 and cost_want > 0 then
  redis.call('INCRBY', KEYS[3], cost_want)
  redis.call('PEXPIREAT', KEYS[3], ARGV[12])
end
return {0, 0}
"#;

/// The most a call may use, reserved against the budgets at admission.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Estimate {
    pub tokens: u64,
    pub cost_micros: u64,
}

/// A held stream lease and budget reservation; settle it with
/// [`Limiter::settle`]. It keeps the windows it was taken in, so a call
/// that runs past midnight settles against the day it was admitted in.
#[derive(Debug, Clone)]
pub struct Lease {
    pub id: String,
    streams_key: String,
    tokens_key: String,
    cost_key: String,
    tokens_expire_ms: i64,
    cost_expire_ms: i64,
    reserved: Estimate,
}

type Gates = Arc<Mutex<HashMap<Uuid, Arc<tokio::sync::RwLock<()>>>>>;

/// The quota checks of the gateway.
#[derive(Debug, Clone)]
pub struct Limiter {
    store: Store,
    script: redis::Script,
    /// Per user with a settlement under way in this process: the gate its
    /// settlements hold shared and its next admission waits on, so a
    /// stream that has ended (the caller saw its end before Redis
    /// confirmed the settlement) never holds the slot of the caller's
    /// next call.
    settling: Gates,
}

/// A settlement begun for a user (see [`Limiter::settling`]); admissions
/// of that user in this process wait until it is dropped.
#[derive(Debug)]
pub struct Settling {
    user: Uuid,
    gates: Gates,
    gate: Arc<tokio::sync::RwLock<()>>,
    guard: Option<tokio::sync::OwnedRwLockReadGuard<()>>,
}

impl Drop for Settling {
    fn drop(&mut self) {
        self.guard.take();
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        // Nobody else holds this gate (the map's reference and ours): the
        // user has nothing under way any more.
        if Arc::strong_count(&self.gate) == 2 {
            gates.remove(&self.user);
        }
    }
}

impl Limiter {
    pub fn new(store: Store) -> Limiter {
        Limiter {
            store,
            script: redis::Script::new(ACQUIRE),
            settling: Arc::default(),
        }
    }

    /// Marks a settlement of `user`'s as under way, until the returned
    /// value drops: taken before the caller is told the call ended.
    pub async fn settling(&self, user: Uuid) -> Settling {
        let gate = self
            .settling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(user)
            .or_default()
            .clone();
        let guard = gate.clone().read_owned().await;
        Settling {
            user,
            gates: self.settling.clone(),
            gate,
            guard: Some(guard),
        }
    }

    /// Waits until the settlements of `user` begun so far are done.
    async fn settled(&self, user: Uuid) {
        let gate = self
            .settling
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&user)
            .cloned();
        if let Some(gate) = gate {
            drop(gate.write().await);
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

    /// Checks every quota and takes a request slot, a stream lease for
    /// `lease_for` (how long the call may run at most) and a reservation
    /// of `estimate` against the token and cost budgets that are limited.
    pub async fn acquire(
        &self,
        user: Uuid,
        limits: &LimitsConfig,
        lease_for: Duration,
        estimate: Estimate,
    ) -> Result<Lease, LlmError> {
        self.settled(user).await;
        let now = Utc::now();
        let w = Windows::at(&self.store, user, now);
        let tokens_expire_ms = (w.day_end + chrono::Duration::hours(1)).timestamp_millis();
        let cost_expire_ms = (w.month_end + chrono::Duration::hours(1)).timestamp_millis();
        let lease = Lease {
            id: Uuid::now_v7().to_string(),
            streams_key: w.streams.clone(),
            tokens_key: w.tokens.clone(),
            cost_key: w.cost.clone(),
            tokens_expire_ms,
            cost_expire_ms,
            reserved: Estimate {
                tokens: if limits.tokens_per_day > 0 {
                    estimate.tokens
                } else {
                    0
                },
                cost_micros: if limits.cost_micros_per_month > 0 {
                    estimate.cost_micros
                } else {
                    0
                },
            },
        };
        let now_ms = now.timestamp_millis();
        let mut conn = self.store.redis_shared().await?;
        let (code, used): (i64, i64) = self
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
            .arg(estimate.tokens)
            .arg(estimate.cost_micros)
            .arg(tokens_expire_ms)
            .arg(cost_expire_ms)
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
                description: format!(
                    "this call may use {} tokens (prompt + max_tokens) but {} of {} tokens per day remain",
                    estimate.tokens,
                    limits.tokens_per_day.saturating_sub(used.max(0) as u64),
                    limits.tokens_per_day
                ),
                retry_after: until(w.day_end, now),
            }),
            3 => Err(LlmError::Quota {
                quota: "cost_micros_per_month",
                description: format!(
                    "this call may cost {} micro-dollars but {} of the monthly budget of {} remain",
                    estimate.cost_micros,
                    limits
                        .cost_micros_per_month
                        .saturating_sub(used.max(0) as u64),
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

    /// Settles a finished call's reservation to what it used (charging
    /// the difference, or giving it back) and releases its lease.
    pub async fn settle(
        &self,
        lease: &Lease,
        tokens: u64,
        cost_micros: u64,
    ) -> Result<(), LlmError> {
        let mut conn = self.store.redis_shared().await?;
        let mut pipe = redis::pipe();
        pipe.zrem(&lease.streams_key, &lease.id).ignore();
        let tokens_delta = tokens as i64 - lease.reserved.tokens as i64;
        if tokens_delta != 0 {
            pipe.incr(&lease.tokens_key, tokens_delta)
                .ignore()
                .cmd("PEXPIREAT")
                .arg(&lease.tokens_key)
                .arg(lease.tokens_expire_ms)
                .ignore();
        }
        let cost_delta = cost_micros as i64 - lease.reserved.cost_micros as i64;
        if cost_delta != 0 {
            pipe.incr(&lease.cost_key, cost_delta)
                .ignore()
                .cmd("PEXPIREAT")
                .arg(&lease.cost_key)
                .arg(lease.cost_expire_ms)
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
        let (rpm, tokens, cost, streams): (Option<u64>, Option<i64>, Option<i64>, u64) =
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
            tokens.unwrap_or(0).max(0) as u64,
            Some(w.day_end),
        );
        push(
            "cost_micros_per_month",
            limits.cost_micros_per_month,
            cost.unwrap_or(0).max(0) as u64,
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
