//! The decision every hook shares once an attempt is known to reach something blocked: find
//! the verdict of the attempt's cgroup, count it, report it (rate-limited), and say whether
//! to refuse it. The entry points only say what was attempted and from where
//! ([`refuse_for_current_task`], [`refuse_for_skb`], [`refuse_raw_socket`]).
//!
//! The resolution walk and the rate-limit decision are the pure functions of
//! `datalab_guard_common::{resolve, ratelimit}`; this module feeds them the kernel's
//! helpers and maps.

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        bpf_ktime_get_boot_ns,
        generated::{
            bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id,
            bpf_skb_ancestor_cgroup_id, bpf_skb_cgroup_id,
        },
    },
};
use datalab_guard_common::{
    classify::{Attempt, Reason},
    counters::{counter_index, Stat},
    ratelimit::{self, Admission},
    resolve::{for_connection, resolve, CgroupPath, Resolved},
    Action, AuditEvent, EdgeEntry, Family, GuardConfig, Hook, Mode, Verdict, VerdictEntry,
};

use crate::maps::{config, COUNTERS, EVENTS, RATE, STATS, VERDICTS};

/// Who made the attempt, for the audit record.
#[derive(Clone, Copy)]
struct Origin {
    cgroup_id: u64,
    /// Socket hooks run in the caller's context and know the task; skb egress does not.
    task_known: bool,
}

/// What was attempted.
#[derive(Clone, Copy)]
pub struct Attempted {
    pub hook: Hook,
    pub family: Family,
    pub proto: u8,
    pub sock_type: u8,
    pub dport: u16,
    pub dst: [u8; 16],
    pub reason: Reason,
}

impl Attempted {
    /// A packet the classifier blocked, as seen by a packet hook (no socket type there).
    #[inline(always)]
    pub fn packet(hook: Hook, attempt: &Attempt, reason: Reason) -> Attempted {
        Attempted {
            hook,
            family: if attempt.ipv6 {
                Family::Ipv6
            } else {
                Family::Ipv4
            },
            proto: attempt.proto,
            sock_type: 0,
            dport: attempt.dport,
            dst: attempt.dst,
            reason,
        }
    }
}

/// For hooks that run in the calling task's context (socket address and socket creation
/// hooks): judges `attempt` against the verdict of the task's cgroup, or, on an MPTCP
/// connection with a recorded path, as `resolve::for_connection` says. `true`: refuse it.
#[inline(always)]
pub fn refuse_for_current_task(
    cfg: &GuardConfig,
    attempt: &Attempted,
    connection: Option<&CgroupPath>,
) -> bool {
    let task = resolve(
        cfg,
        // SAFETY: a BPF helper without pointer arguments; a level past the task's depth
        // returns 0.
        |level| unsafe { bpf_get_current_ancestor_cgroup_id(level as i32) },
        policy_entry,
    );
    let mut origin = Origin {
        // SAFETY: a BPF helper without arguments.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        task_known: true,
    };
    let resolved = match connection {
        // A record from another attach root (the configuration changed) says nothing.
        Some(path) if path.root_level == cfg.root_level => {
            let recorded = resolve(cfg, |level| path.ancestor(level), policy_entry);
            // SAFETY: as above.
            let task_top = unsafe { bpf_get_current_ancestor_cgroup_id(cfg.root_level as i32) };
            let inside = task_top != 0 && task_top == path.ids[0];
            if !inside {
                // The audit record names the connection's cgroup, not the worker's.
                origin.cgroup_id = path.own_id();
            }
            for_connection(task, recorded, inside)
        }
        _ => task,
    };
    judge(cfg, &resolved, origin, attempt)
}

/// For the packet hook: judges `attempt` against the verdict of the packet's socket's
/// cgroup (the task is unknown there). `true`: drop the packet.
#[inline(always)]
pub fn refuse_for_skb(cfg: &GuardConfig, skb: *mut __sk_buff, attempt: &Attempted) -> bool {
    let resolved = resolve(
        cfg,
        // SAFETY: skb is the context pointer the kernel passed this program; a level past
        // the socket's cgroup depth returns 0.
        |level| unsafe { bpf_skb_ancestor_cgroup_id(skb, level as i32) },
        policy_entry,
    );
    let origin = Origin {
        // SAFETY: skb is the context pointer the kernel passed this program.
        cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
        task_known: false,
    };
    judge(cfg, &resolved, origin, attempt)
}

/// For the pod-edge layer (tc on the host side of a pod's interface): judges `attempt`
/// against the interface's EDGE entry. The program is attached only to guarded pods'
/// interfaces, so an interface without an entry is guarded (fail closed). The task is
/// unknown there; the entry's pod cgroup stands for the origin. `true`: drop the frame.
#[inline(always)]
pub fn refuse_at_edge(cfg: &GuardConfig, entry: Option<EdgeEntry>, attempt: &Attempted) -> bool {
    let (verdict, class, cgroup_id) = match entry {
        Some(e) => (Verdict::from_raw(e.verdict), e.class, e.cgroup_id),
        None => (Verdict::Guard, 0, 0),
    };
    let resolved = Resolved {
        verdict,
        class,
        policy_cgroup_id: cgroup_id,
    };
    let origin = Origin {
        cgroup_id,
        task_known: false,
    };
    judge(cfg, &resolved, origin, attempt)
}

