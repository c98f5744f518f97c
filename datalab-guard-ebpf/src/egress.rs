//! `cgroup_skb/egress`: every IPv4/IPv6 packet leaving a socket in the guarded subtree.
//!
//! Fast path (nearly every packet): three bytes read by direct packet access and one bit
//! test in the CONFIG map (an inlined array lookup) prove the packet cannot be blocked.
//! Only packets that might be get the full classifier, the trie lookups and the policy.

use aya_ebpf::{
    helpers::generated::bpf_skb_ancestor_cgroup_id, helpers::generated::bpf_skb_cgroup_id,
    macros::cgroup_skb, programs::SkBuffContext,
};
use datalab_guard_common::{
    classify::{classify_packet, fast_path_pass, PacketBytes, PacketClass},
    counters::Stat,
    Family, GuardConfig, Hook,
};

use crate::{
    decide::{bump_stat, judge, resolve, Attempted, Origin},
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
fn fast_path(ctx: &SkBuffContext) -> bool {
    let skb = ctx.skb.skb;
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    // Bounds are checked with offsets of 20 and 40 only: a `data + 1 > end` test is turned
    // by LLVM into `data >= end`, which the verifier does not accept as a range proof.
    let (first, next, dst_first) = if data + 40 <= end {
        let first = unsafe { *(data as *const u8) };
        if first >> 4 == 6 {
            unsafe {
                (
                    first,
                    *((data + 6) as *const u8),
                    *((data + 24) as *const u8),
                )
            }
        } else {
            (first, 0, unsafe { *((data + 16) as *const u8) })
        }
    } else if data + 20 <= end {
        let first = unsafe { *(data as *const u8) };
        if first >> 4 == 6 {
            return false;
        }
        (first, 0, unsafe { *((data + 16) as *const u8) })
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
    let cfg: GuardConfig = config();
    let skb = ctx.skb.skb;
    let resolved = resolve(&cfg, |level| unsafe {
        bpf_skb_ancestor_cgroup_id(skb, level as i32)
    });
    let origin = Origin {
        cgroup_id: unsafe { bpf_skb_cgroup_id(skb) },
        task_known: false,
    };
    let attempted = Attempted {
        hook: Hook::Egress,
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
    };
    if judge(&cfg, &resolved, origin, &attempted) {
        DROP
    } else {
        PASS
    }
}
