//! `cgroup_skb/egress`: every IPv4/IPv6 packet leaving a socket in the guarded subtree.
//!
//! Fast path (nearly every packet): three bytes read by direct packet access and one bit
//! test in the CONFIG map (an inlined array lookup) prove the packet cannot be blocked.
//! Only packets that might be get the full classifier, the trie lookups and the policy;
//! packets that might be an encapsulation (IP protocols 4/41/47, UDP to a port whose low
//! byte matches a tunnel port's) leave the fast path too, to be judged by their inner packet.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use datalab_guard_common::{
    classify::{classify_outer, fast_path_pass, FastHeader, Outer, PacketBytes, PacketClass},
    counters::Stat,
    tunnel::judge_payload,
    Hook,
};

use crate::{
    decide::{bump_stat, refuse_for_skb, Attempted},
    maps::{Tries, CONFIG},
    stages::{
        enter, handoff, leave, to_decision_stage, to_tunnel_stage, TO_DECISION_STAGE,
        TO_TUNNEL_STAGE,
    },
};

const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn dg_egress(ctx: SkBuffContext) -> i32 {
    if fast_path(&ctx) {
        return PASS;
    }
    // The slow path's stages (see `stages`), each called from here.
    if !enter() {
        return DROP;
    }
    let mut verdict = outer_stage(&ctx);
    if verdict == TO_TUNNEL_STAGE {
        verdict = tunnel_stage(&ctx);
    }
    if verdict == TO_DECISION_STAGE {
        verdict = decision_stage(&ctx);
    }
    leave();
    verdict
}

/// `true` when the packet provably reaches no blocked destination.
#[inline(always)]
pub(crate) fn fast_path(ctx: &SkBuffContext) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    // Whole fixed headers, not single bytes: a `data + 1 > end` bounds test is turned by
    // LLVM into `data >= end`, which the verifier does not accept as a range proof. The
    // two bytes after the fixed header are a UDP destination port, which the tunnel test
    // needs (IPv4 with options never takes the fast path, so 20 is its header length).
    let header = if let Some(h) = ptr_at::<[u8; 44]>(ctx, 0) {
        // SAFETY: ptr_at proved that h's 44 bytes lie inside the packet.
        let h = unsafe { &*h };
        if h[0] >> 4 == 6 {
            FastHeader {
                first: h[0],
                proto: h[6],
                dst_first: h[24],
                dport: u16::from_be_bytes([h[42], h[43]]),
            }
        } else {
            FastHeader {
                first: h[0],
                proto: h[9],
                dst_first: h[16],
                dport: u16::from_be_bytes([h[22], h[23]]),
            }
        }
    } else if let Some(h) = ptr_at::<[u8; 24]>(ctx, 0) {
        // SAFETY: ptr_at proved that h's 24 bytes lie inside the packet.
        let h = unsafe { &*h };
        if h[0] >> 4 == 6 {
            return false;
        }
        FastHeader {
            first: h[0],
            proto: h[9],
            dst_first: h[16],
            dport: u16::from_be_bytes([h[22], h[23]]),
        }
    } else if let Some(h) = ptr_at::<[u8; 20]>(ctx, 0) {
        // SAFETY: ptr_at proved that h's 20 bytes lie inside the packet.
        let h = unsafe { &*h };
        if h[0] >> 4 == 6 {
            return false;
        }
        // No room for a UDP header: no port, no UDP encapsulation.
        FastHeader {
            first: h[0],
            proto: h[9],
            dst_first: h[16],
            dport: 0,
        }
    } else {
        return false;
    };
    fast_path_pass(
        header,
        &cfg.v4_first_octet,
        &cfg.v6_first_octet,
        &cfg.tunnels,
    )
}

/// A `T` at `offset` from the start of the packet (its IP header) by direct packet access,
/// or `None` when the packet is shorter: the one bounds-checked way the fast path reads the
/// packet. Dereferencing the pointer is safe for the verifier and for us: the range was
/// just proven to lie inside the packet.
#[inline(always)]
pub(crate) fn ptr_at<T>(ctx: &SkBuffContext, offset: usize) -> Option<*const T> {
    let skb = ctx.skb.skb;
    // SAFETY: skb is the context pointer the kernel passed this program.
    let (start, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

struct SkbBytes<'a>(&'a SkBuffContext);

impl PacketBytes for SkbBytes<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.0.load::<[u8; N]>(offset).ok()
    }
}

/// The outer header: a verdict, or the packet handed to the tunnel or decision stage.
#[inline(never)]
fn outer_stage(ctx: &SkBuffContext) -> i32 {
    let Some(cfg) = CONFIG.get(0) else {
        return DROP;
    };
    match classify_outer(&SkbBytes(ctx), &Tries, &cfg.tunnels) {
        Outer::Judged(PacketClass::Blocked(attempt, reason)) => {
            to_decision_stage(Attempted::packet(Hook::Egress, &attempt, reason), DROP)
        }
        Outer::Judged(PacketClass::Pass(_) | PacketClass::NotIp) => {
            bump_stat(Stat::SlowPathPassed);
            PASS
        }
        Outer::Encapsulated { outer, l4 } => to_tunnel_stage(outer, l4, DROP),
    }
}

/// The inner packet of an encapsulation whose outer header passed.
#[inline(never)]
fn tunnel_stage(ctx: &SkBuffContext) -> i32 {
    let (Some(cfg), Some(h)) = (CONFIG.get(0), handoff()) else {
        return DROP;
    };
    match judge_payload(&SkbBytes(ctx), &Tries, &cfg.tunnels, h.outer, h.l4) {
        PacketClass::Blocked(attempt, reason) => {
            to_decision_stage(Attempted::packet(Hook::Egress, &attempt, reason), DROP)
        }
        PacketClass::Pass(_) | PacketClass::NotIp => {
            bump_stat(Stat::SlowPathPassed);
            PASS
        }
    }
}

/// The verdict of the packet's socket's cgroup on the blocked attempt.
#[inline(never)]
fn decision_stage(ctx: &SkBuffContext) -> i32 {
    let (Some(cfg), Some(h)) = (CONFIG.get(0), handoff()) else {
        return DROP;
    };
    if refuse_for_skb(cfg, ctx.skb.skb, &h.attempted) {
        DROP
    } else {
        PASS
    }
}
