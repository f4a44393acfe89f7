//! reload: watches files for changes (and SIGHUP) and calls a reload function; knows nothing of what the files contain.
//!
//! Polling, not inotify: a poll sees every way a file gets replaced the same way — written
//! in place, renamed over, or swapped behind a symlink as Kubernetes does for mounted
//! secrets (`cert.pem -> ..data/cert.pem`, `..data -> ..2024_01_01_v2`) — because each
//! path is fingerprinted by what it resolves to at that moment. Material that rotates over
//! days does not need to be noticed faster than a poll interval.
//!
//! The watcher calls the reload function once at start too, so a change between the
//! caller's load and the watcher's first look is not missed.
//!
//! The reload function is the judge of whether the files are usable. A watcher that catches
//! a rotation half-done (certificate written, key not yet) sees the reload fail and simply
//! tries again at the next tick; the failure is logged, but an identical one at most once
//! per [`REPEAT_ERROR_EVERY`] so a file that stays broken does not flood the log.

use std::fs;
use std::future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tracing::{error, info, warn};

/// How often an unchanged reload error is logged again while it persists.
pub const REPEAT_ERROR_EVERY: Duration = Duration::from_secs(60);

/// The reload function: `Ok(what changed)` for the log, or `Err(why not)`.
type ReloadFn = dyn Fn() -> Result<String, String> + Send + Sync;

/// Starts a task that calls `reload` once at start, then whenever one of `paths` changes
/// (checked every `interval`) and whenever the process receives SIGHUP, until `stop` turns
/// true or its sender is dropped. Must be called inside a tokio runtime.
///
/// The call at start closes the window between the caller's load and the watcher's first
/// look: a change in between is picked up, and a reload function that compares contents
/// (as `TlsMaterial::reload` does) answers "unchanged" otherwise. A failed reload is retried
/// at every tick until one succeeds or the files return to what was last loaded. `reload`
/// runs on the blocking pool, so it may read files.
///
/// The SIGHUP stream is registered before this returns: from then on SIGHUP no longer
/// terminates the process, and a SIGHUP sent after this returns is not missed.
pub fn spawn_watcher(
    name: &'static str,
    paths: Vec<PathBuf>,
    interval: Duration,
    reload: impl Fn() -> Result<String, String> + Send + Sync + 'static,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    // One stream per watcher: every watcher sees every SIGHUP.
    let hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(error) => {
            warn!(watcher = name, %error, "cannot listen for SIGHUP; polling only");
            None
        }
    };
    let watcher = Watcher {
        name,
        paths: paths.into(),
        reload: Arc::new(reload),
        applied: None,
        throttle: Throttle::default(),
    };
    tokio::spawn(watcher.run(interval, hangup, stop))
}

/// What woke the watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trigger {
    Start,
    Tick,
    Hangup,
}

struct Watcher {
    name: &'static str,
    paths: Arc<[PathBuf]>,
    reload: Arc<ReloadFn>,
    /// The fingerprints taken just before the last successful reload; `None` until one
    /// succeeds, so a failure at start is retried too.
    applied: Option<Vec<Fingerprint>>,
    throttle: Throttle,
}

impl Watcher {
    async fn run(
        mut self,
        interval: Duration,
        mut hangup: Option<Signal>,
        mut stop: watch::Receiver<bool>,
    ) {
        info!(
            watcher = self.name,
            files = self.paths.len(),
            interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            "watching"
        );
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await; // The first tick is immediate; the check at start stands in.
        if *stop.borrow_and_update() {
            return;
        }
        self.check(Trigger::Start).await;
        loop {
            let trigger = tokio::select! {
                _ = ticker.tick() => Trigger::Tick,
                received = next_hangup(&mut hangup) => match received {
                    Some(()) => Trigger::Hangup,
                    None => {
                        // The signal driver is gone; keep polling.
                        hangup = None;
                        continue;
                    }
                },
                changed = stop.changed() => {
                    if changed.is_err() || *stop.borrow_and_update() {
                        return;
                    }
                    continue;
                }
            };
            self.check(trigger).await;
        }
    }

    /// Fingerprints the files and, if they differ from the last loaded ones or the trigger
    /// insists, reloads. Fingerprinting comes first, so a change racing the reload is seen
    /// at the next tick at worst.
    async fn check(&mut self, trigger: Trigger) {
        let forced = trigger != Trigger::Tick;
        let step = {
            let (paths, reload) = (self.paths.clone(), self.reload.clone());
            let applied = self.applied.clone();
            move || {
                let now = fingerprints(&paths);
                let changed = applied.as_ref() != Some(&now);
                let result = (forced || changed).then(|| reload());
                (now, result)
            }
        };
        let (now, result) = match blocking(step).await {
            Some(step) => step,
            None => (Vec::new(), Some(Err("reload panicked".to_string()))),
        };
        let name = self.name;
        match result {
            // Nothing changed since the last successful reload (or the files went back to it).
            None => self.throttle.clear(),
            Some(Ok(what)) => {
                self.applied = Some(now);
                self.throttle.clear();
                if trigger == Trigger::Start {
                    info!(watcher = name, %what, "checked at start");
                } else {
                    info!(watcher = name, %what, "reloaded");
                }
            }
            Some(Err(error)) => {
                // An operator who sent SIGHUP gets an answer every time.
                if self.throttle.should_log(&error, Instant::now()) || trigger == Trigger::Hangup {
                    error!(watcher = name, %error, "reload failed; keeping the previous material");
                }
            }
        }
    }
}

