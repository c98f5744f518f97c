//! `#[repr(C)]` layouts shared with the kernel. Field order keeps natural alignment without
//! implicit padding, so the same bytes mean the same thing on both sides.

/// What the policy says about a cgroup. Stored as u32 in [`VerdictEntry::verdict`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Verdict {
    /// Traffic to blocked destinations is dropped (enforce) or reported (audit).
    Guard = 1,
    /// The cgroup may reach blocked destinations (e.g. a cloud CNI agent).
    Exempt = 2,
}

impl Verdict {
    /// Any value other than Exempt means Guard: a corrupted or zeroed entry fails closed.
    #[inline(always)]
    pub fn from_raw(raw: u32) -> Verdict {
        if raw == Verdict::Exempt as u32 {
            Verdict::Exempt
        } else {
            Verdict::Guard
        }
    }

    /// The verdict as config files, `status` and the state file spell it.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Guard => "guard",
            Verdict::Exempt => "exempt",
        }
    }
}

/// Whether a guarded attempt is dropped or only reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Mode {
    Enforce = 1,
    Audit = 2,
}

impl Mode {
    /// Anything but an explicit Audit enforces: a zeroed config map fails closed.
    #[inline(always)]
    pub fn from_raw(raw: u32) -> Mode {
        if raw == Mode::Audit as u32 {
            Mode::Audit
        } else {
            Mode::Enforce
        }
    }

    /// The mode as `--mode`, config files and `status` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

/// The hook that saw an attempt. Also the `hook` label of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Hook {
    Egress = 0,
    Connect = 1,
    Sendmsg = 2,
    /// Socket creation: raw IP sockets (`cgroup/sock_create`) and packet sockets (the BPF
    /// LSM program on `socket_post_create`) share this label.
    SockCreate = 3,
    /// The pod-edge layer: tc/tcx on the host side of a guarded pod's interface, for frames
    /// that never met a socket hook (AF_PACKET, AF_XDP, forwarding inside the pod).
    Edge = 4,
}

impl Hook {
    pub const COUNT: usize = 5;
    pub const ALL: [Hook; Hook::COUNT] = [
        Hook::Egress,
        Hook::Connect,
        Hook::Sendmsg,
        Hook::SockCreate,
        Hook::Edge,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hook::Egress => "egress",
            Hook::Connect => "connect",
            Hook::Sendmsg => "sendmsg",
            Hook::SockCreate => "sock_create",
            Hook::Edge => "edge",
        }
    }

    pub fn from_raw(raw: u8) -> Option<Hook> {
        Hook::ALL.iter().copied().find(|h| *h as u8 == raw)
    }
}

/// Address family of an attempt. Also the `family` label of the metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Family {
    Ipv4 = 0,
    Ipv6 = 1,
    /// AF_PACKET sockets, refused by `packet_socket` (the BPF LSM program; counted under
    /// the `sock_create` hook).
    Packet = 2,
    /// AF_XDP sockets, refused by `packet_socket` like AF_PACKET (same hook and program).
    Xdp = 3,
}

impl Family {
    pub const COUNT: usize = 4;
    pub const ALL: [Family; Family::COUNT] =
        [Family::Ipv4, Family::Ipv6, Family::Packet, Family::Xdp];

    pub fn name(self) -> &'static str {
        match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
            Family::Packet => "packet",
            Family::Xdp => "xdp",
        }
    }

    pub fn from_raw(raw: u8) -> Option<Family> {
        Family::ALL.iter().copied().find(|f| *f as u8 == raw)
    }
}

/// What happened to an attempt from a guarded cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Action {
    /// Dropped (enforce mode).
    Blocked = 0,
    /// Let through but reported (audit mode).
    Audited = 1,
}

impl Action {
    pub const COUNT: usize = 2;
    pub const ALL: [Action; Action::COUNT] = [Action::Blocked, Action::Audited];

    pub fn from_raw(raw: u8) -> Option<Action> {
        Action::ALL.iter().copied().find(|a| *a as u8 == raw)
    }
}

/// Value of the VERDICTS map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct VerdictEntry {
    /// [`Verdict`] as u32.
    pub verdict: u32,
    /// Counter class: the agent maps namespaces to small integers so the in-kernel counters
    /// carry a bounded `namespace` label. 0 is "unclassified" (default verdict, local mode).
    pub class: u32,
}

