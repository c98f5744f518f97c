//! `lsm_cgroup/socket_post_create` (attached only with `--deny-raw-sockets`): refuses
//! AF_PACKET sockets to guarded cgroups. AF_PACKET frames bypass the IP stack, so neither
//! cgroup_skb nor the socket-address hooks ever see them, and `cgroup/sock_create` only runs
//! for AF_INET/AF_INET6. This needs the BPF LSM (`bpf` in the kernel's `lsm=` list).

use aya_ebpf::{macros::lsm_cgroup, programs::LsmContext};
use datalab_guard_common::{abi, Family};

use crate::decide::refuse_raw_socket;

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
    // The protocol of a packet socket is an ethertype in network order; keep its low byte.
    let proto = u16::from_be(protocol as u16) as u8;
    if refuse_raw_socket(Family::Packet, proto, sock_type as u8) {
        DENY
    } else {
        ALLOW
    }
}
