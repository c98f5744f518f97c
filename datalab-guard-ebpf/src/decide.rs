//! The decision every hook shares once a destination is known to be blocked: find the
//! verdict of the attempt's cgroup, count it, report it (rate-limited), and say whether to
//! let it through.

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_ktime_get_boot_ns,
};
use datalab_guard_common::{
    classify::Reason,
    counters::{counter_index, Stat},
    Action, AuditEvent, Family, GuardConfig, Hook, Mode, PolicyEntry, RateState, Verdict,
};

use crate::maps::{COUNTERS, EVENTS, POLICY, RATE, STATS};

/// cgroup levels below the attach root that are searched for a policy entry. Pod cgroups sit
/// 1–3 levels below kubepods, containers one more; 16 leaves room for nested runtimes.
pub const MAX_DEPTH: u32 = 16;

/// The verdict of the deepest cgroup with a POLICY entry on the path from the attach root
/// down to the attempt's cgroup. `ancestor(level)` returns the cgroup id at `level`, or 0
/// past the attempt's own level.
pub struct Resolved {
    pub verdict: Verdict,
    pub class: u32,
    pub policy_cgroup_id: u64,
}

#[inline(always)]
pub fn resolve(cfg: &GuardConfig, ancestor: impl Fn(u32) -> u64) -> Resolved {
    let mut found = Resolved {
        verdict: Verdict::from_raw(cfg.default_verdict),
        class: 0,
        policy_cgroup_id: 0,
    };
    for i in 0..MAX_DEPTH {
        let id = ancestor(cfg.root_level + i);
        if id == 0 {
            break;
        }
        if let Some(entry) = unsafe { POLICY.get(&id) } {
            let entry: PolicyEntry = *entry;
            found = Resolved {
                verdict: Verdict::from_raw(entry.verdict),
                class: entry.class,
                policy_cgroup_id: id,
            };
        }
    }
    found
}

/// Who made the attempt, for the audit record.
#[derive(Clone, Copy)]
pub struct Origin {
    pub cgroup_id: u64,
    /// Socket hooks run in the caller's context and know the task; skb egress does not.
    pub task_known: bool,
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

/// Counts and reports an attempt that reaches a blocked destination; returns `true` when it
/// must be refused (guarded cgroup, enforce mode).
#[inline(always)]
pub fn judge(cfg: &GuardConfig, resolved: &Resolved, origin: Origin, attempt: &Attempted) -> bool {
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
        // Per-CPU slot: no other CPU writes it.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn bump_stat(stat: Stat) {
    if let Some(slot) = STATS.get_ptr_mut(stat as u32) {
        unsafe { *slot += 1 };
    }
}

/// Per-cgroup fixed-window rate limit. Returns the number of events suppressed since the
/// last one emitted, or `None` when this one must be suppressed too. Races between CPUs
/// can let a few extra events through; the counters stay exact regardless.
#[inline(always)]
fn admit(cfg: &GuardConfig, key: u64, now: u64) -> Option<u32> {
    let window_ns = (cfg.window_ms as u64) * 1_000_000;
    match RATE.get_ptr_mut(&key) {
        Some(state) => {
            let state = unsafe { &mut *state };
            if now.wrapping_sub(state.window_start_ns) >= window_ns {
                state.window_start_ns = now;
                state.emitted = 0;
            }
            if state.emitted < cfg.events_per_window {
                state.emitted += 1;
                let suppressed = state.suppressed;
                state.suppressed = 0;
                Some(suppressed)
            } else {
                state.suppressed = state.suppressed.saturating_add(1);
                None
            }
        }
        None => {
            let state = RateState {
                window_start_ns: now,
                emitted: 1,
                suppressed: 0,
            };
            let _ = RATE.insert(&key, &state, 0);
            if cfg.events_per_window == 0 {
                None
            } else {
                Some(0)
            }
        }
    }
}

#[inline(always)]
fn report(
    cfg: &GuardConfig,
    resolved: &Resolved,
    origin: Origin,
    attempt: &Attempted,
    action: Action,
) {
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let key = if resolved.policy_cgroup_id != 0 {
        resolved.policy_cgroup_id
    } else {
        origin.cgroup_id
    };
    let suppressed = match admit(cfg, key, now) {
        Some(n) => n,
        None => {
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
