//! The run's single clock and its append-only journals (`history.jsonl`, `set.jsonl`,
//! `nemesis.jsonl`, ...). Knows how to stamp and persist records, not what they mean.
//!
//! Every time in every file of a run is nanoseconds since the run's [`Clock`] started, taken
//! from one `Instant` (CLOCK_MONOTONIC), so client ops and fault intervals line up exactly.
//! A record is stamped *inside* the journal's lock, so each file is in time order.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;

/// Nanoseconds since the run started, from one monotonic clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn start() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }

    /// Now, in ns since the start.
    pub fn now(&self) -> u64 {
        self.ns(Instant::now())
    }

    /// `at` in ns since the start (0 if before it).
    pub fn ns(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.start).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant `offset` after the start.
    pub fn instant(&self, offset: Duration) -> Instant {
        self.start + offset
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }
}

/// Flush the file after this many records, so a crashed run still leaves most of its history.
const FLUSH_EVERY: usize = 64;

struct Inner<T> {
    out: BufWriter<File>,
    items: Vec<T>,
    /// The first write error; later records are kept in memory only.
    error: Option<String>,
    unflushed: usize,
}

/// An append-only JSON-lines file plus an in-memory copy of its records. Cheap to clone;
/// clones share the file.
pub struct Journal<T> {
    inner: Arc<Mutex<Inner<T>>>,
    clock: Clock,
}

impl<T> Clone for Journal<T> {
    fn clone(&self) -> Self {
        Journal {
            inner: Arc::clone(&self.inner),
            clock: self.clock,
        }
    }
}

impl<T: Serialize + Clone> Journal<T> {
    pub fn create(path: &Path, clock: Clock) -> io::Result<Journal<T>> {
        let out = BufWriter::new(File::create(path)?);
        Ok(Journal {
            inner: Arc::new(Mutex::new(Inner {
                out,
                items: Vec::new(),
                error: None,
                unflushed: 0,
            })),
            clock,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // A panicking writer leaves a consistent Vec and file behind; keep going.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stamps the current time, builds the record from it, appends it; returns the time.
    pub fn record(&self, make: impl FnOnce(u64) -> T) -> u64 {
        let mut inner = self.lock();
        let now = self.clock.now();
        let item = make(now);
        if inner.error.is_none() {
            let res = serde_json::to_writer(&mut inner.out, &item)
                .map_err(io::Error::from)
                .and_then(|()| inner.out.write_all(b"\n"));
            inner.unflushed += 1;
            let res = res.and_then(|()| {
                if inner.unflushed >= FLUSH_EVERY {
                    inner.unflushed = 0;
                    inner.out.flush()
                } else {
                    Ok(())
                }
            });
            if let Err(e) = res {
                inner.error = Some(e.to_string());
            }
        }
        inner.items.push(item);
        now
    }

    /// Everything recorded so far, in order.
    pub fn items(&self) -> Vec<T> {
        self.lock().items.clone()
    }

    /// Flushes the file; reports the first write error, if any happened.
    pub fn flush(&self) -> Result<(), String> {
        let mut inner = self.lock();
        if let Some(e) = &inner.error {
            return Err(e.clone());
        }
        inner.out.flush().map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize)]
    struct Rec {
        n: u32,
        time: u64,
    }

    #[test]
    fn records_are_stamped_in_order_and_persisted() {
        let dir = std::env::temp_dir().join(format!("jepsen-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("j.jsonl");
        let j: Journal<Rec> = Journal::create(&path, Clock::start()).expect("create");
        let t1 = j.record(|time| Rec { n: 1, time });
        let t2 = j.clone().record(|time| Rec { n: 2, time });
        assert!(t1 <= t2);
        j.flush().expect("flush");
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0], format!(r#"{{"n":1,"time":{t1}}}"#));
        assert_eq!(j.items().len(), 2);
        std::fs::remove_dir_all(&dir).ok();
    }
}
