//! The destination classifier: does this packet (or socket address) reach a blocked
//! destination?
//!
//! Shared by the eBPF programs (packet bytes read with `bpf_skb_load_bytes`, the blocked set
//! is the LPM tries) and the host (a byte slice and a list of CIDRs), so the logic the kernel
//! runs is the logic the unit, property and fuzz tests exercise.
//!
//! Besides the plain destination it refuses packets that name a *later* destination: IPv4
//! loose/strict source-route options and IPv6 routing headers with segments left, whatever
//! addresses they list (no tenant needs source routing, and any socket can ask for it). A
//! packet whose options or extension headers cannot be walked to the end within fixed bounds
//! is judged blocked too (fail closed); the kernel never builds such packets.
//!
//! Packets that carry an encapsulation (VXLAN, Geneve, Teredo, IPIP, 6in4, GRE) are judged
//! by their inner packet too, one level deep: see [`crate::tunnel`].
//!
//! Every loop has a constant bound so the verifier can prove termination.

use crate::{tunnel, TunnelConfig};

/// Reads bytes of an L3 packet (offset 0 is the first byte of the IP header).
pub trait PacketBytes {
    /// `N` bytes at `offset`, or `None` if the packet is shorter.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

/// Membership in the blocked destination sets.
pub trait BlockedSet {
    fn contains_v4(&self, addr: [u8; 4]) -> bool;
    fn contains_v6(&self, addr: [u8; 16]) -> bool;
}

/// Why an attempt was judged blocked. Also the `reason` of the audit record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// The destination address is in the blocked set.
    Destination = 0,
    /// An IPv4 source-route option (LSRR/SSRR) or an IPv6 routing header with segments
    /// left: refused whatever addresses it lists, blocked or not.
    SourceRoute = 1,
    /// Options or extension headers could not be walked within bounds (only hand-built
    /// packets, from raw sockets, look like that).
    Unparseable = 2,
    /// A raw IP socket refused by `sock_create` or a packet socket refused by
    /// `packet_socket` (the BPF LSM program).
    RawSocket = 3,
    /// An encapsulated packet whose inner packet is refused: its destination is blocked,
    /// or it would need a walk (options, extension headers) or a second decapsulation. The
    /// attempt names the inner packet.
    Tunnel = 4,
    /// Any encapsulated packet while tunnels are denied (`tunnels.denyAll`,
    /// `--deny-tunnels`). The attempt names the outer packet.
    TunnelDenied = 5,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Reason::Destination => "destination",
            Reason::SourceRoute => "source_route",
            Reason::Unparseable => "unparseable",
            Reason::RawSocket => "raw_socket",
            Reason::Tunnel => "tunnel",
            Reason::TunnelDenied => "tunnel_denied",
        }
    }

    pub fn from_raw(raw: u8) -> Option<Reason> {
        [
            Reason::Destination,
            Reason::SourceRoute,
            Reason::Unparseable,
            Reason::RawSocket,
            Reason::Tunnel,
            Reason::TunnelDenied,
        ]
        .into_iter()
        .find(|r| *r as u8 == raw)
    }
}

/// A judged attempt: what the audit record reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    /// `true` for IPv6 packets (even when the judged address is an embedded IPv4 one). For
    /// [`Reason::Tunnel`] every field describes the inner packet.
    pub ipv6: bool,
    /// Final L4 protocol after options/extension headers (0 if not reached).
    pub proto: u8,
    /// The packet's destination field (IPv4 in the first 4 bytes).
    pub dst: [u8; 16],
    /// Destination port for TCP/UDP/UDP-Lite/SCTP when visible, else 0.
    pub dport: u16,
}

/// Verdict of the classifier on one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketClass {
    /// Not an IPv4/IPv6 packet with a complete fixed header: nothing to judge.
    NotIp,
    /// Reaches no blocked destination.
    Pass(Attempt),
    /// Reaches a blocked destination.
    Blocked(Attempt, Reason),
}

pub const IPPROTO_HOPOPTS: u8 = 0;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ROUTING: u8 = 43;
pub const IPPROTO_FRAGMENT: u8 = 44;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_DSTOPTS: u8 = 60;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_UDPLITE: u8 = 136;