/// For the socket creation hooks (with `--deny-raw-sockets`): a raw IP or packet socket
/// the calling task asks for. `true`: refuse it.
#[inline(always)]
pub fn refuse_raw_socket(family: Family, proto: u8, sock_type: u8) -> bool {
    let cfg = config();
    if cfg.deny_raw_sockets == 0 {
        return false;
    }
    let attempt = Attempted {
        hook: Hook::SockCreate,
        family,
        proto,
        sock_type,
        dport: 0,
        dst: [0; 16],
        reason: Reason::RawSocket,
    };
    refuse_for_current_task(&cfg, &attempt, None)
}

#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "by reference the walk's 16 lookups share one stack slot: ~1.3k fewer verified \
              instructions for the socket programs (cargo xtask verifier)"
)]
fn policy_entry(id: u64) -> Option<VerdictEntry> {
    // SAFETY: the value is copied out at once. The agent replaces entries whole and the
    // kernel frees a replaced hash map element only after an RCU grace period, so the
    // reference stays valid for the copy and the copy is the old or the new entry.
    unsafe { VERDICTS.get(&id) }.copied()
}

/// Counts and reports an attempt that reaches a blocked destination; returns `true` when it
/// must be refused (guarded cgroup, enforce mode).
#[inline(always)]
fn judge(cfg: &GuardConfig, resolved: &Resolved, origin: Origin, attempt: &Attempted) -> bool {
    if resolved.verdict == Verdict::Exempt {
        return false;
    }
    let action = match Mode::from_raw(cfg.mode) {
        Mode::Enforce => Action::Blocked,
        Mode::Audit => Action::Audited,
    };
    bump_counter(counter_index(
        resolved.class,
        action,
        attempt.family,
        attempt.hook,
    ));
    report(cfg, resolved, origin, attempt, action);
    action == Action::Blocked
}

#[inline(always)]
fn bump_counter(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: slot points into this CPU's slot of a per-CPU array, valid while the program
        // runs; no other CPU writes it (a program nesting on this CPU could lose a count).
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn bump_stat(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: as in bump_counter: this CPU's slot of a per-CPU array.
        unsafe { *slot += 1 };
    }
}

/// The rate-limit decision for `key`'s state in the RATE map (created on first use).
/// Races between CPUs can let a few extra events through; the counters stay exact.
#[inline(always)]
fn admit(cfg: &GuardConfig, key: u64, now: u64) -> Admission {
    let state = match RATE.get_ptr_mut(key) {
        Some(state) => state,
        None => {
            // Insert and look up again rather than deciding on a local copy: one copy of
            // the decision in the program keeps the verifier's work down.
            let _ = RATE.insert(key, ratelimit::fresh(now), 0);
            match RATE.get_ptr_mut(key) {
                Some(state) => state,
                // The LRU map always makes room; should it not, send rather than lose.
                None => {
                    return Admission::Emit {
                        suppressed_before: 0,
                    }
                }
            }
        }
    };
    // SAFETY: state points into a RATE map value, which the kernel keeps alive while this
    // program runs (RCU); racing CPUs can only let a few extra events through (see above).
    ratelimit::admit(cfg, unsafe { &mut *state }, now)
}

#[inline(always)]
fn report(
    cfg: &GuardConfig,
    resolved: &Resolved,
    origin: Origin,
    attempt: &Attempted,
    action: Action,
) {
    // SAFETY: a BPF helper without arguments.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // Limited per policy entry (a pod), or per cgroup where the default verdict applies.
    let key = if resolved.policy_cgroup_id != 0 {
        resolved.policy_cgroup_id
    } else {
        origin.cgroup_id
    };
    let suppressed = match admit(cfg, key, now) {
        Admission::Emit { suppressed_before } => suppressed_before,
        Admission::Suppress => {
            bump_stat(Stat::EventsSuppressed);
            return;
        }
    };
    let Some(mut entry) = EVENTS.reserve::<AuditEvent>(0) else {
        bump_stat(Stat::EventsLost);
        return;
    };
    let (pid, tgid, uid, gid, comm) = if origin.task_known {
        let pid_tgid = bpf_get_current_pid_tgid();
        let uid_gid = bpf_get_current_uid_gid();
        let comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (
            pid_tgid as u32,
            (pid_tgid >> 32) as u32,
            uid_gid as u32,
            (uid_gid >> 32) as u32,
            comm,
        )
    } else {
        (0, 0, 0, 0, [0u8; 16])
    };
    entry.write(AuditEvent {
        boot_ns: now,
        cgroup_id: origin.cgroup_id,
        policy_cgroup_id: resolved.policy_cgroup_id,
        suppressed,
        pid,
        tgid,
        uid,
        gid,
        class: resolved.class,
        dport: attempt.dport,
        hook: attempt.hook as u8,
        family: attempt.family as u8,
        proto: attempt.proto,
        action: action as u8,
        sock_type: attempt.sock_type,
        reason: attempt.reason as u8,
        dst: attempt.dst,
        comm,
    });
    entry.submit(0);
}
