//! Which verdict applies to a cgroup: the entry of the *deepest* cgroup on the path from the
//! attach root down to it, else the configured default.
//!
//! Written once, generic over how ancestors and entries are looked up, so the walk the
//! kernel runs (`bpf_get_current_ancestor_cgroup_id` / `bpf_skb_ancestor_cgroup_id` and the
//! VERDICTS map) is the one the host tests exercise. The loop has a constant bound for the
//! verifier.

use crate::{GuardConfig, Verdict, VerdictEntry};

/// cgroup levels below the attach root that are searched for a policy entry. Pod cgroups sit
/// 1–3 levels below kubepods, containers one more; 16 leaves room for nested runtimes.
/// Entries deeper than this below the root are never seen.
pub const MAX_DEPTH: u32 = 16;

/// The verdict that applies to an attempt's cgroup, and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub verdict: Verdict,
    /// Counter class of the entry (0 for the default verdict).
    pub class: u32,
    /// The cgroup whose entry decided; 0 when the default verdict applies.
    pub policy_cgroup_id: u64,
}

/// Walks from the attach root (`cfg.root_level`) down at most [`MAX_DEPTH`] levels.
/// `ancestor(level)` is the id of the attempt's ancestor at that cgroup level (its own id at
/// its own level) or 0 past its own level; `entry(id)` is the VERDICTS entry of a cgroup.
/// A deeper entry overrides a shallower one in both directions: an exempt pod under a
/// guarded namespace cgroup is exempt, a guarded container under an exempt pod is guarded.
#[inline(always)]
pub fn resolve(
    cfg: &GuardConfig,
    ancestor: impl Fn(u32) -> u64,
    entry: impl Fn(u64) -> Option<VerdictEntry>,
) -> Resolved {
    let mut found = Resolved {
        verdict: Verdict::from_raw(cfg.default_verdict),
        class: 0,
        policy_cgroup_id: 0,
    };
    for i in 0..MAX_DEPTH {
        let id = ancestor(cfg.root_level.wrapping_add(i));
        if id == 0 {
            break;
        }
        if let Some(e) = entry(id) {
            found = Resolved {
                verdict: Verdict::from_raw(e.verdict),
                class: e.class,
                policy_cgroup_id: id,
            };
        }
    }
    found
}

/// A cgroup path recorded for later, from the attach root down: `ids[i]` is the id of the
/// ancestor at level `root_level + i` (the path's own cgroup at its own level), 0 past it.
/// The connect hooks record one per MPTCP connection, from the task that connects its first
/// subflow, because the connection's further subflows are connected by a kernel worker whose
/// own cgroup says nothing about the connection (eBPF `mptcp` module).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CgroupPath {
    /// The attach root's level when the path was recorded.
    pub root_level: u32,
    pub _pad: u32,
    pub ids: [u64; MAX_DEPTH as usize],
}

impl CgroupPath {
    /// The id at cgroup `level`, as `resolve`'s `ancestor` wants it: 0 outside the path.
    #[inline(always)]
    pub fn ancestor(&self, level: u32) -> u64 {
        let i = level.wrapping_sub(self.root_level);
        if i < MAX_DEPTH {
            self.ids[i as usize]
        } else {
            0
        }
    }

    /// The path's own cgroup: its deepest recorded id (0 for an empty path).
    #[inline(always)]
    pub fn own_id(&self) -> u64 {
        let mut own = 0;
        for id in self.ids {
            if id == 0 {
                break;
            }
            own = id;
        }
        own
    }
}