/// Extension headers walked before giving up (fail closed).
pub const MAX_EXT_HEADERS: usize = 8;
/// IPv4 option bytes (the header holds at most 40).
const MAX_V4_OPTION_BYTES: usize = 40;

const IPOPT_EOL: u8 = 0;
const IPOPT_NOP: u8 = 1;
const IPOPT_LSRR: u8 = 0x83;
const IPOPT_SSRR: u8 = 0x89;

/// IPv4 address embedded in an IPv6 one that a socket or translator turns into IPv4:
/// IPv4-mapped `::ffff:a.b.c.d` and the NAT64 well-known prefix `64:ff9b::/96`.
#[inline(always)]
pub fn embedded_v4(addr: &[u8; 16]) -> Option<[u8; 4]> {
    let tail = [addr[12], addr[13], addr[14], addr[15]];
    let mapped = addr[..10].iter().all(|b| *b == 0) && addr[10] == 0xff && addr[11] == 0xff;
    let nat64 = addr[0] == 0x00
        && addr[1] == 0x64
        && addr[2] == 0xff
        && addr[3] == 0x9b
        && addr[4..12].iter().all(|b| *b == 0);
    if mapped || nat64 {
        Some(tail)
    } else {
        None
    }
}

/// Is this IPv4 address blocked?
#[inline(always)]
pub fn v4_blocked<S: BlockedSet + ?Sized>(set: &S, addr: [u8; 4]) -> bool {
    set.contains_v4(addr)
}

/// Is this IPv6 address blocked, directly or through an embedded IPv4 address?
#[inline(always)]
pub fn v6_blocked<S: BlockedSet + ?Sized>(set: &S, addr: [u8; 16]) -> bool {
    if set.contains_v6(addr) {
        return true;
    }
    match embedded_v4(&addr) {
        Some(v4) => set.contains_v4(v4),
        None => false,
    }
}

/// The bytes of a packet's fixed header the fast path looks at, read by direct packet
/// access in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FastHeader {
    /// The packet's first byte (version and, for IPv4, header length).
    pub first: u8,
    /// IPv4 protocol (byte 9) or IPv6 next header (byte 6).
    pub proto: u8,
    /// First byte of the destination address.
    pub dst_first: u8,
    /// The two bytes right after a fixed header of 20 (IPv4) or 40 (IPv6) bytes, read as
    /// a UDP destination port (0 when the packet ends before them).
    pub dport: u16,
}

impl FastHeader {
    /// The fast path's view of an L3 packet held in a byte slice (tests, fuzzing).
    pub fn of(pkt: &[u8]) -> FastHeader {
        let byte = |i: usize| pkt.get(i).copied().unwrap_or(0);
        let v6 = byte(0) >> 4 == 6;
        let (proto, dst, l4) = if v6 { (6, 24, 40) } else { (9, 16, 20) };
        FastHeader {
            first: byte(0),
            proto: byte(proto),
            dst_first: byte(dst),
            dport: match pkt.get(l4 + 2..l4 + 4) {
                Some(p) => u16::from_be_bytes([p[0], p[1]]),
                None => 0,
            },
        }
    }
}

/// The fast-path test the eBPF egress program runs on every packet. `true` proves the
/// packet cannot be blocked; `false` sends it to [`classify_packet_with`]. Only packets that
/// may be an encapsulation (IP protocol 4, 41, 47, or UDP to a port whose low byte is a
/// tunnel port's) leave it on their protocol; TCP costs one more comparison.
#[inline(always)]
pub fn fast_path_pass(
    h: FastHeader,
    v4_map: &[u32; 8],
    v6_map: &[u32; 8],
    tunnels: &TunnelConfig,
) -> bool {
    use crate::cidr::first_byte_may_match;
    if tunnel::may_be_encapsulation(tunnels, h.proto, h.dport) {
        return false;
    }
    if h.first == 0x45 {
        // IPv4 without options: only the destination can matter.
        return !first_byte_may_match(v4_map, h.dst_first);
    }
    if h.first >> 4 == 6 {
        // Extension headers that can carry a routing header (or hide it behind a fragment,
        // or an encapsulation behind them) take the slow path; everything else is judged by
        // the destination.
        let next = h.proto;
        let may_route = next == IPPROTO_HOPOPTS
            || next == IPPROTO_ROUTING
            || next == IPPROTO_FRAGMENT
            || next == IPPROTO_DSTOPTS
            || next == IPPROTO_AH;
        return !may_route && !first_byte_may_match(v6_map, h.dst_first);
    }
    false
}

