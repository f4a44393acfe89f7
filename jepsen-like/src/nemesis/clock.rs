//! Clock faults with libfaketime: every server runs with `libfaketimeMT.so.1` preloaded and
//! reads its wall-clock offset from its own file, which the nemesis rewrites (libfaketime
//! re-reads it every second). Only the wall clock moves: monotonic clocks (raft timers,
//! lease deadlines) are left alone, as a real NTP step would leave them, so a bump tests
//! that nothing in cairn's safety depends on wall-clock agreement between nodes.

use std::io;
use std::path::{Path, PathBuf};

/// Where Debian's `libfaketime` package puts the library (multi-threaded variant).
const CANDIDATES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
];

/// The library, or why clock faults cannot run here.
pub fn find_library() -> Result<PathBuf, String> {
    CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "libfaketime is not installed (apt-get install libfaketime); looked in ".to_owned()
                + &CANDIDATES.join(", ")
        })
}

/// One offset file per node.
#[derive(Debug, Clone)]
pub struct Clocks {
    library: PathBuf,
    dir: PathBuf,
}

/// libfaketime's relative offset syntax: `+N` / `-N` seconds.
fn offset_text(offset_s: i64) -> String {
    format!("{offset_s:+}\n")
}

impl Clocks {
    /// Clocks whose offset files live in `dir`, every node starting at offset 0.
    pub fn new(library: PathBuf, dir: &Path, nodes: &[u64]) -> io::Result<Clocks> {
        std::fs::create_dir_all(dir)?;
        let clocks = Clocks {
            library,
            dir: dir.to_path_buf(),
        };
        for &n in nodes {
            clocks.set_offset(n, 0)?;
        }
        Ok(clocks)
    }

    fn file(&self, node: u64) -> PathBuf {
        self.dir.join(format!("n{node}.faketime"))
    }

    /// The environment that puts node `node`'s server under its clock.
    pub fn env(&self, node: u64) -> Vec<(String, String)> {
        let file = self.file(node).to_string_lossy().into_owned();
        [
            ("LD_PRELOAD", self.library.to_string_lossy().into_owned()),
            ("FAKETIME_TIMESTAMP_FILE", file),
            ("FAKETIME_CACHE_DURATION", "1".to_owned()),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
            // File timestamps stay real (RocksDB and the cert reloader look at them).
            ("NO_FAKE_STAT", "1".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Moves node `node`'s wall clock to real time + `offset_s` (written atomically).
    pub fn set_offset(&self, node: u64, offset_s: i64) -> io::Result<()> {
        let file = self.file(node);
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, offset_text(offset_s))?;
        std::fs::rename(&tmp, &file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_use_libfaketime_s_relative_syntax() {
        assert_eq!(offset_text(0), "+0\n");
        assert_eq!(offset_text(90), "+90\n");
        assert_eq!(offset_text(-300), "-300\n");
    }

    #[test]
    fn files_start_at_zero_and_are_rewritten() {
        let dir = std::env::temp_dir().join(format!("jepsen-clock-{}", std::process::id()));
        let c = Clocks::new(PathBuf::from("/lib/x.so"), &dir, &[1, 2]).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("n2.faketime")).unwrap(),
            "+0\n"
        );
        c.set_offset(2, -45).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("n2.faketime")).unwrap(),
            "-45\n"
        );
        let env = c.env(1);
        assert!(env.contains(&("LD_PRELOAD".into(), "/lib/x.so".into())));
        assert!(env
            .iter()
            .any(|(k, v)| k == "FAKETIME_TIMESTAMP_FILE" && v.ends_with("n1.faketime")));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
