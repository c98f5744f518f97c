//! `tc`/`tcx` ingress on the host side of a guarded pod's interface (its veth peer): the
//! pod-edge layer. Every frame the pod sends arrives here, whatever produced it — AF_PACKET,
//! AF_XDP, a qdisc-bypassing socket, forwarding inside the pod — including frames that
//! never met a socket hook. Frames to blocked destinations are dropped (enforce) or
//! reported (audit) according to the interface's EDGE entry.
//!
//! Parsing: the Ethernet header, then up to [`MAX_VLAN_TAGS`] 802.1Q/802.1ad tags still in
//! the frame (the kernel may already have moved the outer one into the skb's metadata),
//! then the shared classifier at the L3 offset. Frames that are neither IPv4 nor IPv6 (ARP,
//! LLDP, ...) pass: the host's IP stack never routes them to an IP destination. A frame
//! with more tags than the bound is dropped (fail closed; no pod needs it).
//!
//! Fast path as in `egress`: untagged IPv4/IPv6 frames whose first bytes prove the
//! destination cannot be blocked pass after one direct packet read.

use aya_ebpf::{macros::classifier, programs::TcContext};
use datalab_guard_common::{
    classify::{
        classify_outer, fast_path_pass, FastHeader, Outer, PacketBytes, PacketClass, Reason,
    },
    counters::Stat,
    tunnel::judge_payload,
    Family, GuardConfig, Hook,
};

use crate::{
    decide::{bump_stat, refuse_at_edge, Attempted},
    maps::{Tries, CONFIG, EDGE},
    stages::{
        enter, handoff, leave, to_decision_stage, to_outer_stage, to_tunnel_stage,
        TO_DECISION_STAGE, TO_OUTER_STAGE, TO_TUNNEL_STAGE,
    },
};

/// `TC_ACT_UNSPEC`, which tcx reads as `TCX_NEXT`: let the next program (a CNI's, say)
/// decide, rather than `TC_ACT_OK`, which would end the chain.
const NEXT: i32 = -1;
/// `TC_ACT_SHOT`.
const DROP: i32 = 2;

const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
/// VLAN tags walked before giving up (fail closed).
const MAX_VLAN_TAGS: usize = 3;

#[classifier]
pub fn dg_edge(ctx: TcContext) -> i32 {
    if fast_path(&ctx) {
        return NEXT;
    }
    // The slow path's stages (see `stages`), each called from here.
    if !enter() {
        return DROP;
    }
    let mut verdict = frame_stage(&ctx);
    if verdict == TO_OUTER_STAGE {
        verdict = outer_stage(&ctx);
    }
    if verdict == TO_TUNNEL_STAGE {
        verdict = tunnel_stage(&ctx);
    }
    if verdict == TO_DECISION_STAGE {
        verdict = decision_stage(&ctx);
    }
    leave();
    verdict
}

/// `true` when the frame provably reaches no blocked destination: an untagged frame that is
/// not IP at all, or untagged IPv4/IPv6 whose first bytes pass the shared fast-path test.
#[inline(always)]
fn fast_path(ctx: &TcContext) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    // Ethernet + a whole IPv6 header and the two bytes after it (a UDP destination port,
    // which the tunnel test needs), or for short IPv4 frames (a bare TCP ACK is 54 bytes)
    // Ethernet + 24; anything else takes the slow path, which reads byte ranges with bounds
    // checks of its own.
    let Some(h) = ptr_at::<[u8; ETH_HLEN + 44]>(ctx, 0) else {
        return short_v4_fast_path(ctx, cfg);
    };
    // SAFETY: ptr_at proved that h's bytes lie inside the frame.
    let h = unsafe { &*h };
    let ethertype = [h[12], h[13]];
    let ip = &h[ETH_HLEN..];
    let header = if ethertype == ETH_P_IP && ip[0] == 0x45 {
        FastHeader {
            first: ip[0],
            proto: ip[9],
            dst_first: ip[16],
            dport: u16::from_be_bytes([ip[22], ip[23]]),
        }
    } else if ethertype == ETH_P_IPV6 && ip[0] >> 4 == 6 {
        FastHeader {
            first: ip[0],
            proto: ip[6],
            dst_first: ip[24],
            dport: u16::from_be_bytes([ip[42], ip[43]]),
        }
    } else if ethertype == ETH_P_IP || ethertype == ETH_P_IPV6 {
        // IPv4 with options, or a version that does not match the ethertype.
        return false;
    } else {
        return !is_vlan(ethertype);
    };
    fast_path_pass(
        header,
        &cfg.v4_first_octet,
        &cfg.v6_first_octet,
        &cfg.tunnels,
    )
}