/// Judges a whole packet with the default tunnel ports ([`TunnelConfig::defaults`]).
pub fn classify_packet<P: PacketBytes + ?Sized, S: BlockedSet + ?Sized>(
    pkt: &P,
    set: &S,
) -> PacketClass {
    classify_packet_with(pkt, set, &TunnelConfig::defaults())
}

/// Judges a whole packet, encapsulations as `tunnels` says. See the module documentation
/// for what is checked. The two stages the kernel runs apart, composed: the outer packet
/// ([`classify_outer`]), then its payload when it may be an encapsulation
/// ([`tunnel::judge_payload`]).
#[inline(always)]
pub fn classify_packet_with<P: PacketBytes + ?Sized, S: BlockedSet + ?Sized>(
    pkt: &P,
    set: &S,
    tunnels: &TunnelConfig,
) -> PacketClass {
    match classify_outer(pkt, set, tunnels) {
        Outer::Judged(class) => class,
        Outer::Encapsulated { outer, l4 } => tunnel::judge_payload(pkt, set, tunnels, outer, l4),
    }
}

/// What the first stage of the classifier found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outer {
    /// The packet is judged: its outer header decides.
    Judged(PacketClass),
    /// The outer packet passes on its own but may carry an encapsulation (its protocol or
    /// UDP port says so): its payload at `l4` decides, through [`tunnel::judge_payload`].
    Encapsulated { outer: Attempt, l4: usize },
}

/// The first stage: the outer header, its options or extension headers. Split from
/// [`tunnel::judge_payload`] so that the kernel programs can verify the tunnel stage once,
/// in a function of its own, instead of once for every path through the option and
/// extension-header walks that can reach it (which is what made the verifier's count
/// explode when the stages were one inlined function).
#[inline(always)]
pub fn classify_outer<P: PacketBytes + ?Sized, S: BlockedSet + ?Sized>(
    pkt: &P,
    set: &S,
    tunnels: &TunnelConfig,
) -> Outer {
    let first = match pkt.read::<1>(0) {
        Some(b) => b[0],
        None => return Outer::Judged(PacketClass::NotIp),
    };
    match first >> 4 {
        4 => classify_v4(pkt, set, tunnels, first),
        6 => classify_v6(pkt, set, tunnels),
        _ => Outer::Judged(PacketClass::NotIp),
    }
}

/// The end of the first stage for an outer packet that passed: on to the tunnel stage when
/// its upper layer (at `l4`, 0 for a later fragment, which carries no header) may be an
/// encapsulation.
#[inline(always)]
fn outer_passed(tunnels: &TunnelConfig, outer: Attempt, l4: usize) -> Outer {
    if l4 != 0 && tunnel::may_be_encapsulation(tunnels, outer.proto, outer.dport) {
        Outer::Encapsulated { outer, l4 }
    } else {
        Outer::Judged(PacketClass::Pass(outer))
    }
}

#[inline(always)]
fn classify_v4<P: PacketBytes + ?Sized, S: BlockedSet + ?Sized>(
    pkt: &P,
    set: &S,
    tunnels: &TunnelConfig,
    first: u8,
) -> Outer {
    let Some(hdr) = pkt.read::<20>(0) else {
        return Outer::Judged(PacketClass::NotIp);
    };
    let dst4 = [hdr[16], hdr[17], hdr[18], hdr[19]];
    let proto = hdr[9];
    let mut attempt = Attempt {
        ipv6: false,
        proto,
        dst: [0; 16],
        dport: 0,
    };
    attempt.dst[..4].copy_from_slice(&dst4);

    let header_len = ((first & 0x0f) as usize) * 4;
    let fragment_offset = (u16::from_be_bytes([hdr[6], hdr[7]]) & 0x1fff) as usize;
    if header_len >= 20 && fragment_offset == 0 {
        attempt.dport = read_dport(pkt, header_len, proto);
    }

    if v4_blocked(set, dst4) {
        return Outer::Judged(PacketClass::Blocked(attempt, Reason::Destination));
    }
    if header_len < 20 {
        return Outer::Judged(PacketClass::Blocked(attempt, Reason::Unparseable));
    }
    match scan_v4_options(pkt, header_len) {
        None => {
            // A later fragment carries no header to decapsulate (0: none).
            let l4 = if fragment_offset == 0 { header_len } else { 0 };
            outer_passed(tunnels, attempt, l4)
        }
        Some(reason) => Outer::Judged(PacketClass::Blocked(attempt, reason)),
    }
}

