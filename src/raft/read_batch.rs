//! Read-index batching: concurrent linearizable reads share one quorum round instead of one
//! round each. A read that arrives while a round is in flight waits for the next round, which
//! starts after it arrived, so the index it gets covers every write acknowledged before the
//! read began (etcd's `linearizableReadLoop` batches the same way).

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::cluster::ClusterError;

type Waiter = oneshot::Sender<Result<u64, ClusterError>>;

/// Runs at most one read-index round at a time and hands its result to every read that was
/// waiting when the round started.
#[derive(Default)]
pub(crate) struct ReadBatcher {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// A task is running rounds.
    running: bool,
    /// Reads that arrived since the current round started.
    waiters: Vec<Waiter>,
}

impl ReadBatcher {
    /// The read index of a round that starts after this call. `round` fetches one read index
    /// (it is used only if this call has to start the rounds; any waiting caller's is the same).
    /// Rounds run on their own task, so a caller that gives up does not stall the others.
    pub(crate) async fn read_index<R, Fut>(self: &Arc<Self>, round: R) -> Result<u64, ClusterError>
    where
        R: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<u64, ClusterError>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = self.lock();
            s.waiters.push(tx);
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move { me.run(round).await });
        }
        rx.await.unwrap_or_else(|_| {
            Err(ClusterError::Unavailable {
                reason: "the read-index round was dropped".into(),
            })
        })
    }

    async fn run<R, Fut>(&self, round: R)
    where
        R: Fn() -> Fut,
        Fut: Future<Output = Result<u64, ClusterError>>,
    {
        // If a round panics, the guard lets the next read start the rounds again (its waiters
        // see their channel closed and get an error).
        let guard = Running(self);
        loop {
            let batch = {
                let mut s = self.lock();
                // Callers that gave up need no round.
                s.waiters.retain(|w| !w.is_closed());
                if s.waiters.is_empty() {
                    s.running = false;
                    std::mem::forget(guard);
                    return;
                }
                std::mem::take(&mut s.waiters)
            };
            let result = round().await;
            for w in batch {
                let _ = w.send(result.clone());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Clears `running` if the round task unwinds.
struct Running<'a>(&'a ReadBatcher);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.lock().running = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A round that takes 50 ms and returns the number of rounds started so far, recording
    /// when (in rounds) it started.
    fn counting_round(
        rounds: Arc<AtomicU64>,
    ) -> impl Fn() -> std::pin::Pin<Box<dyn Future<Output = Result<u64, ClusterError>> + Send>>
           + Send
           + 'static {
        move || {
            let rounds = rounds.clone();
            Box::pin(async move {
                let n = rounds.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok(n)
            })
        }
    }

    #[tokio::test]
    async fn concurrent_reads_share_rounds() {
        let b = Arc::new(ReadBatcher::default());
        let rounds = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (b, r) = (b.clone(), rounds.clone());
            tasks.push(tokio::spawn(async move {
                b.read_index(counting_round(r)).await
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap().is_ok());
        }
        let n = rounds.load(Ordering::SeqCst);
        assert!((1..=2).contains(&n), "100 concurrent reads took {n} rounds");
        assert!(!b.lock().running, "the round task stops when nobody waits");
    }

    /// A read that arrives during a round must not take that round's result: the round may
    /// have fixed its index before the read began.
    #[tokio::test]
    async fn a_read_arriving_mid_round_waits_for_the_next_round() {
        let b = Arc::new(ReadBatcher::default());
        let rounds = Arc::new(AtomicU64::new(0));
        let first = {
            let (b, r) = (b.clone(), rounds.clone());
            tokio::spawn(async move { b.read_index(counting_round(r)).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(rounds.load(Ordering::SeqCst), 1, "round 1 is in flight");
        let late = b.read_index(counting_round(rounds.clone())).await.unwrap();
        assert_eq!(first.await.unwrap().unwrap(), 1);
        assert_eq!(late, 2, "the late read got a round that started after it");
    }

    #[tokio::test]
    async fn errors_reach_every_waiter_and_the_next_round_runs_again() {
        let b = Arc::new(ReadBatcher::default());
        let failing = || async { Err::<u64, _>(ClusterError::NotLeader { leader: Some(2) }) };
        let (x, y) = tokio::join!(b.read_index(failing), b.read_index(failing));
        assert_eq!(x, Err(ClusterError::NotLeader { leader: Some(2) }));
        assert_eq!(y, x);
        assert_eq!(b.read_index(|| async { Ok(7) }).await, Ok(7));
    }

    #[tokio::test]
    async fn a_panicking_round_does_not_stop_later_reads() {
        let b = Arc::new(ReadBatcher::default());
        let r = b.read_index(|| async { panic!("round failed") }).await;
        assert!(matches!(r, Err(ClusterError::Unavailable { .. })), "{r:?}");
        assert_eq!(b.read_index(|| async { Ok(3) }).await, Ok(3));
    }

    #[tokio::test]
    async fn a_caller_that_gives_up_does_not_stall_the_others() {
        let b = Arc::new(ReadBatcher::default());
        let slow = || async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(1)
        };
        let gave_up = tokio::time::timeout(Duration::from_millis(10), b.read_index(slow)).await;
        assert!(gave_up.is_err());
        assert_eq!(b.read_index(slow).await, Ok(1));
    }
}