/// The fast path for an untagged IPv4 frame too short for [`fast_path`]'s read.
#[inline(always)]
fn short_v4_fast_path(ctx: &TcContext, cfg: &GuardConfig) -> bool {
    let Some(h) = ptr_at::<[u8; ETH_HLEN + 24]>(ctx, 0) else {
        return false;
    };
    // SAFETY: ptr_at proved that h's bytes lie inside the frame.
    let h = unsafe { &*h };
    let ip = &h[ETH_HLEN..];
    [h[12], h[13]] == ETH_P_IP
        && ip[0] == 0x45
        && fast_path_pass(
            FastHeader {
                first: ip[0],
                proto: ip[9],
                dst_first: ip[16],
                dport: u16::from_be_bytes([ip[22], ip[23]]),
            },
            &cfg.v4_first_octet,
            &cfg.v6_first_octet,
            &cfg.tunnels,
        )
}

#[inline(always)]
fn is_vlan(ethertype: [u8; 2]) -> bool {
    // 802.1Q, 802.1ad, and the pre-standard QinQ 0x9100.
    ethertype == [0x81, 0x00] || ethertype == [0x88, 0xa8] || ethertype == [0x91, 0x00]
}

/// A `T` at `offset` from the start of the frame by direct packet access, or `None` when
/// the frame is shorter (see `egress::ptr_at`).
#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// The frame's L3 packet for the shared classifier: offset 0 is the IP header.
struct L3Bytes<'a> {
    ctx: &'a TcContext,
    l3: usize,
}

impl PacketBytes for L3Bytes<'_> {
    #[inline(always)]
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.ctx.load::<[u8; N]>(self.l3 + offset).ok()
    }
}

/// Where the IP header starts, or `None` when the frame carries no IP (pass), or
/// `Some(Err(()))` when it hides behind more VLAN tags than the bound (drop).
#[inline(always)]
fn l3_offset(ctx: &TcContext) -> Option<Result<usize, ()>> {
    let mut off = 12usize;
    for _ in 0..MAX_VLAN_TAGS + 1 {
        let ethertype = ctx.load::<[u8; 2]>(off).ok()?;
        if ethertype == ETH_P_IP || ethertype == ETH_P_IPV6 {
            return Some(Ok(off + 2));
        }
        if !is_vlan(ethertype) {
            return None;
        }
        off += 4;
    }
    Some(Err(()))
}

/// The Ethernet header and VLAN tags: the IP header's offset handed to the outer stage,
/// or a verdict on a frame without IP, or one with too many tags handed to the decision
/// stage.
#[inline(always)]
fn frame_stage(ctx: &TcContext) -> i32 {
    match l3_offset(ctx) {
        None => NEXT,
        Some(Err(())) => {
            let attempted = Attempted {
                hook: Hook::Edge,
                family: Family::Ipv4,
                proto: 0,
                sock_type: 0,
                dport: 0,
                dst: [0; 16],
                reason: Reason::Unparseable,
            };
            to_decision_stage(attempted, DROP)
        }
        Some(Ok(l3)) => to_outer_stage(l3, DROP),
    }
}

/// The outer header: a verdict, or the frame handed to the tunnel or decision stage.
#[inline(never)]
fn outer_stage(ctx: &TcContext) -> i32 {
    let (Some(cfg), Some(h)) = (CONFIG.get(0), handoff()) else {
        return DROP;
    };
    let l3 = h.l3;
    match classify_outer(&L3Bytes { ctx, l3 }, &Tries, &cfg.tunnels) {
        Outer::Judged(PacketClass::Blocked(attempt, reason)) => {
            to_decision_stage(Attempted::packet(Hook::Edge, &attempt, reason), DROP)
        }
        Outer::Judged(PacketClass::Pass(_) | PacketClass::NotIp) => {
            bump_stat(Stat::SlowPathPassed);
            NEXT
        }
        Outer::Encapsulated { outer, l4 } => to_tunnel_stage(outer, l4, DROP),
    }
}

/// The inner packet of an encapsulation whose outer header passed.
#[inline(never)]
fn tunnel_stage(ctx: &TcContext) -> i32 {
    let (Some(cfg), Some(h)) = (CONFIG.get(0), handoff()) else {
        return DROP;
    };
    let l3 = h.l3;
    match judge_payload(&L3Bytes { ctx, l3 }, &Tries, &cfg.tunnels, h.outer, h.l4) {
        PacketClass::Blocked(attempt, reason) => {
            to_decision_stage(Attempted::packet(Hook::Edge, &attempt, reason), DROP)
        }
        PacketClass::Pass(_) | PacketClass::NotIp => {
            bump_stat(Stat::SlowPathPassed);
            NEXT
        }
    }
}

/// The verdict of the frame's pod (by the interface it entered on) on the blocked attempt.
#[inline(never)]
fn decision_stage(ctx: &TcContext) -> i32 {
    let (Some(cfg), Some(h)) = (CONFIG.get(0), handoff()) else {
        return DROP;
    };
    // SAFETY: skb is the context pointer the kernel passed this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: copied out at once; entries are replaced whole (see decide::policy_entry).
    let entry = unsafe { EDGE.get(ifindex) }.copied();
    if refuse_at_edge(cfg, entry, &h.attempted) {
        DROP
    } else {
        NEXT
    }
}
