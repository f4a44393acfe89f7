//! Network partitions between node addresses with iptables: which node pairs a partition
//! cuts ("grudges", as in Jepsen), the exact iptables argv for them (pure, tested), and the
//! [`Firewall`] that runs them in a chain of its own and always removes it.
//!
//! Every node binds its own 127.0.0.(10+i) for listening *and* for outgoing peer connections,
//! so a pair of nodes is cut with `-s A -d B -j DROP` plus `-s B -d A -j DROP`. Loopback
//! packets traverse OUTPUT and then INPUT; the rules sit in INPUT only, because a DROP in
//! OUTPUT fails the sender's `send()` at once with EPERM, which a real partition never does —
//! in INPUT packets vanish silently and TCP retransmits, as across a broken network. Clients
//! connect from 127.0.0.1 ([`crate::api::CLIENT_SOURCE`]), which no rule names.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use serde::Serialize;

use crate::cluster::node_ip;

/// The harness's own chain; nothing else is ever touched.
pub const CHAIN: &str = "CAIRN-JEPSEN";

/// Who stops hearing whom. Node ids refer to the cluster's members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "grudge", rename_all = "snake_case")]
pub enum Grudge {
    /// One node cut from every other node.
    Isolate { node: u64 },
    /// The current leader cut from every other node (resolved when applied).
    IsolateLeader,
    /// A minority cut from the majority (the rest).
    Split { minority: Vec<u64> },
    /// Five nodes in a ring (`order`): each sees only its two neighbours — every node sees a
    /// majority (itself and two others), and no two nodes see the same one.
    MajoritiesRing { order: Vec<u64> },
    /// `order[0..2]` and `order[3..]` cannot talk to each other; `order[2]` sees both.
    Bridge { order: Vec<u64> },
}

impl Grudge {
    pub fn describe(&self) -> String {
        let list = |v: &[u64]| {
            v.iter()
                .map(|i| format!("n{i}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        match self {
            Grudge::Isolate { node } => format!("isolate n{node}"),
            Grudge::IsolateLeader => "isolate the leader".into(),
            Grudge::Split { minority } => format!("split {} | rest", list(minority)),
            Grudge::MajoritiesRing { order } => format!("majorities ring {}", list(order)),
            Grudge::Bridge { order } => format!(
                "bridge {} | {} | {}",
                list(&order[..2.min(order.len())]),
                list(&order[2.min(order.len())..3.min(order.len())]),
                list(&order[3.min(order.len())..])
            ),
        }
    }
}

/// The unordered node pairs `(a, b)`, `a < b`, that `grudge` cuts, in sorted order. `leader`
/// is needed only for [`Grudge::IsolateLeader`].
pub fn cuts(
    grudge: &Grudge,
    nodes: &[u64],
    leader: Option<u64>,
) -> Result<Vec<(u64, u64)>, String> {
    let pair = |a: u64, b: u64| if a < b { (a, b) } else { (b, a) };
    let isolate = |x: u64| -> Vec<(u64, u64)> {
        nodes
            .iter()
            .filter(|&&y| y != x)
            .map(|&y| pair(x, y))
            .collect()
    };
    let mut out = match grudge {
        Grudge::Isolate { node } => isolate(*node),
        Grudge::IsolateLeader => isolate(leader.ok_or("no leader to isolate")?),
        Grudge::Split { minority } => {
            let mut v = Vec::new();
            for &a in minority {
                for &b in nodes.iter().filter(|b| !minority.contains(b)) {
                    v.push(pair(a, b));
                }
            }
            v
        }
        Grudge::MajoritiesRing { order } => {
            let n = order.len();
            if n < 5 {
                return Err(format!("a majorities ring needs 5 nodes, not {n}"));
            }
            let mut v = Vec::new();
            for i in 0..n {
                for j in i + 1..n {
                    let d = j - i;
                    if d != 1 && d != n - 1 {
                        v.push(pair(order[i], order[j]));
                    }
                }
            }
            v
        }
        Grudge::Bridge { order } => {
            if order.len() < 5 {
                return Err(format!("a bridge needs 5 nodes, not {}", order.len()));
            }
            let mut v = Vec::new();
            for &a in &order[..2] {
                for &b in &order[3..] {
                    v.push(pair(a, b));
                }
            }
            v
        }
    };
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn argv(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_owned()).collect()
}

/// Creates the chain and sends INPUT through it first. `-w` waits for the xtables lock.
pub fn setup_rules(chain: &str) -> Vec<Vec<String>> {
    vec![
        argv(&["-w", "-N", chain]),
        argv(&["-w", "-I", "INPUT", "1", "-j", chain]),
    ]
}

/// DROP rules for both directions of every cut pair.
pub fn cut_rules(chain: &str, cuts: &[(Ipv4Addr, Ipv4Addr)]) -> Vec<Vec<String>> {
    let mut rules = Vec::new();
    for (a, b) in cuts {
        for (s, d) in [(a, b), (b, a)] {
            let (s, d) = (s.to_string(), d.to_string());
            rules.push(argv(&["-w", "-A", chain, "-s", &s, "-d", &d, "-j", "DROP"]));
        }
    }
    rules
}

/// Removes every cut (the chain stays, empty).
pub fn heal_rules(chain: &str) -> Vec<Vec<String>> {
    vec![argv(&["-w", "-F", chain])]
}

/// Unhooks, flushes and deletes the chain.
pub fn teardown_rules(chain: &str) -> Vec<Vec<String>> {
    vec![
        argv(&["-w", "-D", "INPUT", "-j", chain]),
        argv(&["-w", "-F", chain]),
        argv(&["-w", "-X", chain]),
    ]
}

/// Node pairs as address pairs.
pub fn addresses(pairs: &[(u64, u64)]) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    pairs
        .iter()
        .map(|&(a, b)| (node_ip(a), node_ip(b)))
        .collect()
}

/// Why partitions cannot run here, with what to do about it; `None` when they can.
pub fn unavailable_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    let bin = iptables_bin();
    if let Some(reason) = missing_prerequisite(euid, bin.is_some()) {
        return Some(reason);
    }
    match Command::new(bin?).args(["-w", "-S", "INPUT"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!(
            "`iptables -S INPUT` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run iptables: {e}")),
    }
}