/// Walks IPv4 options; `Some(reason)` when a loose or strict source route is present or the
/// options are malformed. Source routing is refused from guarded cgroups whatever the
/// addresses it lists: any socket may set it (IP_OPTIONS), no tenant workload needs it, and
/// judging only what the header says keeps the check small enough to prove.
#[inline(always)]
fn scan_v4_options<P: PacketBytes + ?Sized>(pkt: &P, header_len: usize) -> Option<Reason> {
    let mut off = 20usize;
    for _ in 0..MAX_V4_OPTION_BYTES {
        if off >= header_len {
            return None;
        }
        let kind = match pkt.read::<1>(off) {
            Some(b) => b[0],
            None => return Some(Reason::Unparseable),
        };
        if kind == IPOPT_EOL {
            return None;
        }
        if kind == IPOPT_NOP {
            off += 1;
            continue;
        }
        if kind == IPOPT_LSRR || kind == IPOPT_SSRR {
            return Some(Reason::SourceRoute);
        }
        let len = match pkt.read::<1>(off + 1) {
            Some(b) => b[0] as usize,
            None => return Some(Reason::Unparseable),
        };
        if len < 2 || off + len > header_len {
            return Some(Reason::Unparseable);
        }
        off += len;
    }
    // Every entry takes at least one byte, so after MAX_V4_OPTION_BYTES entries the walk has
    // reached the header's end: 40 one-byte NOPs fill a 60-byte header exactly (a fuzz
    // finding: the loop used to end here without this last check and drop such a packet).
    if off >= header_len {
        return None;
    }
    Some(Reason::Unparseable)
}

#[inline(always)]
fn classify_v6<P: PacketBytes + ?Sized, S: BlockedSet + ?Sized>(
    pkt: &P,
    set: &S,
    tunnels: &TunnelConfig,
) -> Outer {
    let Some(hdr) = pkt.read::<40>(0) else {
        return Outer::Judged(PacketClass::NotIp);
    };
    let mut dst = [0u8; 16];
    dst.copy_from_slice(&hdr[24..40]);
    let mut attempt = Attempt {
        ipv6: true,
        proto: hdr[6],
        dst,
        dport: 0,
    };
    let direct = v6_blocked(set, dst);

    let walk = walk_v6_extensions(pkt, hdr[6]);
    attempt.proto = walk.proto;
    attempt.dport = walk.dport;
    if direct {
        return Outer::Judged(PacketClass::Blocked(attempt, Reason::Destination));
    }
    match walk.blocked {
        None => outer_passed(tunnels, attempt, walk.l4),
        Some(reason) => Outer::Judged(PacketClass::Blocked(attempt, reason)),
    }
}

struct V6Walk {
    proto: u8,
    dport: u16,
    blocked: Option<Reason>,
    /// Offset of the upper-layer header; 0 when refused or a later fragment (a plain
    /// `usize`: see `tunnel::NO_INNER` for why not an `Option`).
    l4: usize,
}

