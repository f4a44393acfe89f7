//! The harness's CI profile (`--ci`: 3 nodes, seeds 1 and 2, every nemesis and workload)
//! against real cairn builds: the normal binary must be valid on both seeds, and each bug
//! planted by a `chaos-bugs` build must be caught (some workload invalid, guards held) on
//! both seeds.
//!
//! These runs take minutes and use the fixed node addresses 127.0.0.11-15, so they run only
//! when `JEPSEN_CI=1` (scripts/test sets it, after the other tests, one run at a time), with
//! `CAIRN_BIN` (a normal debug or release build) and `CAIRN_CHAOS_BIN` (one built with
//! `--features chaos-bugs`). Otherwise each test prints why it skipped.

use std::path::PathBuf;
use std::process::Command;

/// The binary named by `var`, or why the test cannot run.
fn binary(var: &str) -> Result<PathBuf, String> {
    if std::env::var("JEPSEN_CI").as_deref() != Ok("1") {
        return Err("JEPSEN_CI is not 1 (scripts/test runs this profile last)".into());
    }
    let path = std::env::var_os(var).ok_or_else(|| format!("{var} is not set"))?;
    let path = PathBuf::from(path);
    if !path.is_file() {
        return Err(format!("{var}={} is not a file", path.display()));
    }
    Ok(path)
}

/// Runs `jepsen-like --ci` with `extra` arguments in `out`; returns its exit success and stdout.
fn ci_run(cairn: &PathBuf, out: &PathBuf, extra: &[&str]) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_jepsen-like"))
        .arg("--ci")
        .arg("--cairn-bin")
        .arg(cairn)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("jepsen-like runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    if !stderr.trim().is_empty() {
        println!("stderr:\n{stderr}");
    }
    (output.status.success(), stdout)
}

/// A fresh directory for the runs of one test (removed once the test passed; kept on failure
/// for the histories and node logs).
fn tempfile_dir() -> PathBuf {
    let base = std::env::var_os("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!(
        "jepsen-ci-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("run directory");
    dir
}

#[test]
fn normal_build_is_valid_on_the_ci_seeds() {
    let cairn = match binary("CAIRN_BIN") {
        Ok(b) => b,
        Err(reason) => return println!("skipped: {reason}"),
    };
    let out = tempfile_dir();
    let (ok, stdout) = ci_run(&cairn, &out, &[]);
    assert!(
        ok,
        "the CI profile is not valid on a normal build:\n{stdout}"
    );
    assert!(stdout.contains("2 of 2 runs valid"), "{stdout}");
    let _ = std::fs::remove_dir_all(out);
}

/// Runs the CI profile on a build with `bug` planted on every node; both seeds must catch it.
fn planted_bug_is_caught(bug: &str) {
    let cairn = match binary("CAIRN_CHAOS_BIN") {
        Ok(b) => b,
        Err(reason) => return println!("skipped: {reason}"),
    };
    let out = tempfile_dir();
    let extra = out.join("chaos.toml");
    std::fs::write(&extra, format!("[chaos]\nbugs = [\"{bug}\"]\n")).expect("extra config");
    let extra = extra.to_str().expect("utf-8 path").to_owned();
    let (ok, stdout) = ci_run(
        &cairn,
        &out,
        &["--expect-invalid", "--extra-config", &extra],
    );
    assert!(
        ok,
        "planted bug `{bug}` was not caught on every CI seed:\n{stdout}"
    );
    assert!(stdout.contains("2 of 2 runs caught a bug"), "{stdout}");
    let _ = std::fs::remove_dir_all(out);
}

#[test]
fn reads_served_without_read_index_are_caught() {
    planted_bug_is_caught("stale-reads");
}

#[test]
fn writes_acknowledged_before_commit_are_caught() {
    planted_bug_is_caught("early-ack");
}

#[test]
fn writes_applied_on_a_follower_are_caught() {
    planted_bug_is_caught("follower-apply");
}