/// Runs file I/O and the reload off the async workers. `None` if it panicked.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

async fn next_hangup(hangup: &mut Option<Signal>) -> Option<()> {
    match hangup {
        Some(hangup) => hangup.recv().await,
        None => future::pending().await,
    }
}

/// What a path resolves to, and a digest of its content, at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fingerprint {
    Present {
        /// The file behind any symlinks: a symlink swap changes it.
        target: PathBuf,
        len: u64,
        modified: Option<SystemTime>,
        sha256: [u8; 32],
    },
    /// Missing (mid-replace) or unreadable; the reload will say which.
    Unreadable(io::ErrorKind),
}

fn fingerprints(paths: &[PathBuf]) -> Vec<Fingerprint> {
    paths
        .iter()
        .map(|path| fingerprint(path).unwrap_or_else(|e| Fingerprint::Unreadable(e.kind())))
        .collect()
}

fn fingerprint(path: &Path) -> io::Result<Fingerprint> {
    let target = fs::canonicalize(path)?;
    // Read before stat: if the file is replaced in between, the metadata is the newer one
    // and the next tick sees a change either way.
    let bytes = fs::read(&target)?;
    let meta = fs::metadata(&target)?;
    let mut sha256 = [0; 32];
    sha256.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref());
    Ok(Fingerprint::Present {
        target,
        len: meta.len(),
        modified: meta.modified().ok(),
        sha256,
    })
}

/// Decides whether a reload error is worth logging: a new one always, the same one again
/// once per [`REPEAT_ERROR_EVERY`].
#[derive(Debug, Default)]
struct Throttle {
    last: Option<(String, Instant)>,
}

impl Throttle {
    fn should_log(&mut self, error: &str, now: Instant) -> bool {
        let repeat = matches!(&self.last, Some((last, at))
            if last == error && now.saturating_duration_since(*at) < REPEAT_ERROR_EVERY);
        if !repeat {
            self.last = Some((error.to_string(), now));
        }
        !repeat
    }