#[inline(always)]
fn walk_v6_extensions<P: PacketBytes + ?Sized>(pkt: &P, first_next: u8) -> V6Walk {
    let mut next = first_next;
    let mut off = 40usize;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_DSTOPTS | IPPROTO_ROUTING | IPPROTO_AH => {
                let Some(h) = pkt.read::<2>(off) else {
                    return V6Walk {
                        proto: next,
                        dport: 0,
                        blocked: Some(Reason::Unparseable),
                        l4: 0,
                    };
                };
                let len = if next == IPPROTO_AH {
                    (h[1] as usize + 2) * 4
                } else {
                    (h[1] as usize + 1) * 8
                };
                // The whole header must be in the packet (a cut one hides what follows it),
                // and an AH shorter than its 12-byte fixed part is malformed.
                let malformed_ah = next == IPPROTO_AH && h[1] == 0;
                if malformed_ah || pkt.read::<1>(off + len - 1).is_none() {
                    return V6Walk {
                        proto: next,
                        dport: 0,
                        blocked: Some(Reason::Unparseable),
                        l4: 0,
                    };
                }
                if next == IPPROTO_ROUTING {
                    if let Some(reason) = scan_routing_header(pkt, off) {
                        return V6Walk {
                            proto: next,
                            dport: 0,
                            blocked: Some(reason),
                            l4: 0,
                        };
                    }
                }
                next = h[0];
                off += len;
            }
            IPPROTO_FRAGMENT => {
                // All 8 bytes: a cut fragment header is as unparseable as any other.
                let Some(h) = pkt.read::<8>(off) else {
                    return V6Walk {
                        proto: next,
                        dport: 0,
                        blocked: Some(Reason::Unparseable),
                        l4: 0,
                    };
                };
                let frag_offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                next = h[0];
                off += 8;
                if frag_offset != 0 {
                    // A later fragment: its headers were judged with the first one.
                    return V6Walk {
                        proto: next,
                        dport: 0,
                        blocked: None,
                        l4: 0,
                    };
                }
            }
            _ => {
                return V6Walk {
                    proto: next,
                    dport: read_dport(pkt, off, next),
                    blocked: None,
                    l4: off,
                };
            }
        }
    }
    // MAX_EXT_HEADERS headers walked: what follows must be the upper layer.
    match next {
        IPPROTO_HOPOPTS | IPPROTO_DSTOPTS | IPPROTO_ROUTING | IPPROTO_AH | IPPROTO_FRAGMENT => {
            V6Walk {
                proto: next,
                dport: 0,
                blocked: Some(Reason::Unparseable),
                l4: 0,
            }
        }
        _ => V6Walk {
            proto: next,
            dport: read_dport(pkt, off, next),
            blocked: None,
            l4: off,
        },
    }
}

/// A routing header with segments left sends the packet on to further addresses after its
/// destination. Refused from guarded cgroups whatever its type or addresses, for the same
/// reasons as IPv4 source routes (and type 0 is deprecated, RFC 5095).
#[inline(always)]
fn scan_routing_header<P: PacketBytes + ?Sized>(pkt: &P, off: usize) -> Option<Reason> {
    match pkt.read::<4>(off) {
        Some(h) if h[3] == 0 => None,
        Some(_) => Some(Reason::SourceRoute),
        None => Some(Reason::Unparseable),
    }
}

#[inline(always)]
pub(crate) fn read_dport<P: PacketBytes + ?Sized>(pkt: &P, l4_offset: usize, proto: u8) -> u16 {
    match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_UDPLITE | IPPROTO_SCTP => {
            match pkt.read::<2>(l4_offset + 2) {
                Some(p) => u16::from_be_bytes(p),
                None => 0,
            }
        }
        _ => 0,
    }
}

/// Host implementation over a byte slice.
impl PacketBytes for [u8] {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        let end = offset.checked_add(N)?;
        let bytes = self.get(offset..end)?;
        let mut out = [0u8; N];
        out.copy_from_slice(bytes);
        Some(out)
    }
}

