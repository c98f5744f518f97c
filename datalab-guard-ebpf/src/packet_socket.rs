//! `lsm_cgroup/socket_post_create` (attached only with `--deny-raw-sockets`): refuses AF_PACKET
//! sockets to guarded cgroups. AF_PACKET frames bypass the IP stack, so neither cgroup_skb
//! nor the socket-address hooks ever see them, and `cgroup/sock_create` only runs for
//! AF_INET/AF_INET6. This needs the BPF LSM (`bpf` in the kernel's `lsm=` list).

use aya_ebpf::{
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    macros::lsm_cgroup,
    programs::LsmContext,
};
use datalab_guard_common::{abi, classify::Reason, Family, Hook};

use crate::{
    decide::{judge, resolve, Attempted, Origin},
    maps::config,
};

/// lsm_cgroup programs return 1 to allow and 0 to deny (the kernel turns it into EPERM).
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[lsm_cgroup(hook = "socket_post_create")]
pub fn dg_packet_socket(ctx: LsmContext) -> i32 {
    // LSM_HOOK(int, 0, socket_post_create, struct socket *sock, int family, int type,
    //          int protocol, int kern) — the hook the kernel's own lsm_cgroup selftest uses
    // to refuse AF_PACKET; the cgroup is the new socket's, i.e. the creating task's.
    let family: i32 = ctx.arg(1);
    let sock_type: i32 = ctx.arg(2);
    let protocol: i32 = ctx.arg(3);
    let kern: i32 = ctx.arg(4);
    if kern != 0 || family as u32 != abi::AF_PACKET {
        return ALLOW;
    }
    let cfg = config();
    if cfg.deny_raw_sockets == 0 {
        return ALLOW;
    }
    let resolved = resolve(&cfg, |level| unsafe {
        bpf_get_current_ancestor_cgroup_id(level as i32)
    });
    let origin = Origin {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        task_known: true,
    };
    let attempted = Attempted {
        hook: Hook::SockCreate,
        family: Family::Packet,
        // The protocol of a packet socket is an ethertype in network order; keep its low byte.
        proto: u16::from_be(protocol as u16) as u8,
        sock_type: sock_type as u8,
        dport: 0,
        dst: [0; 16],
        reason: Reason::RawSocket,
    };
    if judge(&cfg, &resolved, origin, &attempted) {
        DENY
    } else {
        ALLOW
    }
}