/// The verdict for a socket call on a connection recorded as [`CgroupPath`]: a caller
/// outside the attach subtree (a kernel worker connecting a subflow) is judged by the
/// connection's path alone, since its own cgroup says nothing about the connection; a
/// caller inside it by the stricter of its own verdict and the connection's, so that
/// neither side can lend the other its exemption.
#[inline(always)]
pub fn for_connection(task: Resolved, connection: Resolved, task_inside: bool) -> Resolved {
    if task_inside && task.verdict == Verdict::Guard {
        task
    } else {
        connection
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cgroup path: ids of levels 0 (the cgroup2 root) down to the attempt's own cgroup.
    struct Path<'a>(&'a [u64]);

    impl Path<'_> {
        fn ancestor(&self, level: u32) -> u64 {
            self.0.get(level as usize).copied().unwrap_or(0)
        }
    }

    fn lookup<'a>(entries: &'a [(u64, Verdict, u32)]) -> impl Fn(u64) -> Option<VerdictEntry> + 'a {
        move |id| {
            entries
                .iter()
                .find(|(i, _, _)| *i == id)
                .map(|(_, v, class)| VerdictEntry {
                    verdict: *v as u32,
                    class: *class,
                })
        }
    }

    fn cfg(default: Verdict, root_level: u32) -> GuardConfig {
        let mut c = GuardConfig::zeroed();
        c.default_verdict = default as u32;
        c.root_level = root_level;
        c
    }

    fn run(cfg: &GuardConfig, path: &[u64], entries: &[(u64, Verdict, u32)]) -> Resolved {
        let path = Path(path);
        resolve(cfg, |l| path.ancestor(l), lookup(entries))
    }

    const PATH: [u64; 5] = [1, 10, 20, 30, 40];

    #[test]
    fn no_entry_on_the_path_gives_the_default() {
        for default in [Verdict::Guard, Verdict::Exempt] {
            let r = run(&cfg(default, 0), &PATH, &[(99, Verdict::Exempt, 3)]);
            assert_eq!(
                r,
                Resolved {
                    verdict: default,
                    class: 0,
                    policy_cgroup_id: 0
                }
            );
        }
        // A zeroed config fails closed.
        assert_eq!(
            run(&GuardConfig::zeroed(), &PATH, &[]).verdict,
            Verdict::Guard
        );
    }

    #[test]
    fn exempt_entry_below_a_guard_entry_wins() {
        let r = run(
            &cfg(Verdict::Guard, 0),
            &PATH,
            &[(20, Verdict::Guard, 5), (30, Verdict::Exempt, 6)],
        );
        assert_eq!(
            r,
            Resolved {
                verdict: Verdict::Exempt,
                class: 6,
                policy_cgroup_id: 30
            }
        );
    }

    #[test]
    fn guard_entry_below_an_exempt_entry_wins() {
        let r = run(
            &cfg(Verdict::Exempt, 0),
            &PATH,
            &[(10, Verdict::Exempt, 1), (40, Verdict::Guard, 2)],
        );
        assert_eq!(
            r,
            Resolved {
                verdict: Verdict::Guard,
                class: 2,
                policy_cgroup_id: 40
            }
        );
        // An entry of an ancestor applies to everything below it.
        let r = run(&cfg(Verdict::Guard, 0), &PATH, &[(10, Verdict::Exempt, 1)]);
        assert_eq!((r.verdict, r.policy_cgroup_id), (Verdict::Exempt, 10));
    }

    #[test]
    fn entries_above_the_attach_root_are_not_consulted() {
        // Attach root at level 2 (id 20): the entry of level 1 is outside the guarded tree.
        let r = run(&cfg(Verdict::Guard, 2), &PATH, &[(10, Verdict::Exempt, 1)]);
        assert_eq!(r.policy_cgroup_id, 0);
        assert_eq!(r.verdict, Verdict::Guard);
        let r = run(&cfg(Verdict::Guard, 2), &PATH, &[(20, Verdict::Exempt, 1)]);
        assert_eq!(r.policy_cgroup_id, 20);
    }

    #[test]
    fn depth_limit_bounds_the_walk() {
        // A path of root_level + MAX_DEPTH + 2 levels, ids 100 + level.
        let root_level = 3;
        let path: [u64; (3 + MAX_DEPTH + 2) as usize] = core::array::from_fn(|l| 100 + l as u64);
        let last_seen = 100 + u64::from(root_level + MAX_DEPTH - 1);
        let first_unseen = last_seen + 1;
        let c = cfg(Verdict::Guard, root_level);
        // The deepest level the walk reaches is honoured…
        let r = run(&c, &path, &[(last_seen, Verdict::Exempt, 4)]);
        assert_eq!(
            (r.verdict, r.policy_cgroup_id),
            (Verdict::Exempt, last_seen)
        );
        // …one level deeper is not, and the shallower entry stays in force.
        let r = run(
            &c,
            &path,
            &[(110, Verdict::Exempt, 4), (first_unseen, Verdict::Guard, 5)],
        );
        assert_eq!((r.verdict, r.policy_cgroup_id), (Verdict::Exempt, 110));
        // And the lookup is never asked about levels past the limit.
        let asked = core::cell::Cell::new(0u32);
        resolve(
            &c,
            |l| {
                asked.set(asked.get().max(l));
                100 + u64::from(l)
            },
            |_| None,
        );
        assert_eq!(asked.get(), root_level + MAX_DEPTH - 1);
    }

    #[test]
    fn the_walk_stops_at_the_attempts_own_cgroup() {
        // The attempt's cgroup is level 2 (id 20); ids past it are 0, and an entry keyed 0
        // (which a zeroed lookup could produce) is never consulted.
        let r = run(
            &cfg(Verdict::Guard, 0),
            &PATH[..3],
            &[(0, Verdict::Exempt, 9), (30, Verdict::Exempt, 9)],
        );
        assert_eq!(r.policy_cgroup_id, 0);
        assert_eq!(r.verdict, Verdict::Guard);
    }

    fn resolved(verdict: Verdict, id: u64) -> Resolved {
        Resolved {
            verdict,
            class: id as u32,
            policy_cgroup_id: id,
        }
    }

    #[test]
    fn a_caller_outside_the_subtree_is_judged_by_the_connection_alone() {
        // A kernel worker (default verdict guard) on an exempt pod's connection: exempt.
        let r = for_connection(
            resolved(Verdict::Guard, 0),
            resolved(Verdict::Exempt, 7),
            false,
        );
        assert_eq!(r, resolved(Verdict::Exempt, 7));
        // On a guarded pod's connection, even where the default would exempt it: guard.
        let r = for_connection(
            resolved(Verdict::Exempt, 0),
            resolved(Verdict::Guard, 8),
            false,
        );
        assert_eq!(r, resolved(Verdict::Guard, 8));
    }

    #[test]
    fn a_caller_inside_the_subtree_gets_the_stricter_verdict() {
        let guarded = resolved(Verdict::Guard, 1);
        let exempt = resolved(Verdict::Exempt, 2);
        assert_eq!(for_connection(guarded, exempt, true), guarded);
        assert_eq!(for_connection(exempt, guarded, true), guarded);
        assert_eq!(
            for_connection(exempt, resolved(Verdict::Exempt, 3), true).verdict,
            Verdict::Exempt
        );
        assert_eq!(
            for_connection(guarded, resolved(Verdict::Guard, 4), true),
            guarded
        );
    }

    #[test]
    fn a_recorded_path_resolves_like_the_live_walk() {
        // Recorded with the attach root at level 1: ids of levels 1, 2, 3.
        let mut path = CgroupPath {
            root_level: 1,
            _pad: 0,
            ids: [0; MAX_DEPTH as usize],
        };
        path.ids[..3].copy_from_slice(&PATH[1..4]);
        assert_eq!(path.own_id(), 30);
        assert_eq!(path.ancestor(0), 0);
        assert_eq!(path.ancestor(1), 10);
        assert_eq!(path.ancestor(3), 30);
        assert_eq!(path.ancestor(4), 0);
        assert_eq!(path.ancestor(1 + MAX_DEPTH), 0);
        let entries = [(20, Verdict::Exempt, 6)];
        let live = run(&cfg(Verdict::Guard, 1), &PATH[..4], &entries);
        let recorded = resolve(
            &cfg(Verdict::Guard, 1),
            |l| path.ancestor(l),
            lookup(&entries),
        );
        assert_eq!(recorded, live);
        assert_eq!(recorded.policy_cgroup_id, 20);
        let empty = CgroupPath {
            root_level: 1,
            _pad: 0,
            ids: [0; MAX_DEPTH as usize],
        };
        assert_eq!(empty.own_id(), 0);
    }
}