/// Host implementation over a list of CIDRs (the agent's model of the tries).
impl BlockedSet for [crate::cidr::Cidr] {
    fn contains_v4(&self, addr: [u8; 4]) -> bool {
        self.iter().any(|c| c.contains_v4(addr))
    }
    fn contains_v6(&self, addr: [u8; 16]) -> bool {
        self.iter().any(|c| c.contains_v6(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cidr::{prefilter, Cidr};

    const IMDS4: [u8; 4] = [169, 254, 169, 254];
    const IMDS6: [u8; 16] = [
        0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
    ];

    fn defaults() -> [Cidr; 2] {
        [Cidr::v4(IMDS4, 32).unwrap(), Cidr::v6(IMDS6, 128).unwrap()]
    }

    fn v4_packet(dst: [u8; 4], proto: u8, options: &[u8], dport: u16) -> [u8; 80] {
        let mut p = [0u8; 80];
        let ihl = 5 + options.len() / 4;
        p[0] = 0x40 | ihl as u8;
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&dst);
        p[20..20 + options.len()].copy_from_slice(options);
        let l4 = ihl * 4;
        p[l4 + 2..l4 + 4].copy_from_slice(&dport.to_be_bytes());
        p
    }

    fn v6_packet(dst: [u8; 16], next: u8, ext: &[u8], dport: u16) -> [u8; 160] {
        let mut p = [0u8; 160];
        p[0] = 0x60;
        p[6] = next;
        p[24..40].copy_from_slice(&dst);
        p[40..40 + ext.len()].copy_from_slice(ext);
        let l4 = 40 + ext.len();
        p[l4 + 2..l4 + 4].copy_from_slice(&dport.to_be_bytes());
        p
    }

    #[test]
    fn plain_destinations() {
        let set = defaults();
        let p = v4_packet(IMDS4, IPPROTO_TCP, &[], 80);
        assert!(
            matches!(classify_packet(&p[..], &set[..]), PacketClass::Blocked(a, Reason::Destination) if a.dport == 80 && a.proto == 6)
        );
        let p = v4_packet([169, 254, 169, 253], IPPROTO_TCP, &[], 80);
        assert!(matches!(
            classify_packet(&p[..], &set[..]),
            PacketClass::Pass(_)
        ));
        let p = v6_packet(IMDS6, IPPROTO_UDP, &[], 53);
        assert!(
            matches!(classify_packet(&p[..], &set[..]), PacketClass::Blocked(a, Reason::Destination) if a.ipv6 && a.dport == 53)
        );
    }

    #[test]
    fn embedded_v4_forms_are_judged_as_v4() {
        let set = defaults();
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&IMDS4);
        assert!(v6_blocked(&set[..], mapped));
        let mut nat64 = [0u8; 16];
        nat64[1] = 0x64;
        nat64[2] = 0xff;
        nat64[3] = 0x9b;
        nat64[12..].copy_from_slice(&IMDS4);
        assert!(v6_blocked(&set[..], nat64));
        let mut compat = [0u8; 16];
        compat[12..].copy_from_slice(&IMDS4);
        assert!(!v6_blocked(&set[..], compat));
    }

    #[test]
    fn a_header_full_of_one_byte_options_passes() {
        // The fuzz finding in fuzz/regressions/: forty NOPs fill the largest header (IHL 15)
        // exactly; the walk must reach its end and pass, not run out of steps and drop.
        let set = defaults();
        let p = v4_packet([192, 0, 2, 1], IPPROTO_TCP, &[IPOPT_NOP; 40], 443);
        assert!(
            matches!(classify_packet(&p[..], &set[..]), PacketClass::Pass(a) if a.dport == 443)
        );
        // 39 NOPs then a two-byte option that runs one byte past the header: still refused.
        let mut over = [IPOPT_NOP; 40];
        over[39] = 0x44;
        let p = v4_packet([192, 0, 2, 1], IPPROTO_TCP, &over, 443);
        assert!(matches!(
            classify_packet(&p[..], &set[..]),
            PacketClass::Blocked(_, Reason::Unparseable)
        ));
    }

    #[test]
    fn source_route_options_are_refused_whatever_they_list() {
        let set = defaults();
        // NOP, LSRR with two hops, the second one IMDS.
        let opts = [1, IPOPT_LSRR, 11, 4, 192, 0, 2, 1, 169, 254, 169, 254];
        let mut padded = [0u8; 12];
        padded[..11].copy_from_slice(&opts[..11]);
        let p = v4_packet([192, 0, 2, 1], IPPROTO_TCP, &padded, 80);
        assert!(matches!(
            classify_packet(&p[..], &set[..]),
            PacketClass::Blocked(_, Reason::SourceRoute)
        ));
        // SSRR through unblocked hops only: refused all the same.
        let ssrr = [IPOPT_SSRR, 7, 4, 192, 0, 2, 9, 0];
        let p = v4_packet([192, 0, 2, 1], IPPROTO_TCP, &ssrr, 80);
        assert!(matches!(
            classify_packet(&p[..], &set[..]),
            PacketClass::Blocked(_, Reason::SourceRoute)
        ));
        // Record-route style option that names IMDS is not routing: pass.
        let rr = [7, 7, 4, 169, 254, 169, 254, 0];
        let p = v4_packet([192, 0, 2, 1], IPPROTO_TCP, &rr, 80);
        assert!(matches!(classify_packet(&p[..], &set[..]), PacketClass::Pass(a) if a.dport == 80));
        // An option whose length runs past the header is refused.
        let bad = [0x44, 40, 0, 0];
        let p = v4_packet([192, 0, 2, 1], IPPROTO_TCP, &bad, 80);
        assert!(matches!(
            classify_packet(&p[..], &set[..]),
            PacketClass::Blocked(_, Reason::Unparseable)
        ));
    }

    #[test]
    fn routing_headers_and_extension_chains() {
        let set = defaults();
        let other = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        // Hop-by-hop (8 bytes) then SRH with two segments, one IMDS.
        let mut ext = [0u8; 8 + 8 + 32];
        ext[0] = IPPROTO_ROUTING;
        ext[1] = 0;
        ext[8] = IPPROTO_TCP;
        ext[9] = 4; // 4 * 8 + 8 = 40 bytes
        ext[10] = 4;
        ext[11] = 1;
        ext[16..32].copy_from_slice(&other);
        ext[32..48].copy_from_slice(&IMDS6);
        let p = v6_packet(other, IPPROTO_HOPOPTS, &ext, 443);
        assert!(matches!(
            classify_packet(&p[..], &set[..]),
            PacketClass::Blocked(_, Reason::SourceRoute)
        ));
        // Any routing header with segments left is refused, even without IMDS in it.
        ext[32..48].copy_from_slice(&other);
        let p = v6_packet(other, IPPROTO_HOPOPTS, &ext, 443);
        assert!(matches!(
            classify_packet(&p[..], &set[..]),
            PacketClass::Blocked(_, Reason::SourceRoute)
        ));
        // With no segments left it is inert: pass, and the port is found behind the headers.
        ext[11] = 0;
        let p = v6_packet(other, IPPROTO_HOPOPTS, &ext, 443);
        assert!(
            matches!(classify_packet(&p[..], &set[..]), PacketClass::Pass(a) if a.proto == IPPROTO_TCP && a.dport == 443)
        );
        // Fragment header, first fragment: port visible.
        let frag = [IPPROTO_UDP, 0, 0, 1, 0, 0, 0, 9];
        let p = v6_packet(other, IPPROTO_FRAGMENT, &frag, 53);
        assert!(matches!(classify_packet(&p[..], &set[..]), PacketClass::Pass(a) if a.dport == 53));
    }

    /// Found by the oracle (tests/classifier_oracle.rs): each of these passed before.
    #[test]
    fn extension_headers_must_be_whole_and_well_formed() {
        let set = defaults();
        let other = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        // Destination options claiming 24 bytes, cut after 20: cannot be walked to its end.
        let mut dstopts = [0u8; 24];
        dstopts[0] = IPPROTO_TCP;
        dstopts[1] = 2;
        let p = v6_packet(other, IPPROTO_DSTOPTS, &dstopts, 80);
        assert!(matches!(
            classify_packet(&p[..40 + 24], &set[..]),
            PacketClass::Pass(_)
        ));
        assert!(matches!(
            classify_packet(&p[..40 + 20], &set[..]),
            PacketClass::Blocked(_, Reason::Unparseable)
        ));
        // A fragment header cut after 4 of its 8 bytes.
        let frag = [IPPROTO_UDP, 0, 0, 0, 0, 0, 0, 9];
        let p = v6_packet(other, IPPROTO_FRAGMENT, &frag, 53);
        assert!(matches!(
            classify_packet(&p[..44], &set[..]),
            PacketClass::Blocked(_, Reason::Unparseable)
        ));
        // AH with payload length 0 (8 bytes, less than its 12-byte fixed part).
        let ah = [IPPROTO_TCP, 0, 0, 0, 0, 0, 0, 1];
        let p = v6_packet(other, IPPROTO_AH, &ah, 80);
        assert!(matches!(
            classify_packet(&p[..], &set[..]),
            PacketClass::Blocked(_, Reason::Unparseable)
        ));
        // Exactly MAX_EXT_HEADERS headers, then TCP: walked, port found; one more: refused.
        let chain = |n: usize| {
            let mut ext = [0u8; 8 * (MAX_EXT_HEADERS + 1)];
            for i in 0..n {
                ext[i * 8] = if i + 1 == n {
                    IPPROTO_TCP
                } else {
                    IPPROTO_DSTOPTS
                };
            }
            v6_packet(other, IPPROTO_DSTOPTS, &ext[..8 * n], 443)
        };
        assert!(
            matches!(classify_packet(&chain(MAX_EXT_HEADERS)[..], &set[..]), PacketClass::Pass(a) if a.proto == IPPROTO_TCP && a.dport == 443)
        );
        assert!(matches!(
            classify_packet(&chain(MAX_EXT_HEADERS + 1)[..], &set[..]),
            PacketClass::Blocked(_, Reason::Unparseable)
        ));
    }

    #[test]
    fn short_and_foreign_frames() {
        let set = defaults();
        assert_eq!(classify_packet(&[][..], &set[..]), PacketClass::NotIp);
        assert_eq!(
            classify_packet(&[0x45, 0, 0][..], &set[..]),
            PacketClass::NotIp
        );
        assert_eq!(
            classify_packet(&[0x60; 39][..], &set[..]),
            PacketClass::NotIp
        );
        let arp_like = [0x00u8; 64];
        assert_eq!(classify_packet(&arp_like[..], &set[..]), PacketClass::NotIp);
        // An IPv4 header truncated after the destination still gets judged by it.
        let p = v4_packet(IMDS4, IPPROTO_TCP, &[], 80);
        assert!(
            matches!(classify_packet(&p[..20], &set[..]), PacketClass::Blocked(a, _) if a.dport == 0)
        );
    }

    #[test]
    fn fast_path_agrees_with_full_classifier_on_plain_packets() {
        let set = defaults();
        let (v4m, v6m) = prefilter(set.iter());
        let tun = TunnelConfig::defaults();
        let fast = |p: &[u8]| fast_path_pass(FastHeader::of(p), &v4m, &v6m, &tun);
        for first in [0u8, 1, 10, 127, 168, 169, 170, 255] {
            let p = v4_packet([first, 254, 169, 254], IPPROTO_TCP, &[], 80);
            if fast(&p) {
                assert!(matches!(
                    classify_packet(&p[..], &set[..]),
                    PacketClass::Pass(_)
                ));
            }
        }
        let p = v4_packet(IMDS4, IPPROTO_TCP, &[], 80);
        assert!(!fast(&p));
        let p = v6_packet(IMDS6, IPPROTO_TCP, &[], 80);
        assert!(!fast(&p));
        let mut global = IMDS6;
        global[0] = 0x20;
        let p = v6_packet(global, IPPROTO_TCP, &[], 80);
        assert!(fast(&p));
        let p = v6_packet(global, IPPROTO_ROUTING, &[], 80);
        assert!(!fast(&p));
        // Plain UDP stays on the fast path; UDP to a tunnel port and IP-in-IP leave it.
        let p = v4_packet([192, 0, 2, 1], IPPROTO_UDP, &[], 53);
        assert!(fast(&p));
        let p = v4_packet([192, 0, 2, 1], IPPROTO_UDP, &[], 4789);
        assert!(!fast(&p));
        let p = v6_packet(global, IPPROTO_UDP, &[], 6081);
        assert!(!fast(&p));
        for proto in [4u8, 41, 47] {
            let p = v4_packet([192, 0, 2, 1], proto, &[], 0);
            assert!(!fast(&p));
            let p = v6_packet(global, proto, &[], 0);
            assert!(!fast(&p));
        }
    }
}
