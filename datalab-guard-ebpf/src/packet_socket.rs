//! `lsm_cgroup/socket_post_create` (attached only with `--deny-raw-sockets`): refuses the
//! socket families that send frames around the IP stack to guarded cgroups. Their frames
//! never meet cgroup_skb or the socket-address hooks, and `cgroup/sock_create` only runs for
//! AF_INET/AF_INET6, so refusing the socket is the only place a cgroup hook can stop them.
//! This needs the BPF LSM (`bpf` in the kernel's `lsm=` list).
//!
//! Refused (from user space only; sockets the kernel makes for itself pass):
//! - AF_PACKET, every type: SOCK_RAW and SOCK_DGRAM build or address link-layer frames
//!   directly; SOCK_PACKET (also what the obsolete `socket(AF_INET, SOCK_PACKET)` becomes:
//!   the kernel rewrites it to PF_PACKET before any LSM hook runs).
//! - AF_XDP: an XSK bound to a queue (copy mode works on any driver, veth included) hands
//!   whole frames to the device's transmit path, past qdiscs and every socket hook.
//!
//! Not refused, on purpose: families that carry no IP traffic of the tenant's making toward a
//! network destination. AF_NETLINK configures the kernel (what it may change is a capability
//! question, and the egress hooks still judge the traffic that results); AF_VSOCK talks to
//! the hypervisor host over its own transport, not to an IP address; AF_ALG, AF_KEY, AF_CAN,
//! AF_BLUETOOTH and the like are not IP paths. Tunnels and overlays built from ordinary UDP
//! or IP sockets are IP-stack traffic and belong to the egress classifier.

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
    if kern != 0 {
        return ALLOW;
    }
    let (family, proto) = match family as u32 {
        // The protocol of a packet socket is an ethertype in network order; keep its low
        // byte (the audit record leaves it out: it is not an IP protocol).
        abi::AF_PACKET => (Family::Packet, u16::from_be(protocol as u16) as u8),
        // AF_XDP takes protocol 0 only.
        abi::AF_XDP => (Family::Xdp, 0),
        _ => return ALLOW,
    };
    if refuse_raw_socket(family, proto, sock_type as u8) {
        DENY
    } else {
        ALLOW
    }
}
