//! `cgroup/sock_create` (attached only with `--deny-raw-sockets`): refuses SOCK_RAW IPv4
//! and IPv6 sockets to guarded cgroups. Their packets are still judged by the egress
//! program; refusing the socket closes the door on hand-built headers altogether. This hook
//! runs for AF_INET/AF_INET6 only; AF_PACKET is refused by `packet_socket` (BPF LSM).

use aya_ebpf::{
    helpers::generated::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id},
    macros::cgroup_sock,
    programs::SockContext,
};
use datalab_guard_common::{abi, classify::Reason, Family, Hook};

use crate::{
    decide::{judge, resolve, Attempted, Origin},
    maps::config,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock(sock_create)]
pub fn dg_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    let (family, sock_type, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    let family = match family {
        abi::AF_INET if sock_type == abi::SOCK_RAW => Family::Ipv4,
        abi::AF_INET6 if sock_type == abi::SOCK_RAW => Family::Ipv6,
        _ => return ALLOW,
    };
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
        family,
        proto: protocol as u8,
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
