//! `cgroup/connect4|6` and `cgroup/sendmsg4|6`: the same decision at syscall time, so a
//! blocked `connect()` or `sendto()` fails at once with EPERM instead of hanging on dropped
//! SYNs, and the audit record names the task.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use datalab_guard_common::{
    classify::{v4_blocked, v6_blocked, Reason},
    resolve::CgroupPath,
    Family, Hook,
};

use crate::{
    decide::{refuse_for_current_task, Attempted},
    maps::{config, keep_meta, Tries},
    mptcp::connection_path,
};

const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[cgroup_sock_addr(connect4)]
pub fn dg_connect4(ctx: SockAddrContext) -> i32 {
    check_v4(&ctx, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn dg_sendmsg4(ctx: SockAddrContext) -> i32 {
    check_v4(&ctx, Hook::Sendmsg)
}

#[cgroup_sock_addr(connect6)]
pub fn dg_connect6(ctx: SockAddrContext) -> i32 {
    check_v6(&ctx, Hook::Connect)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn dg_sendmsg6(ctx: SockAddrContext) -> i32 {
    check_v6(&ctx, Hook::Sendmsg)
}

/// For connect: the MPTCP connection's recorded path, recorded first if this is its first
/// connect. Before the fast path, since a connection's first subflow usually goes somewhere
/// allowed and only a later one (a kernel worker's) somewhere blocked.
#[inline(always)]
fn connection_of(ctx: &SockAddrContext, hook: Hook) -> Option<&'static CgroupPath> {
    if hook == Hook::Connect {
        connection_path(ctx)
    } else {
        None
    }
}

#[inline(always)]
fn check_v4(ctx: &SockAddrContext, hook: Hook) -> i32 {
    keep_meta();
    let connection = connection_of(ctx, hook);
    let sa = ctx.sock_addr;
    // user_ip4 holds the address in network byte order: its bytes in memory are the address.
    // SAFETY: sa is the bpf_sock_addr context pointer the kernel passed this program.
    let ip = unsafe { (*sa).user_ip4 }.to_ne_bytes();
    if !v4_blocked(&Tries, ip) {
        return ALLOW;
    }
    let mut dst = [0u8; 16];
    dst[..4].copy_from_slice(&ip);
    check_destination(ctx, hook, connection, Family::Ipv4, dst)
}

#[inline(always)]
fn check_v6(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let connection = connection_of(ctx, hook);
    let sa = ctx.sock_addr;
    // SAFETY: sa is the bpf_sock_addr context pointer the kernel passed this program.
    let words = unsafe {
        [
            (*sa).user_ip6[0],
            (*sa).user_ip6[1],
            (*sa).user_ip6[2],
            (*sa).user_ip6[3],
        ]
    };
    let mut ip = [0u8; 16];
    ip[0..4].copy_from_slice(&words[0].to_ne_bytes());
    ip[4..8].copy_from_slice(&words[1].to_ne_bytes());
    ip[8..12].copy_from_slice(&words[2].to_ne_bytes());
    ip[12..16].copy_from_slice(&words[3].to_ne_bytes());
    // v4-mapped destinations of dual-stack sockets are judged as the IPv4 address.
    if !v6_blocked(&Tries, ip) {
        return ALLOW;
    }
    check_destination(ctx, hook, connection, Family::Ipv6, ip)
}

#[inline(always)]
fn check_destination(
    ctx: &SockAddrContext,
    hook: Hook,
    connection: Option<&CgroupPath>,
    family: Family,
    dst: [u8; 16],
) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: sa is the bpf_sock_addr context pointer the kernel passed this program.
    let port = unsafe { (*sa).user_port } as u16;
    let attempted = Attempted {
        hook,
        family,
        // SAFETY: as above.
        proto: unsafe { (*sa).protocol } as u8,
        sock_type: 0,
        dport: u16::from_be(port),
        dst,
        reason: Reason::Destination,
    };
    if refuse_for_current_task(&config(), &attempted, connection) {
        DENY
    } else {
        ALLOW
    }
}