/// The reason for the two prerequisites: root, and the `iptables` binary.
pub fn missing_prerequisite(euid: u32, iptables_found: bool) -> Option<String> {
    if euid != 0 {
        return Some("not running as root (iptables needs CAP_NET_ADMIN)".into());
    }
    if !iptables_found {
        return Some(
            "the `iptables` binary is not installed; install it with \
             `apt-get install -y iptables`"
                .into(),
        );
    }
    None
}

/// The `iptables` binary: on `PATH`, else in /usr/sbin or /sbin (root's PATH under sudo or
/// cron may lack them).
pub fn iptables_bin() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("iptables"))
            .find(|f| f.is_file())
    });
    on_path.or_else(|| {
        ["/usr/sbin/iptables", "/sbin/iptables"]
            .into_iter()
            .map(PathBuf::from)
            .find(|f| f.is_file())
    })
}

fn run(rule: &[String]) -> Result<(), String> {
    let bin = iptables_bin().ok_or("the `iptables` binary is gone")?;
    let out = Command::new(bin)
        .args(rule)
        .output()
        .map_err(|e| format!("cannot run iptables: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`iptables {}` failed: {}",
            rule.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The harness's iptables chain. Removed on [`Firewall::teardown`] and on drop (panic,
/// Ctrl-C); a chain left by a crashed earlier run is removed on [`Firewall::install`].
#[derive(Debug)]
pub struct Firewall {
    chain: String,
    installed: bool,
}

impl Firewall {
    pub fn install(chain: &str) -> Result<Firewall, String> {
        let mut fw = Firewall {
            chain: chain.to_owned(),
            installed: true,
        };
        fw.remove_stale();
        for rule in setup_rules(chain) {
            run(&rule)?;
        }
        Ok(fw)
    }

    /// Best effort: a hook may be present more than once after a crash.
    fn remove_stale(&mut self) {
        for _ in 0..8 {
            if run(&argv(&["-w", "-D", "INPUT", "-j", &self.chain])).is_err() {
                break;
            }
        }
        let _ = run(&argv(&["-w", "-F", &self.chain]));
        let _ = run(&argv(&["-w", "-X", &self.chain]));
    }

    /// Cuts these node pairs (in addition to any cut already in place).
    pub fn cut(&mut self, pairs: &[(u64, u64)]) -> Result<(), String> {
        for rule in cut_rules(&self.chain, &addresses(pairs)) {
            run(&rule)?;
        }
        Ok(())
    }

    pub fn heal(&mut self) -> Result<(), String> {
        for rule in heal_rules(&self.chain) {
            run(&rule)?;
        }
        Ok(())
    }

    pub fn teardown(&mut self) -> Result<(), String> {
        if !self.installed {
            return Ok(());
        }
        self.installed = false;
        let mut first_error = None;
        for rule in teardown_rules(&self.chain) {
            if let Err(e) = run(&rule) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Firewall {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("removing iptables chain {}: {e}", self.chain);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE: [u64; 5] = [1, 2, 3, 4, 5];

    #[test]
    fn isolating_a_node_cuts_it_from_every_other() {
        let c = cuts(&Grudge::Isolate { node: 2 }, &[1, 2, 3], None).expect("cuts");
        assert_eq!(c, [(1, 2), (2, 3)]);
        let c = cuts(&Grudge::IsolateLeader, &[1, 2, 3], Some(3)).expect("cuts");
        assert_eq!(c, [(1, 3), (2, 3)]);
        assert!(cuts(&Grudge::IsolateLeader, &[1, 2, 3], None).is_err());
    }

    #[test]
    fn a_split_cuts_exactly_the_minority_from_the_majority() {
        let c = cuts(
            &Grudge::Split {
                minority: vec![4, 1],
            },
            &FIVE,
            None,
        )
        .expect("cuts");
        assert_eq!(c, [(1, 2), (1, 3), (1, 5), (2, 4), (3, 4), (4, 5)]);
    }

    #[test]
    fn in_a_majorities_ring_each_node_sees_a_different_majority() {
        let order = vec![3, 1, 4, 5, 2];
        let c = cuts(
            &Grudge::MajoritiesRing {
                order: order.clone(),
            },
            &FIVE,
            None,
        )
        .expect("cuts");
        assert_eq!(c.len(), 5, "each node loses its two non-neighbours");
        let sees = |x: u64| -> Vec<u64> {
            let mut v: Vec<u64> = FIVE
                .iter()
                .copied()
                .filter(|&y| y == x || !c.contains(&(x.min(y), x.max(y))))
                .collect();
            v.sort_unstable();
            v
        };
        let views: Vec<Vec<u64>> = FIVE.iter().map(|&x| sees(x)).collect();
        for v in &views {
            assert_eq!(v.len(), 3, "a majority: {v:?}");
        }
        for i in 0..5 {
            for j in i + 1..5 {
                assert_ne!(views[i], views[j]);
            }
        }
        // 3's neighbours in the ring are 1 and 2.
        assert_eq!(sees(3), [1, 2, 3]);
    }

    #[test]
    fn a_bridge_node_sees_both_halves() {
        let c = cuts(
            &Grudge::Bridge {
                order: vec![1, 2, 3, 4, 5],
            },
            &FIVE,
            None,
        )
        .expect("cuts");
        assert_eq!(c, [(1, 4), (1, 5), (2, 4), (2, 5)]);
        assert!(cuts(
            &Grudge::Bridge {
                order: vec![1, 2, 3]
            },
            &[1, 2, 3],
            None
        )
        .is_err());
    }

    #[test]
    fn rules_drop_both_directions_by_node_address_in_our_chain() {
        let rules = cut_rules(CHAIN, &addresses(&[(1, 2)]));
        let expect: Vec<Vec<String>> = [
            "-w -A CAIRN-JEPSEN -s 127.0.0.11 -d 127.0.0.12 -j DROP",
            "-w -A CAIRN-JEPSEN -s 127.0.0.12 -d 127.0.0.11 -j DROP",
        ]
        .iter()
        .map(|r| r.split(' ').map(String::from).collect())
        .collect();
        assert_eq!(rules, expect);
        assert_eq!(
            setup_rules(CHAIN),
            [
                argv(&["-w", "-N", "CAIRN-JEPSEN"]),
                argv(&["-w", "-I", "INPUT", "1", "-j", "CAIRN-JEPSEN"])
            ]
        );
        assert_eq!(heal_rules(CHAIN), [argv(&["-w", "-F", "CAIRN-JEPSEN"])]);
        let down = teardown_rules(CHAIN);
        assert_eq!(down[0], argv(&["-w", "-D", "INPUT", "-j", "CAIRN-JEPSEN"]));
        assert_eq!(down[2], argv(&["-w", "-X", "CAIRN-JEPSEN"]));
    }

    #[test]
    fn a_missing_prerequisite_is_named_with_its_remedy() {
        assert_eq!(missing_prerequisite(0, true), None);
        assert!(
            missing_prerequisite(1000, true).is_some_and(|r| r.starts_with("not running as root"))
        );
        assert_eq!(
            missing_prerequisite(0, false).as_deref(),
            Some("the `iptables` binary is not installed; install it with `apt-get install -y iptables`")
        );
    }

    #[test]
    fn grudges_describe_themselves() {
        assert_eq!(Grudge::Isolate { node: 2 }.describe(), "isolate n2");
        assert_eq!(
            Grudge::Bridge {
                order: vec![1, 2, 3, 4, 5]
            }
            .describe(),
            "bridge n1,n2 | n3 | n4,n5"
        );
    }
}