/// Value of the EDGE map (key: the host-side interface's ifindex, u32): the verdict of the
/// pod behind that interface, for the pod-edge layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct EdgeEntry {
    /// [`Verdict`] as u32 (anything but Exempt guards).
    pub verdict: u32,
    /// Counter class, as in [`VerdictEntry::class`].
    pub class: u32,
    /// The pod's cgroup id, reported as the audit record's `cgroup_id` so the agent can name
    /// the pod (0 when unknown, e.g. local mode).
    pub cgroup_id: u64,
}

/// The single entry of the CONFIG array map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct GuardConfig {
    /// Bit n set: some blocked IPv4 CIDR may contain an address whose first octet is n. The
    /// fast path tests this bit before any trie lookup; a clear bit proves "not blocked".
    pub v4_first_octet: [u32; 8],
    /// The same for the first byte of IPv6 destinations. Bit 0 is always set, because
    /// IPv4-mapped, -compatible and NAT64 addresses begin with 0x00 and embed IPv4.
    pub v6_first_octet: [u32; 8],
    /// [`Verdict`] for cgroups with no VERDICTS entry on their path to the root.
    pub default_verdict: u32,
    /// [`Mode`].
    pub mode: u32,
    /// cgroup level (depth below the cgroup2 mount) of the attach root.
    pub root_level: u32,
    /// Non-zero: guarded cgroups are refused SOCK_RAW IPv4/IPv6 sockets (`sock_create`)
    /// and AF_PACKET sockets (`packet_socket`, BPF LSM), where those programs are attached.
    pub deny_raw_sockets: u32,
    /// Audit events allowed per cgroup per window; further ones are counted as suppressed.
    pub events_per_window: u32,
    /// Length of the rate-limit window in milliseconds.
    pub window_ms: u32,
    /// Which UDP ports carry which encapsulation, and whether guarded cgroups may send
    /// encapsulated packets at all (see [`crate::tunnel`]).
    pub tunnels: TunnelConfig,
}

/// Most UDP ports the classifier treats as tunnel endpoints (VXLAN, Geneve, Teredo).
pub const MAX_TUNNEL_PORTS: usize = 8;

/// The encapsulation a UDP tunnel port carries. Stored as u8 in
/// [`TunnelConfig::udp_kinds`]; 0 marks an unused slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum UdpTunnel {
    /// 8-byte VXLAN header, then an Ethernet frame (RFC 7348).
    Vxlan = 1,
    /// Geneve: 8-byte header plus options, then Ethernet or IP (RFC 8926).
    Geneve = 2,
    /// Teredo: optional authentication and origin indicators, then IPv6 (RFC 4380).
    Teredo = 3,
}

impl UdpTunnel {
    pub fn from_raw(raw: u8) -> Option<UdpTunnel> {
        [UdpTunnel::Vxlan, UdpTunnel::Geneve, UdpTunnel::Teredo]
            .into_iter()
            .find(|k| *k as u8 == raw)
    }
}

/// Tunnel settings in [`GuardConfig`]: the UDP ports whose payload is decapsulated and
/// judged, and the switch that refuses every encapsulated packet from guarded cgroups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct TunnelConfig {
    /// Bit n set: some tunnel port's low byte is n. The egress fast path tests this bit for
    /// UDP packets; a clear bit proves "not a tunnel port".
    pub port_low_byte: [u32; 8],
    /// Tunnel ports, host byte order; 0 marks an unused slot.
    pub udp_ports: [u16; MAX_TUNNEL_PORTS],
    /// [`UdpTunnel`] of the port in the same slot.
    pub udp_kinds: [u8; MAX_TUNNEL_PORTS],
    /// Non-zero: every encapsulated packet from a guarded cgroup is refused
    /// ([`crate::classify::Reason::TunnelDenied`]), whatever it carries.
    pub deny_all: u32,
}

impl GuardConfig {
    pub const fn zeroed() -> GuardConfig {
        GuardConfig {
            v4_first_octet: [0; 8],
            v6_first_octet: [0; 8],
            default_verdict: 0,
            mode: 0,
            root_level: 0,
            deny_raw_sockets: 0,
            events_per_window: 0,
            window_ms: 0,
            tunnels: TunnelConfig::zeroed(),
        }
    }
}

/// Per-cgroup audit rate-limit state (RATE map value).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct RateState {
    pub window_start_ns: u64,
    pub emitted: u32,
    /// Events suppressed since the last one emitted; reported (and reset) with the next.
    pub suppressed: u32,
}

