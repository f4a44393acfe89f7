//! The leader's lease table (DESIGN.md decision 4): renewals move an in-memory deadline and
//! are never written to the log; only expiry (and reaping) goes through Raft. A node that is
//! not leader keeps no table, and a new leader starts every lease at a full TTL.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::registry::{Health, Instance, LeaseRef, Registry};

#[derive(Debug, Clone, Copy)]
struct Lease {
    deadline: Instant,
    /// The instance's modify_index the deadline belongs to: a re-registration (new index)
    /// starts a fresh lease, and expiry is proposed guarded by this index.
    modify_index: u64,
}

#[derive(Default)]
struct Table {
    /// The term this table was built in; `None` when not leader.
    term: Option<u64>,
    leases: HashMap<(String, String), Lease>,
    /// Leases whose expiry the keeper has proposed and not yet seen applied: a renewal of one
    /// must not be acknowledged as a plain renewal (the expiry may commit after it), so it
    /// waits and then revives the instance through the log.
    expiring: HashSet<(String, String)>,
}

/// What one tick of the lease keeper found to propose.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Due {
    pub expired: Vec<LeaseRef>,
    pub reap: Vec<LeaseRef>,
}

#[derive(Default)]
pub(crate) struct Leases {
    table: Mutex<Table>,
}

fn lease_ref(i: &Instance) -> LeaseRef {
    LeaseRef {
        service: i.service.clone(),
        id: i.id.clone(),
        modify_index: i.modify_index,
    }
}

fn ttl(i: &Instance) -> Duration {
    Duration::from_secs(u64::from(i.ttl_seconds.unwrap_or(0)))
}

impl Leases {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reconciles the table with the applied registry and returns what is due.
    /// `leader_term` is `Some(term)` only while this node is leader.
    pub(crate) fn tick(
        &self,
        leader_term: Option<u64>,
        registry: &Registry,
        now: Instant,
        now_ms: u64,
        reap_after: Duration,
    ) -> Due {
        let mut t = self.table();
        if t.term != leader_term {
            // Leadership changed (or was lost): forget every deadline, so a new leader grants a
            // full TTL instead of trusting timings it never observed.
            t.leases.clear();
            t.expiring.clear();
            t.term = leader_term;
        }
        let mut due = Due::default();
        if leader_term.is_none() {
            return due;
        }
        let mut live = HashSet::new();
        let reap_ms = u64::try_from(reap_after.as_millis()).unwrap_or(u64::MAX);
        for inst in registry.leased() {
            let key = (inst.service.clone(), inst.id.clone());
            match inst.health {
                Health::Passing => {
                    let fresh = Lease {
                        deadline: now + ttl(inst),
                        modify_index: inst.modify_index,
                    };
                    let lease = t.leases.entry(key.clone()).or_insert(fresh);
                    if lease.modify_index != inst.modify_index {
                        *lease = fresh;
                    }
                    if lease.deadline <= now {
                        due.expired.push(lease_ref(inst));
                    }
                    live.insert(key);
                }
                Health::Critical => {
                    if now_ms >= inst.updated_at_ms.saturating_add(reap_ms) {
                        due.reap.push(lease_ref(inst));
                    }
                }
            }
        }
        t.leases.retain(|k, _| live.contains(k));
        // An expiry that was applied (the instance is no longer passing) needs no mark; one
        // whose proposal failed keeps it until the keeper's next proposal settles it.
        t.expiring.retain(|k| live.contains(k));
        due
    }

    /// The keeper is about to propose the expiry of `leases`.
    pub(crate) fn mark_expiring(&self, leases: &[LeaseRef]) {
        let mut t = self.table();
        for l in leases {
            t.expiring.insert((l.service.clone(), l.id.clone()));
        }
    }

    /// The expiry of `leases` was applied (or a new leader will decide afresh).
    pub(crate) fn clear_expiring(&self, leases: &[LeaseRef]) {
        let mut t = self.table();
        for l in leases {
            t.expiring.remove(&(l.service.clone(), l.id.clone()));
        }
    }

    /// Renews the lease of a passing instance (leader only). Returns its TTL, or `None` while
    /// an expiry of it is in flight (the caller waits for it and revives the instance).
    pub(crate) fn renew(
        &self,
        leader_term: u64,
        inst: &Instance,
        now: Instant,
    ) -> Option<Duration> {
        let mut t = self.table();
        if t.term != Some(leader_term) {
            t.leases.clear();
            t.expiring.clear();
            t.term = Some(leader_term);
        }
        if t.expiring
            .contains(&(inst.service.clone(), inst.id.clone()))
        {
            return None;
        }
        let ttl = ttl(inst);
        t.leases.insert(
            (inst.service.clone(), inst.id.clone()),
            Lease {
                deadline: now + ttl,
                modify_index: inst.modify_index,
            },
        );
        Some(ttl)
    }

