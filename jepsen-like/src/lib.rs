//! `jepsen-like`: the black-box fault-injection harness of cairn. It shares no code with the
//! server; it talks to cairn only through its public API and judges what it saw.
//!
//! Map of the crate:
//! * [`history`] — the `history.jsonl` event format (the contract with clients and any
//!   independent checker), reading/writing it, and pairing events into [`history::Op`]s.
//! * [`checker`] — offline judges: per-key linearizability of a register (porcupine-style
//!   WGL search with a budget; `Unknown` is never a pass) and, in [`checker::set`], the
//!   acknowledged-but-lost set checker.

pub mod checker;
pub mod history;
