//! `jepsen-like`: the black-box fault-injection harness of cairn. It shares no code with the
//! server; it drives the `cairn` binary (CLI and `cairn server` processes) and talks to it
//! only through its public HTTPS API, injects faults, records what clients saw, and judges it.
//!
//! Map of the crate:
//! * [`history`] — the `history.jsonl` event format (the contract with clients and any
//!   independent checker), reading/writing it, and pairing events into [`history::Op`]s.
//! * [`checker`] — offline judges: per-key linearizability of a register (porcupine-style
//!   WGL search with a budget; `Unknown` is never a pass) and, in [`checker::set`], the
//!   acknowledged-but-lost set checker.
//! * [`recorder`] — the run's one monotonic clock and its append-only JSON-lines journals.
//! * [`api`] — the HTTPS client for cairn's API, and the one place where an answer is
//!   classified as applied / not applied / unknown.
//! * [`cluster`] — the cluster under test: files made with the `cairn` CLI, processes
//!   started, signalled and wiped by pid.
//! * [`client`] — single-threaded logical clients bound to nodes; process ids; `ops.jsonl`.
//! * [`workload`] — register, set and lease: op generators, API mapping, histories, checks.
//! * [`nemesis`] — the seeded fault plan and its execution (kill, pause, iptables
//!   partitions, membership changes), recorded in `nemesis.jsonl`.
//! * [`report`] — op and fault statistics, the anti-vacuity guards, `summary.json` and
//!   `report.html`.
//! * [`run`] — the composition root: one run from empty directory to verdicts.

pub mod api;
pub mod checker;
pub mod client;
pub mod cluster;
pub mod history;
pub mod nemesis;
pub mod recorder;
pub mod report;
pub mod run;
pub mod workload;
