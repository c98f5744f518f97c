//! `cgroup/sock_create` (attached only with `--deny-raw-sockets`): refuses SOCK_RAW IPv4
//! and IPv6 sockets to guarded cgroups. Their packets are still judged by the egress
//! program; refusing the socket closes the door on hand-built headers altogether. This hook
//! runs for AF_INET/AF_INET6 sockets only: AF_PACKET is refused by `packet_socket` (BPF LSM).

use aya_ebpf::{macros::cgroup_sock, programs::SockContext};
use datalab_guard_common::{abi, Family};

use crate::decide::refuse_raw_socket;

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock(sock_create)]
pub fn dg_sock_create(ctx: SockContext) -> i32 {
    let sk = ctx.sock;
    // SAFETY: sk is the bpf_sock context pointer the kernel passed this program.
    let (family, sock_type, protocol) = unsafe { ((*sk).family, (*sk).type_, (*sk).protocol) };
    let family = match family {
        abi::AF_INET if sock_type == abi::SOCK_RAW => Family::Ipv4,
        abi::AF_INET6 if sock_type == abi::SOCK_RAW => Family::Ipv6,
        _ => return ALLOW,
    };
    if refuse_raw_socket(family, protocol as u8, sock_type as u8) {
        DENY
    } else {
        ALLOW
    }
}
