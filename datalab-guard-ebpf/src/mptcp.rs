//! MPTCP: the path manager connects a connection's additional subflows from a kernel worker,
//! whose cgroup (the root, outside the attach subtree) says nothing about the connection, so
//! the connect hooks cannot judge those calls by the calling task. The kernel gives each
//! subflow the cgroup of the connection's socket (`mptcp_attach_cgroup`), which is why the
//! connect programs run for them at all, but no helper tells a `cgroup_sock_addr` program a
//! socket's cgroup (`bpf_sk_cgroup_id` is refused there).
//!
//! So the connection remembers who connected it: on a subflow's connect, the connection's
//! socket (`bpf_skc_to_mptcp_sock`, which needs CAP_PERFMON at load) gets a socket storage
//! entry with the calling task's cgroup path, created by the first connect (the task's own,
//! in its context) and read by the later ones (the worker's). `decide` then judges by
//! `resolve::for_connection`. A connection whose first connect came before these programs
//! were attached has no record and is judged by the calling task as before.

use core::ptr;

use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    helpers::generated::{
        bpf_get_current_ancestor_cgroup_id, bpf_sk_storage_get, bpf_skc_to_mptcp_sock,
    },
    programs::SockAddrContext,
};
use datalab_guard_common::resolve::{CgroupPath, MAX_DEPTH};

use crate::maps::{root_level, CONNECTION_PATHS};

/// The recorded path of the MPTCP connection `ctx`'s socket is a subflow of, recording the
/// calling task's path first if the connection has none. `None` for any other socket (one
/// helper call: the cost every plain connect pays).
#[inline(always)]
pub fn connection_path(ctx: &SockAddrContext) -> Option<&'static CgroupPath> {
    // SAFETY: sock_addr is the context pointer the kernel passed this program; its sk is
    // the socket being connected, valid for the program's run.
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    // SAFETY: a BPF helper; it returns NULL unless sk is an MPTCP subflow.
    let connection = unsafe { bpf_skc_to_mptcp_sock(sk.cast()) };
    if connection.is_null() {
        return None;
    }
    let map = CONNECTION_PATHS.as_ptr();
    // SAFETY: a BPF helper on the connection's socket; without F_CREATE it only looks up.
    let found = unsafe { bpf_sk_storage_get(map, connection.cast(), ptr::null_mut(), 0) };
    let stored = if found.is_null() {
        let root_level = root_level();
        let mut path = CgroupPath {
            root_level,
            _pad: 0,
            ids: [0; MAX_DEPTH as usize],
        };
        for (i, id) in path.ids.iter_mut().enumerate() {
            // SAFETY: a BPF helper without pointer arguments; 0 past the task's level.
            *id = unsafe {
                bpf_get_current_ancestor_cgroup_id(root_level.wrapping_add(i as u32) as i32)
            };
            if *id == 0 {
                break;
            }
        }
        // SAFETY: as above; F_CREATE copies `path` into the new entry (an entry another CPU
        // created first is returned as it is).
        unsafe {
            bpf_sk_storage_get(
                map,
                connection.cast(),
                ptr::from_mut(&mut path).cast(),
                BPF_SK_STORAGE_GET_F_CREATE.into(),
            )
        }
    } else {
        found
    };
    if stored.is_null() {
        return None;
    }
    // SAFETY: a socket storage value of CONNECTION_PATHS (a CgroupPath); the kernel frees
    // socket storage only after an RCU grace period, and programs run under RCU.
    Some(unsafe { &*stored.cast::<CgroupPath>() })
}
