//! `cgroup_skb/egress`: every IPv4/IPv6 packet leaving a socket in the guarded subtree.
//!
//! Fast path (nearly every packet): three bytes read by direct packet access and one bit
//! test in the CONFIG map (an inlined array lookup) prove the packet cannot be blocked.
//! Only packets that might be get the full classifier, the trie lookups and the policy.

use aya_ebpf::{macros::cgroup_skb, programs::SkBuffContext};
use datalab_guard_common::{
    classify::{classify_packet, fast_path_pass, PacketBytes, PacketClass},
    counters::Stat,
    GuardConfig, Hook,
};

use crate::{
    decide::{bump_stat, refuse_for_skb, Attempted},
    maps::{config, Tries, CONFIG},
};

const PASS: i32 = 1;
const DROP: i32 = 0;

#[cgroup_skb(egress)]
pub fn dg_egress(ctx: SkBuffContext) -> i32 {
    if fast_path(&ctx) {
        return PASS;
    }
    slow_path(&ctx)
}

/// `true` when the packet provably reaches no blocked destination.
#[inline(always)]
pub(crate) fn fast_path(ctx: &SkBuffContext) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    // Whole fixed headers, not single bytes: a `data + 1 > end` bounds test is turned by
    // LLVM into `data >= end`, which the verifier does not accept as a range proof.
    let (first, next, dst_first) = if let Some(h) = ptr_at::<[u8; 40]>(ctx, 0) {
        // Long enough for an IPv6 header (or an IPv4 one with what follows).
        // SAFETY: ptr_at proved that h's 40 bytes lie inside the packet.
        let first = unsafe { (*h)[0] };
        if first >> 4 == 6 {
            // SAFETY: as above.
            (first, unsafe { (*h)[6] }, unsafe { (*h)[24] })
        } else {
            // SAFETY: as above.
            (first, 0, unsafe { (*h)[16] })
        }
    } else if let Some(h) = ptr_at::<[u8; 20]>(ctx, 0) {
        // SAFETY: ptr_at proved that h's 20 bytes lie inside the packet.
        let first = unsafe { (*h)[0] };
        if first >> 4 == 6 {
            return false;
        }
        // SAFETY: as above.
        (first, 0, unsafe { (*h)[16] })
    } else {
        return false;
    };
    fast_path_pass(
        first,
        next,
        dst_first,
        &cfg.v4_first_octet,
        &cfg.v6_first_octet,
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

#[inline(never)]
fn slow_path(ctx: &SkBuffContext) -> i32 {
    let (attempt, reason) = match classify_packet(&SkbBytes(ctx), &Tries) {
        PacketClass::Blocked(attempt, reason) => (attempt, reason),
        PacketClass::Pass(_) | PacketClass::NotIp => {
            bump_stat(Stat::SlowPathPassed);
            return PASS;
        }
    };
    let attempted = Attempted::packet(Hook::Egress, &attempt, reason);
    let cfg: GuardConfig = config();
    if refuse_for_skb(&cfg, ctx.skb.skb, &attempted) {
        DROP
    } else {
        PASS
    }
}
