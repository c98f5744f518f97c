//! Bench-only `cgroup_skb` programs, never attached by the agent: the floor (does nothing)
//! and one probe per memory touch of the guard's fast path, so that `cargo xtask bench` can
//! say where the guard's per-run cost under real traffic goes (the kernel's run statistics
//! time each program on its own).

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};

use datalab_guard_common::counters::Stat;

use crate::{
    decide::bump_stat,
    egress::{fast_path, ptr_at},
    maps::CONFIG,
};

const PASS: i32 = 1;

/// The floor: passes everything without touching memory.
#[cgroup_skb(egress)]
pub fn dg_bench_empty(_ctx: SkBuffContext) -> i32 {
    PASS
}

/// The fast path's map touch alone: the CONFIG lookup and one word of its prefilter bitmap.
#[cgroup_skb(egress)]
pub fn dg_bench_config(_ctx: SkBuffContext) -> i32 {
    if let Some(cfg) = CONFIG.get(0) {
        // SAFETY: a pointer into the map value the lookup returned; volatile so the load
        // that is being measured is not optimised away.
        let _ = unsafe { core::ptr::read_volatile(&cfg.v4_first_octet[6]) };
    }
    PASS
}

/// The fast path's packet touch alone: the bounds check and the destination's first byte.
#[cgroup_skb(egress)]
pub fn dg_bench_packet(ctx: SkBuffContext) -> i32 {
    if let Some(h) = ptr_at::<[u8; 40]>(&ctx, 0) {
        // SAFETY: ptr_at proved that h's 40 bytes lie inside the packet; volatile as above.
        let _ = unsafe { core::ptr::read_volatile(&(*h)[16]) };
    }
    PASS
}

/// The guard's whole fast path without the rest of the guard program: what the guard costs
/// on a passed packet if its size and its slow path cost nothing. A packet the fast path
/// cannot prove safe is only counted (as the guard would before classifying it).
#[cgroup_skb(egress)]
pub fn dg_bench_fast(ctx: SkBuffContext) -> i32 {
    if !fast_path(&ctx) {
        bump_stat(Stat::SlowPathPassed);
    }
    PASS
}
