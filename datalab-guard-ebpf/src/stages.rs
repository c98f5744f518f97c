//! The slow path of the packet programs (`egress`, `edge`) in three stages, each a function
//! of its own that the entry point calls in turn:
//! 1. the outer stage: the outer header with its options or extension headers
//!    (`classify::classify_outer`);
//! 2. the tunnel stage, for a packet whose outer header passed but may carry an
//!    encapsulation: its inner packet (`tunnel::judge_payload`);
//! 3. the decision stage, for an attempt either stage found blocked: the verdict of its
//!    cgroup or pod, the counters, the audit event.
//!
//! Why stages: the verifier walks every path through a program, and inlined code after a
//! walk of options or extension headers is walked again for every way out of that walk.
//! With the tunnel stage and the decision inlined after the outer stage, `dg_egress` took
//! over 1,000,000 verified instructions on Debian 12's 6.1 kernel (E2BIG: it would not
//! load there). A stage reads what the previous one found from this run's slot in
//! [`HANDOFF`], not from its arguments: values read from a map are unknown to the verifier, so
//! every path into a stage arrives in the same state and the stage is walked once (passing
//! them as arguments, the verifier still told the paths apart). Calling the stages one
//! after the other from the entry point, not one from another, keeps at most one stage's
//! stack frame on the 512-byte stack at a time.
//!
//! A tail call into programs of their own would give each stage a budget of its own too,
//! but needs a program array pinned, adopted and upgraded with the rest, and a packet would
//! be judged by a program the install can leave missing; the stages need none of that.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use datalab_guard_common::classify::Attempt;

use crate::decide::Attempted;

/// Not a verdict: the outer stage handed the packet to the tunnel stage.
pub const TO_TUNNEL_STAGE: i32 = i32::MIN;
/// Not a verdict: a stage handed a blocked attempt to the decision stage.
pub const TO_DECISION_STAGE: i32 = i32::MIN + 1;
/// Not a verdict: the edge program found the frame's IP header (behind up to three VLAN
/// tags) and handed its offset to the outer stage. Through the slot, so that the outer
/// stage is walked once, not once per number of tags.
pub const TO_OUTER_STAGE: i32 = i32::MIN + 2;

/// What one stage hands the next.
#[derive(Clone, Copy)]
pub struct Handoff {
    /// For the tunnel stage: the outer packet, which passed.
    pub outer: Attempt,
    /// For the edge program's outer and tunnel stages: where the IP header starts in the
    /// frame, after the Ethernet header and VLAN tags (egress sees the IP header at 0 and
    /// does not use it).
    pub l3: usize,
    /// For the tunnel stage: where the outer packet's upper layer starts, from the IP
    /// header.
    pub l4: usize,
    /// For the decision stage: the blocked attempt.
    pub attempted: Attempted,
}

/// Slow paths that can run at once on one CPU. A packet program stays on its CPU, but it
/// can be interrupted there by another: `dg_egress` runs in process context with bottom
/// halves enabled (a UDP `sendto`, say), and a softirq on the same CPU can send a TCP ACK
/// through `dg_egress` before the first run resumes. Each run therefore takes a slot of
/// its own, one nesting level deeper ([`enter`]); process, softirq and what nests in a
/// softirq need three.
const LEVELS: u32 = 4;

/// [`LEVELS`] [`Handoff`]s per CPU, one per nesting level. Not pinned: they hold nothing
/// between packets.
#[map(name = "DG_HANDOFF")]
static HANDOFF: PerCpuArray<Handoff> = PerCpuArray::with_max_entries(LEVELS, 0);

/// How many slow paths are running on this CPU now (each uses slot `level - 1`).
#[map(name = "DG_HANDOFF_NEST")]
static NESTING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Starts a slow path on this CPU: takes the next nesting level. `false` when every level
/// is taken (deeper nesting than the kernel does): the caller refuses the packet (fail
/// closed) without calling [`leave`]. A run that interrupts another between its read and
/// its write of the level leaves it as it found it before the first resumes.
#[inline(always)]
pub fn enter() -> bool {
    let Some(level) = NESTING.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: this CPU's counter; see above for interruption.
    unsafe {
        if *level >= LEVELS {
            return false;
        }
        *level += 1;
    }
    true
}

/// Ends a slow path that [`enter`] started.
#[inline(always)]
pub fn leave() {
    if let Some(level) = NESTING.get_ptr_mut(0) {
        // SAFETY: as in enter.
        unsafe {
            if *level > 0 {
                *level -= 1;
            }
        }
    }
}

/// This run's slot: the one of the current nesting level.
#[inline(always)]
fn slot() -> Option<*mut Handoff> {
    // SAFETY: this CPU's counter, read once.
    let level = unsafe { *NESTING.get_ptr(0)? };
    if level == 0 || level > LEVELS {
        return None;
    }
    HANDOFF.get_ptr_mut(level - 1)
}

/// Hands the frame's IP header offset to the edge program's outer stage:
/// [`TO_OUTER_STAGE`], or `unavailable` if the slot cannot be had (never, for a one-entry
/// array).
#[inline(always)]
pub fn to_outer_stage(l3: usize, unavailable: i32) -> i32 {
    match slot() {
        Some(slot) => {
            // SAFETY: this run's slot on this CPU; no other run writes it (see LEVELS).
            unsafe { (*slot).l3 = l3 };
            TO_OUTER_STAGE
        }
        None => unavailable,
    }
}

/// Hands the outer packet to the tunnel stage: [`TO_TUNNEL_STAGE`], or `unavailable` if the
/// slot cannot be had (never, for a one-entry array).
#[inline(always)]
pub fn to_tunnel_stage(outer: Attempt, l4: usize, unavailable: i32) -> i32 {
    match slot() {
        Some(slot) => {
            // SAFETY: as in to_outer_stage.
            unsafe {
                (*slot).outer = outer;
                (*slot).l4 = l4;
            }
            TO_TUNNEL_STAGE
        }
        None => unavailable,
    }
}

/// Hands a blocked attempt to the decision stage: [`TO_DECISION_STAGE`], or `unavailable`
/// if the slot cannot be had (never, for a one-entry array).
#[inline(always)]
pub fn to_decision_stage(attempted: Attempted, unavailable: i32) -> i32 {
    match slot() {
        Some(slot) => {
            // SAFETY: as in to_outer_stage.
            unsafe { (*slot).attempted = attempted };
            TO_DECISION_STAGE
        }
        None => unavailable,
    }
}

/// What the previous stage of this run handed over.
#[inline(always)]
pub fn handoff() -> Option<&'static Handoff> {
    // SAFETY: this run's slot, which no other run writes (see LEVELS).
    slot().map(|p| unsafe { &*p })
}