    fn clear(&mut self) {
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    const INTERVAL: Duration = Duration::from_millis(50);

    /// What the reload function saw, call by call: the file's content or the read error.
    #[derive(Clone, Default)]
    struct Calls(Arc<Mutex<Vec<Result<String, String>>>>);

    impl Calls {
        /// A reload function that reads `path` and succeeds if it can.
        fn reader(&self, path: &Path) -> impl Fn() -> Result<String, String> + Send + Sync {
            let (calls, path) = (self.clone(), path.to_path_buf());
            move || {
                let result = fs::read_to_string(&path).map_err(|e| e.to_string());
                calls.0.lock().expect("calls").push(result.clone());
                result
            }
        }

        fn all(&self) -> Vec<Result<String, String>> {
            self.0.lock().expect("calls").clone()
        }
    }

    fn replace(path: &Path, contents: &str) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, contents).expect("write");
        fs::rename(&tmp, path).expect("rename");
    }

    /// Waits up to 5 s for `done`, checking every interval.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        for _ in 0..100 {
            if done() {
                return;
            }
            tokio::time::sleep(INTERVAL).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn a_file_replaced_by_rename_is_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cert.pem");
        fs::write(&path, "v1").expect("write");
        let calls = Calls::default();
        let (_stop, stop) = watch::channel(false);
        let watcher = spawn_watcher(
            "test",
            vec![path.clone()],
            INTERVAL,
            calls.reader(&path),
            stop,
        );

        replace(&path, "v2");
        eventually("the reload of v2", || {
            calls.all().contains(&Ok("v2".into()))
        })
        .await;
        replace(&path, "v3");
        eventually("the reload of v3", || {
            calls.all().contains(&Ok("v3".into()))
        })
        .await;
        assert!(!watcher.is_finished());
    }

    #[tokio::test]
    async fn a_symlink_swap_is_reloaded() {
        // The layout Kubernetes gives a mounted secret:
        // cert.pem -> ..data/cert.pem, ..data -> ..v1, swapped by renaming a new ..data over.
        let dir = tempfile::tempdir().expect("tempdir");
        let version = |name: &str, contents: &str| {
            fs::create_dir(dir.path().join(name)).expect("mkdir");
            fs::write(dir.path().join(name).join("cert.pem"), contents).expect("write");
        };
        version("..v1", "v1");
        symlink("..v1", dir.path().join("..data")).expect("symlink");
        let path = dir.path().join("cert.pem");
        symlink("..data/cert.pem", &path).expect("symlink");
        let calls = Calls::default();
        let (_stop, stop) = watch::channel(false);
        let _watcher = spawn_watcher(
            "test",
            vec![path.clone()],
            INTERVAL,
            calls.reader(&path),
            stop,
        );
        tokio::time::sleep(INTERVAL * 3).await;

        version("..v2", "v2");
        symlink("..v2", dir.path().join("..data_tmp")).expect("symlink");
        fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).expect("swap");
        fs::remove_dir_all(dir.path().join("..v1")).expect("old version");
        eventually("the reload after the swap", || {
            calls.all().contains(&Ok("v2".into()))
        })
        .await;
    }

    #[tokio::test]
    async fn a_missing_file_is_retried_until_it_is_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("key.pem");
        fs::write(&path, "v1").expect("write");
        let calls = Calls::default();
        let (_stop, stop) = watch::channel(false);
        let watcher = spawn_watcher(
            "test",
            vec![path.clone()],
            INTERVAL,
            calls.reader(&path),
            stop,
        );
        tokio::time::sleep(INTERVAL * 3).await;

        fs::remove_file(&path).expect("remove");
        // Every tick retries while the file is missing.
        eventually("two failed reloads", || {
            calls.all().iter().filter(|call| call.is_err()).count() >= 2
        })
        .await;
        assert!(!watcher.is_finished(), "a missing file stopped the watcher");
        replace(&path, "v2");
        eventually("the reload once the file is back", || {
            calls.all().contains(&Ok("v2".into()))
        })
        .await;
    }

    #[tokio::test]
    async fn sighup_reloads_unchanged_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ca.pem");
        fs::write(&path, "v1").expect("write");
        let count = Arc::new(AtomicUsize::new(0));
        let reload = {
            let count = count.clone();
            move || Ok(format!("call {}", count.fetch_add(1, Ordering::SeqCst) + 1))
        };
        let (_stop, stop) = watch::channel(false);
        // Registers the watcher's SIGHUP stream before it returns: from then on tokio's
        // handler owns SIGHUP in this process, so raising it cannot end the test binary.
        let _watcher = spawn_watcher("test", vec![path], INTERVAL, reload, stop);
        tokio::time::sleep(INTERVAL * 5).await;
        // No other test raises SIGHUP, so only the check at start has run.
        assert_eq!(
            count.load(Ordering::SeqCst),
            1,
            "unchanged files, no reload"
        );

        // SAFETY: raise(3) only sends a signal to this thread, and a handler is installed.
        assert_eq!(unsafe { libc::raise(libc::SIGHUP) }, 0);
        eventually("the reload on SIGHUP", || count.load(Ordering::SeqCst) >= 2).await;
    }

    #[tokio::test]
    async fn stop_ends_the_watcher() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cert.pem");
        fs::write(&path, "v1").expect("write");
        let calls = Calls::default();

        let (stop_tx, stop) = watch::channel(false);
        let watcher = spawn_watcher(
            "test",
            vec![path.clone()],
            INTERVAL,
            calls.reader(&path),
            stop,
        );
        tokio::time::sleep(INTERVAL * 2).await;
        stop_tx.send(true).expect("send");
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("stopped in time")
            .expect("no panic");

        // A dropped sender stops it too.
        let (stop_tx, stop) = watch::channel(false);
        let watcher = spawn_watcher(
            "test",
            vec![path.clone()],
            INTERVAL,
            calls.reader(&path),
            stop,
        );
        drop(stop_tx);
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("stopped in time")
            .expect("no panic");
    }

    #[test]
    fn fingerprints_see_content_and_missing_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cert.pem");
        let paths = [path.clone()];
        assert!(matches!(
            fingerprints(&paths)[..],
            [Fingerprint::Unreadable(io::ErrorKind::NotFound)]
        ));
        fs::write(&path, "aaaa").expect("write");
        let first = fingerprints(&paths);
        assert_eq!(fingerprints(&paths), first);
        // Same length, possibly the same mtime tick: the digest still tells them apart.
        fs::write(&path, "bbbb").expect("write");
        assert_ne!(fingerprints(&paths), first);
    }

    #[test]
    fn throttle_logs_a_repeated_error_once_a_minute() {
        let start = Instant::now();
        let at = |seconds| start + Duration::from_secs(seconds);
        let mut throttle = Throttle::default();
        let steps = [
            (0, "key mismatch", true),
            (1, "key mismatch", false),
            (59, "key mismatch", false),
            (60, "key mismatch", true),
            (61, "key mismatch", false),
            (62, "file missing", true),
            (63, "key mismatch", true),
        ];
        for (seconds, error, logged) in steps {
            assert_eq!(
                throttle.should_log(error, at(seconds)),
                logged,
                "{error} at {seconds}s"
            );
        }
        // After a success the same error is news again.
        throttle.clear();
        assert!(throttle.should_log("key mismatch", at(64)));
    }
}
