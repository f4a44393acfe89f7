//! The workloads: what logical clients do against cairn and how each history is judged.
//! Each submodule owns its op generator, its API mapping, its history file and its check;
//! none knows about faults.
//!
//! * [`register`] — per-key read/write/cas/delete on instances, checked for linearizability
//!   (`history.jsonl`, the format of [`crate::history`]).
//! * [`set`] — distinct registrations, then reads of the whole set: nothing acknowledged
//!   lost, nothing unexpected (`set.jsonl`).
//! * [`lease`] — TTL instances renewed by heartbeats: never seen critical while an
//!   acknowledged renewal covers them (`lease.jsonl`).

pub mod lease;
pub mod register;
pub mod set;

use std::fmt;

use serde::Serialize;

/// The workloads, as named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkloadKind {
    Register,
    Set,
    Lease,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 3] = [
        WorkloadKind::Register,
        WorkloadKind::Set,
        WorkloadKind::Lease,
    ];

    pub fn name(self) -> &'static str {
        match self {
            WorkloadKind::Register => "register",
            WorkloadKind::Set => "set",
            WorkloadKind::Lease => "lease",
        }
    }

    pub fn parse(s: &str) -> Option<WorkloadKind> {
        WorkloadKind::ALL.into_iter().find(|k| k.name() == s)
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Valid, invalid, or undecided. Undecided never passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictClass {
    Valid,
    Invalid,
    Unknown,
}

impl fmt::Display for VerdictClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VerdictClass::Valid => "valid",
            VerdictClass::Invalid => "invalid",
            VerdictClass::Unknown => "unknown",
        })
    }
}
