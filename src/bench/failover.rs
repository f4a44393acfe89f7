//! failover: `bench first-write` — from the moment it starts, keeps writing new keys (a new
//! attempt every [`ATTEMPT_EVERY`], each bounded by [`ATTEMPT_TIMEOUT`]) until one is
//! acknowledged, and prints when that happened as Unix nanoseconds. `scripts/bench` kills a
//! leader, starts this at once, and subtracts the kill time: the time to serve writes again.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::bail;
use tokio::task::JoinSet;

use super::target::Target;

/// How often a new write is started while none has succeeded.
pub const ATTEMPT_EVERY: Duration = Duration::from_millis(20);
/// Bound on one attempt (an election may hold a request for seconds).
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Writes keys 1, 2, ... until one is acknowledged or `within` passes; returns the time of
/// the first acknowledgement and how many attempts were started.
pub async fn first_write<T: Target>(
    target: Arc<T>,
    within: Duration,
) -> anyhow::Result<(SystemTime, u64)> {
    let deadline = tokio::time::Instant::now() + within;
    let mut attempts = JoinSet::new();
    let mut started = 0u64;
    let mut tick = tokio::time::interval(ATTEMPT_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if tokio::time::Instant::now() >= deadline {
                    bail!("no write acknowledged within {within:?} ({started} attempts)");
                }
                started += 1;
                let (t, key) = (target.clone(), started);
                attempts.spawn(async move {
                    let client = usize::try_from(key).unwrap_or(0);
                    match tokio::time::timeout(ATTEMPT_TIMEOUT, t.put(client, key)).await {
                        Ok(Ok(())) => Some(SystemTime::now()),
                        _ => None,
                    }
                });
            }
            Some(done) = attempts.join_next() => {
                if let Ok(Some(at)) = done {
                    return Ok((at, started));
                }
            }
        }
    }
}

/// Unix nanoseconds of `t`.
pub fn unix_nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::http::OpError;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Fails every put until `ok_after` attempts were made.
    struct Flaky {
        calls: AtomicU64,
        ok_after: u64,
    }

    impl Target for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn put(&self, _: usize, _: u64) -> Result<(), OpError> {
            if self.calls.fetch_add(1, Ordering::SeqCst) + 1 >= self.ok_after {
                Ok(())
            } else {
                Err(OpError::Transport)
            }
        }
        async fn get(&self, _: usize, _: u64) -> Result<(), OpError> {
            Ok(())
        }
        async fn query(&self, _: usize) -> Result<usize, OpError> {
            Ok(0)
        }
        async fn put_group_member(&self, _: usize, _: u64) -> Result<(), OpError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn retries_until_the_first_acknowledged_write() {
        let t = Arc::new(Flaky {
            calls: AtomicU64::new(0),
            ok_after: 5,
        });
        let before = SystemTime::now();
        let (at, started) = first_write(t.clone(), Duration::from_secs(5))
            .await
            .unwrap();
        assert!(at >= before);
        assert!(started >= 5, "{started}");
        assert!(at.duration_since(before).unwrap() >= ATTEMPT_EVERY * 4);
    }

    #[tokio::test]
    async fn gives_up_after_the_bound() {
        let t = Arc::new(Flaky {
            calls: AtomicU64::new(0),
            ok_after: u64::MAX,
        });
        let e = first_write(t, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("no write acknowledged"), "{e}");
    }
}
