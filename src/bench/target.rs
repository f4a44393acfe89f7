//! target: the [`Target`] trait both systems under test implement (put, linearizable get,
//! group query, preload), the 256-byte record every put writes, and [`execute`], which runs
//! one [`Op`] and checks its result. Ops never panic: every failure is an [`OpError`].

use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use futures::{StreamExt, TryStreamExt};

use super::http::OpError;
use super::workload::{Op, QUERY_GROUP_SIZE};

/// Size of every record written, in bytes: cairn's JSON body, and etcd's value.
pub const RECORD_BYTES: usize = 256;

/// Puts in flight at once during a preload.
const PRELOAD_CONCURRENCY: usize = 64;

/// Tries per preloaded key before the preload gives up.
const PRELOAD_ATTEMPTS: u32 = 5;

/// Pause between two tries of a preloaded key.
const PRELOAD_RETRY_DELAY: Duration = Duration::from_millis(200);

/// A system under test. `client` is the logical client's index: it picks the pooled HTTP
/// client and the endpoint (see [`super::http::HttpPool::conn`]). Key indexes start at 1.
pub trait Target: Send + Sync + 'static {
    /// The name used in reports (`cairn`, `etcd`).
    fn name(&self) -> &'static str;

    /// Writes the record of key `key`.
    fn put(&self, client: usize, key: u64) -> impl Future<Output = Result<(), OpError>> + Send;

    /// Reads the record of key `key`, linearizably.
    fn get(&self, client: usize, key: u64) -> impl Future<Output = Result<(), OpError>> + Send;

    /// Reads the query group; returns how many records it holds.
    fn query(&self, client: usize) -> impl Future<Output = Result<usize, OpError>> + Send;

    /// Writes member `member` (1-based) of the query group.
    fn put_group_member(
        &self,
        client: usize,
        member: u64,
    ) -> impl Future<Output = Result<(), OpError>> + Send;

    /// Writes keys 1..=n and the [`QUERY_GROUP_SIZE`] members of the query group, many at
    /// once, retrying each a few times. Not measured.
    fn preload(&self, n: u64) -> impl Future<Output = anyhow::Result<()>> + Send
    where
        Self: Sized,
    {
        async move {
            preload_all(n, |i, k| self.put(i, k)).await?;
            preload_all(QUERY_GROUP_SIZE, |i, m| self.put_group_member(i, m)).await
        }
    }
}

/// Runs `put(client, key)` for keys 1..=n with [`PRELOAD_CONCURRENCY`] in flight.
async fn preload_all<F, Fut>(n: u64, put: F) -> anyhow::Result<()>
where
    F: Fn(usize, u64) -> Fut,
    Fut: Future<Output = Result<(), OpError>>,
{
    let put = &put;
    futures::stream::iter(1..=n)
        .map(|k| async move {
            let client = usize::try_from(k).unwrap_or(0);
            let mut last = OpError::Transport;
            for attempt in 1..=PRELOAD_ATTEMPTS {
                match put(client, k).await {
                    Ok(()) => return Ok(()),
                    Err(e) => last = e,
                }
                if attempt < PRELOAD_ATTEMPTS {
                    tokio::time::sleep(PRELOAD_RETRY_DELAY).await;
                }
            }
            Err(anyhow!(
                "preload: key {k} failed {PRELOAD_ATTEMPTS} times (last error: {})",
                last.kind()
            ))
        })
        .buffer_unordered(PRELOAD_CONCURRENCY)
        .try_collect::<()>()
        .await
}

/// Runs `op` as logical client `client`. A query must return the whole group.
pub async fn execute<T: Target>(target: &T, client: usize, op: Op) -> Result<(), OpError> {
    match op {
        Op::Put(k) => target.put(client, k).await,
        Op::Get(k) => target.get(client, k).await,
        Op::Query => {
            let n = target.query(client).await?;
            if n as u64 == QUERY_GROUP_SIZE {
                Ok(())
            } else {
                Err(OpError::WrongCount)
            }
        }
    }
}

/// The JSON body of a cairn registration, padded with `meta.pad` to exactly
/// [`RECORD_BYTES`] bytes. etcd stores the same bytes as its value.
pub fn record_body() -> Vec<u8> {
    let with_pad = |pad: usize| {
        serde_json::json!({
            "address": "10.0.0.1",
            "port": 8080,
            "tags": ["bench"],
            "meta": { "pad": "x".repeat(pad) },
            "zone": "zone-a",
        })
        .to_string()
        .into_bytes()
    };
    let bare = with_pad(0).len();
    with_pad(RECORD_BYTES.saturating_sub(bare))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;

    #[test]
    fn record_is_exactly_256_bytes_of_valid_json() {
        let body = record_body();
        assert_eq!(body.len(), RECORD_BYTES);
        let v: serde_json::Value = serde_json::from_slice(&body).expect("valid JSON");
        assert_eq!(v["address"], "10.0.0.1");
        assert_eq!(v["port"], 8080);
        assert_eq!(v["zone"], "zone-a");
        assert!(v["meta"]["pad"].as_str().is_some_and(|p| p.len() > 100));
    }

    /// A target in memory that fails each key's first put.
    #[derive(Default)]
    struct Flaky {
        puts: AtomicU64,
        seen: Mutex<Vec<u64>>,
        group: AtomicU64,
    }

    impl Target for Flaky {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn put(&self, _client: usize, key: u64) -> Result<(), OpError> {
            self.puts.fetch_add(1, Ordering::Relaxed);
            let mut seen = self.seen.lock().map_err(|_| OpError::Transport)?;
            if seen.contains(&key) {
                Ok(())
            } else {
                seen.push(key);
                Err(OpError::Status(503))
            }
        }
        async fn get(&self, _client: usize, _key: u64) -> Result<(), OpError> {
            Ok(())
        }
        async fn query(&self, _client: usize) -> Result<usize, OpError> {
            Ok(self.group.load(Ordering::Relaxed) as usize)
        }
        async fn put_group_member(&self, _client: usize, _m: u64) -> Result<(), OpError> {
            self.group.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
    }

    #[tokio::test]
    async fn preload_retries_and_fills_the_group() {
        let t = Flaky::default();
        t.preload(20).await.expect("preload succeeds on retry");
        assert_eq!(t.puts.load(Ordering::Relaxed), 40);
        assert_eq!(execute(&t, 0, Op::Query).await, Ok(()));
        t.group.fetch_add(1, Ordering::Relaxed);
        assert_eq!(execute(&t, 0, Op::Query).await, Err(OpError::WrongCount));
    }
}
