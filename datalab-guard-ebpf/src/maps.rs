//! The maps, all pinned by name under the agent's bpffs directory so that enforcement and
//! state survive the agent (see `datalab_guard_common::maps` for names and layouts).

use aya_ebpf::{
    bindings::{bpf_map_type::BPF_MAP_TYPE_SK_STORAGE, BPF_F_NO_PREALLOC},
    macros::{btf_map, map},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use datalab_guard_common::{
    classify::BlockedSet,
    counters::{COUNTER_ENTRIES, STAT_ENTRIES},
    maps::{
        BLOCKED_MAX_ENTRIES, EDGE_MAX_ENTRIES, EVENTS_BYTES, RATE_MAX_ENTRIES, VERDICTS_MAX_ENTRIES,
    },
    resolve::CgroupPath,
    EdgeEntry, GuardConfig, InstallMeta, RateState, VerdictEntry,
};

#[map(name = "DG_VERDICTS_V1")]
pub static VERDICTS: HashMap<u64, VerdictEntry> = HashMap::pinned(VERDICTS_MAX_ENTRIES, 0);

#[map(name = "DG_BLOCK4_V1")]
pub static BLOCKED_V4: LpmTrie<[u8; 4], u32> = LpmTrie::pinned(BLOCKED_MAX_ENTRIES, 0);

#[map(name = "DG_BLOCK6_V1")]
pub static BLOCKED_V6: LpmTrie<[u8; 16], u32> = LpmTrie::pinned(BLOCKED_MAX_ENTRIES, 0);

#[map(name = "DG_CONFIG_V2")]
pub static CONFIG: Array<GuardConfig> = Array::pinned(1, 0);

#[map(name = "DG_COUNT_V2")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(COUNTER_ENTRIES, 0);

#[map(name = "DG_STATS_V1")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_ENTRIES, 0);

#[map(name = "DG_EVENTS_V1")]
pub static EVENTS: RingBuf = RingBuf::pinned(EVENTS_BYTES, 0);

#[map(name = "DG_RATE_V1")]
pub static RATE: LruHashMap<u64, RateState> = LruHashMap::pinned(RATE_MAX_ENTRIES, 0);

/// Host-side ifindex -> verdict of the pod behind it, for the pod-edge layer (`edge`).
#[map(name = "DG_EDGE_V1")]
pub static EDGE: HashMap<u32, EdgeEntry> = HashMap::pinned(EDGE_MAX_ENTRIES, 0);

/// Written and read by the agent only; declared here so the loader creates and pins it
/// with the others.
#[map(name = "DG_META_V1")]
pub static META: Array<InstallMeta> = Array::pinned(1, 0);

/// Socket storage of [`CgroupPath`]s: the BTF map definition the loader reads (aya-ebpf's
/// `SkStorage` has no `pinning` field and takes its socket from the program's context only;
/// this map is keyed by the MPTCP connection's socket, found from a subflow). Every field is
/// a placeholder the loader reads through BTF, never dereferenced.
#[repr(C)]
pub struct ConnectionPaths {
    r#type: *const [i32; BPF_MAP_TYPE_SK_STORAGE as usize],
    key: *const i32,
    value: *const CgroupPath,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
    /// LIBBPF_PIN_BY_NAME: every load of the object (the agent attaches programs in more
    /// than one load) and a restarted agent share the same records.
    pinning: *const [i32; 1],
}

// SAFETY: the fields are placeholders the loader replaces with the map; nothing reads them.
unsafe impl Sync for ConnectionPaths {}

impl ConnectionPaths {
    const fn new() -> ConnectionPaths {
        ConnectionPaths {
            r#type: core::ptr::null(),
            key: core::ptr::null(),
            value: core::ptr::null(),
            max_entries: core::ptr::null(),
            map_flags: core::ptr::null(),
            pinning: core::ptr::null(),
        }
    }

    /// The map, as the storage helpers take it.
    #[inline(always)]
    pub fn as_ptr(&self) -> *mut core::ffi::c_void {
        core::ptr::from_ref(self).cast_mut().cast()
    }
}

/// MPTCP connection socket -> the cgroup path of the task that connected its first subflow
/// (see `mptcp`). Freed by the kernel with the socket.
#[btf_map(name = "DG_MPTCP_V1")]
pub static CONNECTION_PATHS: ConnectionPaths = ConnectionPaths::new();

/// The blocked set as the classifier sees it: the two LPM tries.
pub struct Tries;

impl BlockedSet for Tries {
    #[inline(always)]
    fn contains_v4(&self, addr: [u8; 4]) -> bool {
        BLOCKED_V4.get(Key::new(32, addr)).is_some()
    }

    #[inline(always)]
    fn contains_v6(&self, addr: [u8; 16]) -> bool {
        BLOCKED_V6.get(Key::new(128, addr)).is_some()
    }
}

/// The configuration, or the fail-closed default if the array is somehow unreadable.
#[inline(always)]
pub fn config() -> GuardConfig {
    match CONFIG.get(0) {
        Some(cfg) => *cfg,
        None => GuardConfig::zeroed(),
    }
}

/// The attach root's level alone (the connect hooks' MPTCP record needs nothing else of the
/// configuration before their fast path); 0 if the array is somehow unreadable.
#[inline(always)]
pub fn root_level() -> u32 {
    match CONFIG.get(0) {
        Some(cfg) => cfg.root_level,
        None => 0,
    }
}

/// Touches META so the linker keeps it (the programs never read it).
#[inline(always)]
pub fn keep_meta() {
    let _ = META.get_ptr(0);
}