/// One blocked (or audited) attempt, sent through the EVENTS ring buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct AuditEvent {
    /// CLOCK_BOOTTIME nanoseconds (bpf_ktime_get_boot_ns), converted to wall time by the agent.
    pub boot_ns: u64,
    /// cgroup of the socket (skb hook) or of the calling task (socket hooks).
    pub cgroup_id: u64,
    /// Deepest cgroup on the path to the root with a VERDICTS entry; 0 = default verdict.
    pub policy_cgroup_id: u64,
    /// Events of this cgroup suppressed by the rate limit since the previous event.
    pub suppressed: u32,
    /// Thread id and process id (0 where the hook does not know them: skb egress).
    pub pid: u32,
    pub tgid: u32,
    pub uid: u32,
    pub gid: u32,
    /// Counter class of the policy entry (see [`VerdictEntry::class`]).
    pub class: u32,
    /// Destination port, host byte order; 0 when there is none (ICMP, fragments, raw).
    pub dport: u16,
    /// [`Hook`], [`Family`], [`Action`] as u8; `proto` is the IP protocol number.
    pub hook: u8,
    pub family: u8,
    pub proto: u8,
    pub action: u8,
    /// Socket type for raw and packet socket events (SOCK_RAW = 3), else 0.
    pub sock_type: u8,
    /// [`crate::classify::Reason`] as u8.
    pub reason: u8,
    /// Destination address: IPv4 in the first 4 bytes, IPv6 in all 16.
    pub dst: [u8; 16],
    /// Task command name, NUL padded (empty where the hook does not know it).
    pub comm: [u8; 16],
}

/// What the installing agent recorded in the META map, so `status` can answer from the
/// pins alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct InstallMeta {
    /// Hash of the eBPF object the links run; a different hash at start means "upgrade".
    pub object_hash: u64,
    /// cgroup id (inode) of the attach root.
    pub root_cgroup_id: u64,
    /// Wall-clock seconds when the links were (re)attached.
    pub attached_unix: u64,
    /// Length of `root_path` in bytes.
    pub root_path_len: u32,
    /// 1 once every link is attached and pinned.
    pub complete: u32,
    /// Path of the attach root (UTF-8, not NUL terminated).
    pub root_path: [u8; 256],
}

/// Socket constants the eBPF side needs (Linux ABI values).
pub mod abi {
    pub const AF_INET: u32 = 2;
    pub const AF_INET6: u32 = 10;
    pub const AF_PACKET: u32 = 17;
    pub const AF_XDP: u32 = 44;
    pub const SOCK_RAW: u32 = 3;
}

#[cfg(feature = "user")]
mod pod_impls {
    // Each of these is #[repr(C)], made of integers and integer arrays only, and has no
    // padding (`tests::layouts_have_no_hidden_padding`), so every bit pattern is a valid value.
    // SAFETY: two u32 fields; see above.
    unsafe impl aya::Pod for super::VerdictEntry {}
    // SAFETY: two u32 then one u64; see above.
    unsafe impl aya::Pod for super::EdgeEntry {}
    // SAFETY: two u32 arrays, u32 fields, then a TunnelConfig; see above.
    unsafe impl aya::Pod for super::GuardConfig {}
    // SAFETY: one u64 then two u32; see above.
    unsafe impl aya::Pod for super::RateState {}
    // SAFETY: u64, u32, u16, u8 and u8 arrays in falling alignment; see above.
    unsafe impl aya::Pod for super::AuditEvent {}
    // SAFETY: u64, u32 and a byte array; see above.
    unsafe impl aya::Pod for super::InstallMeta {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<VerdictEntry>(), 8);
        assert_eq!(size_of::<EdgeEntry>(), 16);
        assert_eq!(size_of::<TunnelConfig>(), 8 * 4 + 8 * 2 + 8 + 4);
        assert_eq!(
            size_of::<GuardConfig>(),
            8 * 4 * 2 + 6 * 4 + size_of::<TunnelConfig>()
        );
        assert_eq!(size_of::<RateState>(), 16);
        assert_eq!(size_of::<AuditEvent>(), 3 * 8 + 6 * 4 + 2 + 6 + 16 + 16);
        assert_eq!(size_of::<InstallMeta>(), 3 * 8 + 2 * 4 + 256);
    }

    #[test]
    fn unknown_raw_values_fail_closed() {
        assert_eq!(Verdict::from_raw(0), Verdict::Guard);
        assert_eq!(Verdict::from_raw(7), Verdict::Guard);
        assert_eq!(Verdict::from_raw(2), Verdict::Exempt);
        assert_eq!(Mode::from_raw(0), Mode::Enforce);
        assert_eq!(Mode::from_raw(2), Mode::Audit);
    }
}
