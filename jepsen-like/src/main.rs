//! Placeholder entry point: `jepsen-like check HISTORY.jsonl [TIMEOUT_SECS]` checks a recorded
//! history offline and prints the report as JSON. Exit code: 0 valid, 1 invalid, 2 unknown,
//! 3 unreadable or malformed history or bad usage.

use std::fs::File;
use std::io::BufReader;
use std::process::ExitCode;
use std::time::Duration;

use jepsen_like::checker::{self, Budget, Verdict};
use jepsen_like::history;

/// Default checker timeout when none is given.
const DEFAULT_TIMEOUT_SECS: u64 = 300;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (path, timeout) = match args.as_slice() {
        [_, cmd, path] if cmd == "check" => (path, DEFAULT_TIMEOUT_SECS),
        [_, cmd, path, secs] if cmd == "check" => match secs.parse() {
            Ok(s) => (path, s),
            Err(_) => return usage(),
        },
        _ => return usage(),
    };
    let ops = match File::open(path)
        .map_err(|e| e.to_string())
        .and_then(|f| history::read_jsonl(BufReader::new(f)).map_err(|e| e.to_string()))
        .and_then(|events| history::pair(&events).map_err(|e| e.to_string()))
    {
        Ok(ops) => ops,
        Err(e) => {
            eprintln!("{path}: {e}");
            return ExitCode::from(3);
        }
    };
    let report = checker::check_report(&ops, &Budget::with_timeout(Duration::from_secs(timeout)));
    match serde_json::to_string_pretty(&report) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("cannot serialize report: {e}");
            return ExitCode::from(3);
        }
    }
    eprintln!("{}", report.verdict);
    ExitCode::from(match report.verdict {
        Verdict::Valid => 0,
        Verdict::Invalid { .. } => 1,
        Verdict::Unknown { .. } => 2,
    })
}

fn usage() -> ExitCode {
    eprintln!("usage: jepsen-like check HISTORY.jsonl [TIMEOUT_SECS]");
    ExitCode::from(3)
}