    /// Time left on a lease, if this node tracks it.
    pub(crate) fn remaining(&self, service: &str, id: &str, now: Instant) -> Option<Duration> {
        let t = self.table();
        t.leases
            .get(&(service.to_string(), id.to_string()))
            .map(|l| l.deadline.saturating_duration_since(now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Command, InstanceSpec, Precondition};

    fn registry_with(ttl: Option<u32>) -> Registry {
        let mut r = Registry::new();
        let spec = InstanceSpec {
            address: "10.0.0.1".into(),
            port: 80,
            tags: vec![],
            meta: Default::default(),
            zone: None,
            ttl_seconds: ttl,
        };
        r.apply(
            1,
            &Command::Register {
                service: "web".into(),
                id: "a".into(),
                spec,
                owner: "service/web".into(),
                precondition: Precondition::None,
                now_ms: 1_000,
            },
        );
        r
    }

    #[test]
    fn lease_expires_only_after_ttl_and_renewal_extends_it() {
        let r = registry_with(Some(2));
        let l = Leases::default();
        let t0 = Instant::now();
        let reap = Duration::from_secs(3600);
        assert_eq!(l.tick(Some(1), &r, t0, 0, reap), Due::default());
        assert_eq!(
            l.tick(Some(1), &r, t0 + Duration::from_millis(1900), 0, reap),
            Due::default()
        );
        let inst = r.instance("web", "a").expect("registered").clone();
        assert_eq!(
            l.renew(1, &inst, t0 + Duration::from_millis(1900)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            l.tick(Some(1), &r, t0 + Duration::from_millis(3000), 0, reap),
            Due::default()
        );
        let due = l.tick(Some(1), &r, t0 + Duration::from_millis(4000), 0, reap);
        assert_eq!(due.expired.len(), 1);
        assert_eq!(due.expired[0].modify_index, inst.modify_index);
    }

    /// Once the keeper proposed an expiry, a renewal must not be acknowledged as a plain
    /// renewal until the expiry settled: it would be undone when the entry commits.
    #[test]
    fn no_plain_renewal_while_an_expiry_is_in_flight() {
        let r = registry_with(Some(2));
        let l = Leases::default();
        let t0 = Instant::now();
        let reap = Duration::from_secs(3600);
        l.tick(Some(1), &r, t0, 0, reap);
        let due = l.tick(Some(1), &r, t0 + Duration::from_secs(3), 0, reap);
        assert_eq!(due.expired.len(), 1);
        let inst = r.instance("web", "a").expect("registered").clone();
        l.mark_expiring(&due.expired);
        assert_eq!(l.renew(1, &inst, t0 + Duration::from_secs(3)), None);
        // A proposal that failed leaves the mark: still no plain renewal, and still due.
        let again = l.tick(Some(1), &r, t0 + Duration::from_secs(4), 0, reap);
        assert_eq!(again.expired.len(), 1);
        assert_eq!(l.renew(1, &inst, t0 + Duration::from_secs(4)), None);
        // Applied (cleared by the keeper): renewals work again.
        l.clear_expiring(&again.expired);
        assert!(l.renew(1, &inst, t0 + Duration::from_secs(4)).is_some());
        // A new term forgets the marks.
        l.mark_expiring(&again.expired);
        assert!(l.renew(2, &inst, t0 + Duration::from_secs(5)).is_some());
    }

    #[test]
    fn new_term_grants_a_full_ttl() {
        let r = registry_with(Some(2));
        let l = Leases::default();
        let t0 = Instant::now();
        let reap = Duration::from_secs(3600);
        l.tick(Some(1), &r, t0, 0, reap);
        // Not leader for a while, then leader again in term 3: the old deadline is forgotten.
        assert_eq!(
            l.tick(None, &r, t0 + Duration::from_secs(1), 0, reap),
            Due::default()
        );
        assert_eq!(
            l.tick(Some(3), &r, t0 + Duration::from_secs(3), 0, reap),
            Due::default()
        );
        assert_eq!(
            l.tick(Some(3), &r, t0 + Duration::from_millis(4900), 0, reap),
            Due::default()
        );
        assert_eq!(
            l.tick(Some(3), &r, t0 + Duration::from_millis(5100), 0, reap)
                .expired
                .len(),
            1
        );
    }

    #[test]
    fn instances_without_ttl_have_no_lease() {
        let r = registry_with(None);
        let l = Leases::default();
        let t0 = Instant::now();
        assert_eq!(
            l.tick(
                Some(1),
                &r,
                t0 + Duration::from_secs(999),
                0,
                Duration::from_secs(1)
            ),
            Due::default()
        );
    }
}
