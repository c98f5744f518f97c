//! Map names and sizes. A map's name is also its pin name under `<bpffs>/maps/`, so a
//! restarted or upgraded agent finds the same maps. Changing the layout of a map's key or
//! value requires a new name (bump the suffix), so an old pin is never reused with a new
//! layout.

/// cgroup id (u64) -> [`crate::VerdictEntry`]: the verdict of a classified cgroup.
pub const VERDICTS: &str = "DG_VERDICTS_V1";
/// LPM trie of blocked IPv4 CIDRs: key `{prefix_len: u32, addr: [u8; 4]}` -> u32 rule id.
pub const BLOCKED_V4: &str = "DG_BLOCK4_V1";
/// LPM trie of blocked IPv6 CIDRs: key `{prefix_len: u32, addr: [u8; 16]}` -> u32 rule id.
pub const BLOCKED_V6: &str = "DG_BLOCK6_V1";
/// Array of one [`crate::GuardConfig`]. V2: the tunnel settings were appended.
pub const CONFIG: &str = "DG_CONFIG_V2";
/// Per-CPU array of u64 counters, indexed by [`crate::counters::counter_index`]. V2: the
/// `edge` hook and the `xdp` family made every class longer.
pub const COUNTERS: &str = "DG_COUNT_V2";
/// Per-CPU array of u64 statistics, indexed by [`crate::counters::Stat`].
pub const STATS: &str = "DG_STATS_V1";
/// Ring buffer of [`crate::AuditEvent`].
pub const EVENTS: &str = "DG_EVENTS_V1";
/// LRU hash cgroup id (u64) -> [`crate::RateState`]: per-cgroup audit event rate limit.
pub const RATE: &str = "DG_RATE_V1";
/// Array of one [`crate::InstallMeta`]: what the installing agent recorded for `status`.
pub const META: &str = "DG_META_V1";
/// Hash host-side ifindex (u32) -> [`crate::EdgeEntry`]: the pod-edge layer's verdicts.
pub const EDGE: &str = "DG_EDGE_V1";
/// Socket storage on MPTCP connection sockets -> [`crate::resolve::CgroupPath`]: who
/// connected the connection's first subflow, to judge the subflows a kernel worker connects.
/// Written by the programs only.
pub const MPTCP: &str = "DG_MPTCP_V1";

/// Pins of maps earlier versions made and this one no longer uses. An upgrade removes them
/// once the old programs are detached, and `uninstall` removes them too. `DG_POLICY_V1` is
/// the verdict map's former name (renamed so that "policy" means only the policy core and
/// the NetworkPolicy); same layout, but a pin is never renamed under running programs.
/// `DG_COUNT_V1` is the counter array before the `edge` hook and the `xdp` family (a
/// different layout); `DG_CONFIG_V1` is the config map before the tunnel settings grew its
/// value.
pub const RETIRED: [&str; 3] = ["DG_POLICY_V1", "DG_COUNT_V1", "DG_CONFIG_V1"];

/// Every map the agent pins, in a stable order (for `status` and `uninstall`).
pub const ALL: [&str; 11] = [
    VERDICTS, BLOCKED_V4, BLOCKED_V6, CONFIG, COUNTERS, STATS, EVENTS, RATE, META, EDGE, MPTCP,
];

/// Pods (or cgroups) the agent can classify on one node. 64 Ki entries of 16 bytes each.
pub const VERDICTS_MAX_ENTRIES: u32 = 65_536;
/// Blocked CIDRs per family; presets hold a handful, operators add a few.
pub const BLOCKED_MAX_ENTRIES: u32 = 1_024;
/// Ring buffer bytes (a power of two multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;
/// Guarded pod interfaces on one node (kubelet's default is 110 pods per node).
pub const EDGE_MAX_ENTRIES: u32 = 4_096;
/// cgroups tracked for audit rate limiting; LRU so a churn of cgroups cannot fill it.
pub const RATE_MAX_ENTRIES: u32 = 16_384;

/// Program names in the object, which are also the pin names under `<bpffs>/links/`.
pub mod programs {
    pub const EGRESS: &str = "dg_egress";
    pub const CONNECT4: &str = "dg_connect4";
    pub const CONNECT6: &str = "dg_connect6";
    pub const SENDMSG4: &str = "dg_sendmsg4";
    pub const SENDMSG6: &str = "dg_sendmsg6";
    pub const SOCK_CREATE: &str = "dg_sock_create";
    /// BPF LSM (lsm_cgroup/socket_post_create): AF_PACKET and AF_XDP refusal.
    pub const PACKET_SOCKET: &str = "dg_packet_socket";
    /// The LSM hook [`PACKET_SOCKET`] is written for (its `#[lsm_cgroup(hook = ...)]`);
    /// loading an lsm_cgroup program names it again.
    pub const PACKET_SOCKET_LSM_HOOK: &str = "socket_post_create";
    /// tc/tcx (sched_cls) on the host side of a guarded pod's interface: the pod-edge
    /// layer. Its links are pinned under `<bpffs>/edge/`, one per interface.
    pub const EDGE: &str = "dg_edge";
    /// Never attached: the floor that `bench` compares the guard against.
    pub const BENCH_EMPTY: &str = "dg_bench_empty";
    /// Never attached by the agent: `bench`'s probe of the fast path's CONFIG read alone.
    pub const BENCH_CONFIG: &str = "dg_bench_config";
    /// Never attached by the agent: `bench`'s probe of the fast path's packet read alone.
    pub const BENCH_PACKET: &str = "dg_bench_packet";
    /// Never attached by the agent: `bench`'s probe of the guard's whole fast path alone.
    pub const BENCH_FAST: &str = "dg_bench_fast";
    /// The bench-only programs, in the order `bench` attaches them.
    pub const BENCH: [&str; 4] = [BENCH_EMPTY, BENCH_CONFIG, BENCH_PACKET, BENCH_FAST];
}
