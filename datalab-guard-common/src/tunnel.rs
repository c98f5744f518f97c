//! Encapsulations: finding the inner packet of a tunnel packet and judging it.
//!
//! A guarded process needs no privilege to send a VXLAN packet with a plain UDP socket; a
//! VXLAN, Geneve or Teredo endpoint that decapsulates it (overlay CNIs run one on every
//! node) delivers the inner packet, so the inner destination must be judged like the outer
//! one. Recognised, one level deep:
//! - UDP to the configured ports ([`TunnelConfig`]): VXLAN (8-byte header, Ethernet),
//!   Geneve (header + options, then Ethernet or IP), Teredo (optional authentication and
//!   origin indicators, then IPv6);
//! - IP protocols 4 (IPIP), 41 (IPv6 in IP) and 47 (GRE: optional checksum, key and
//!   sequence fields; IPv4, IPv6, or transparent Ethernet bridging then Ethernet).
//!
//! What is judged blocked, and why:
//! - the inner destination is blocked ([`Reason::Tunnel`], the attempt names the inner
//!   packet);
//! - the inner packet is one the egress classifier would have to walk (IPv4 options, IPv6
//!   extension headers) or is itself an encapsulation ([`Reason::Tunnel`] too): a second
//!   walk would double the kernel program's verified size, a second level would let the
//!   far end's decapsulated packet reach yet another endpoint, and no workload needs either
//!   inside a tunnel — refusing them is what keeps "one level, bounded" sound;
//! - any encapsulation at all while [`TunnelConfig::deny_all`] is set
//!   ([`Reason::TunnelDenied`], the attempt names the outer packet).
//!
//! What passes: an encapsulation cut short before a whole inner IP header (for VXLAN a
//! datagram shorter than its 8-byte header and an Ethernet header), or one carrying
//! something other than IP (ARP in VXLAN, MPLS in GRE). The far end cannot turn those into
//! an IP packet either, just as the classifier passes a plain packet too short to be IP.
//! A complete inner header is judged even when the rest of the inner packet is missing.

use crate::{
    classify::{
        read_dport, v4_blocked, v6_blocked, Attempt, BlockedSet, PacketBytes, PacketClass, Reason,
        IPPROTO_AH, IPPROTO_DSTOPTS, IPPROTO_FRAGMENT, IPPROTO_HOPOPTS, IPPROTO_ROUTING,
        IPPROTO_UDP,
    },
    TunnelConfig, UdpTunnel, MAX_TUNNEL_PORTS,
};

pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_IPV6: u8 = 41;
pub const IPPROTO_GRE: u8 = 47;

/// IANA ports of the UDP encapsulations, the defaults of [`TunnelConfig::defaults`].
pub const VXLAN_PORT: u16 = 4789;
/// The Linux kernel's own VXLAN default, used by flannel and Cilium.
pub const VXLAN_LINUX_PORT: u16 = 8472;
pub const GENEVE_PORT: u16 = 6081;
pub const TEREDO_PORT: u16 = 3544;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Transparent Ethernet bridging: an Ethernet frame follows (GRE, Geneve).
const ETH_P_TEB: u16 = 0x6558;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags skipped in an inner Ethernet frame (QinQ is two).
const MAX_VLAN_TAGS: usize = 2;

const VXLAN_HEADER: usize = 8;
const GENEVE_HEADER: usize = 8;
const UDP_HEADER: usize = 8;
const ETH_HEADER: usize = 14;
/// GRE flag bits in the first byte: checksum, key and sequence present (4 bytes each).
const GRE_CSUM: u8 = 0x80;
const GRE_KEY: u8 = 0x20;
const GRE_SEQ: u8 = 0x10;
/// Teredo indicators (RFC 4380 §5.1.1): authentication, then origin indication.
const TEREDO_AUTH_FIXED: usize = 13;
const TEREDO_ORIGIN: usize = 8;

/// Offsets below are plain `usize` with this value for "none", not `Option<usize>`: the
/// payload of a `None` is undefined, LLVM copies it between registers anyway, and the
/// verifier refuses to read a register nothing wrote. No inner packet starts at offset 0.
const NO_INNER: usize = 0;

/// Whether a packet's IP protocol or UDP port makes it an encapsulation, and where its
/// inner packet begins.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Encapsulation {
    /// Not an encapsulation.
    None,
    /// An encapsulation, with the offset of an inner packet that may be IP, or
    /// [`NO_INNER`] when it is cut short or carries something else.
    Inner(usize),
}

impl TunnelConfig {
    pub const fn zeroed() -> TunnelConfig {
        TunnelConfig {
            port_low_byte: [0; 8],
            udp_ports: [0; MAX_TUNNEL_PORTS],
            udp_kinds: [0; MAX_TUNNEL_PORTS],
            deny_all: 0,
        }
    }

    /// VXLAN on 4789 and 8472, Geneve on 6081, Teredo on 3544; tunnels not denied.
    pub fn defaults() -> TunnelConfig {
        let mut cfg = TunnelConfig::zeroed();
        for (port, kind) in [
            (VXLAN_PORT, UdpTunnel::Vxlan),
            (VXLAN_LINUX_PORT, UdpTunnel::Vxlan),
            (GENEVE_PORT, UdpTunnel::Geneve),
            (TEREDO_PORT, UdpTunnel::Teredo),
        ] {
            cfg.add_port(port, kind);
        }
        cfg
    }

    /// Adds a tunnel port; `false` when the port is 0 or every slot is taken (a port
    /// already present keeps its first kind).
    pub fn add_port(&mut self, port: u16, kind: UdpTunnel) -> bool {
        if port == 0 {
            return false;
        }
        if self.udp_ports.contains(&port) {
            return true;
        }
        let Some(slot) = self.udp_ports.iter().position(|p| *p == 0) else {
            return false;
        };
        self.udp_ports[slot] = port;
        self.udp_kinds[slot] = kind as u8;
        let low = (port & 0xff) as usize;
        self.port_low_byte[low / 32] |= 1 << (low % 32);
        true
    }

    /// The fast path's test: `false` proves `port` is no tunnel port.
    #[inline(always)]
    pub fn port_may_be_tunnel(&self, port: u16) -> bool {
        let low = (port & 0xff) as usize;
        self.port_low_byte[low / 32] & (1 << (low % 32)) != 0
    }

    /// The encapsulation configured on UDP `port`.
    #[inline(always)]
    pub fn udp_kind(&self, port: u16) -> Option<UdpTunnel> {
        if port == 0 {
            return None;
        }
        for slot in 0..MAX_TUNNEL_PORTS {
            if self.udp_ports[slot] == port {
                return UdpTunnel::from_raw(self.udp_kinds[slot]);
            }
        }
        None
    }
}

/// Could a packet with this IP protocol (IPv6: first next header) and destination port be
/// an encapsulation? `false` proves it is not; the fast path's tunnel test.
#[inline(always)]
pub fn may_be_encapsulation(cfg: &TunnelConfig, proto: u8, dport: u16) -> bool {
    proto == IPPROTO_IPIP
        || proto == IPPROTO_IPV6
        || proto == IPPROTO_GRE
        || (proto == IPPROTO_UDP && cfg.port_may_be_tunnel(dport))
}

/// Judges the payload of an outer packet that passed on its own: `outer.proto` is its
/// upper-layer protocol at offset `l4` (0 for a later fragment, which carries no header).
#[inline(always)]
pub fn judge_payload<P: PacketBytes + ?Sized, S: BlockedSet + ?Sized>(
    pkt: &P,
    set: &S,
    cfg: &TunnelConfig,
    outer: Attempt,
    l4: usize,
) -> PacketClass {
    if l4 == 0 {
        return PacketClass::Pass(outer);
    }
    let inner = match locate_inner(pkt, cfg, outer.proto, outer.dport, l4) {
        Encapsulation::None => return PacketClass::Pass(outer),
        Encapsulation::Inner(inner) => inner,
    };
    if cfg.deny_all != 0 {
        return PacketClass::Blocked(outer, Reason::TunnelDenied);
    }
    if inner == NO_INNER {
        return PacketClass::Pass(outer);
    }
    let (refused, attempt) = judge_inner(pkt, set, cfg, inner);
    if refused {
        PacketClass::Blocked(attempt, Reason::Tunnel)
    } else {
        PacketClass::Pass(outer)
    }
}

#[inline(always)]
fn locate_inner<P: PacketBytes + ?Sized>(
    pkt: &P,
    cfg: &TunnelConfig,
    proto: u8,
    dport: u16,
    l4: usize,
) -> Encapsulation {
    match proto {
        IPPROTO_IPIP | IPPROTO_IPV6 => Encapsulation::Inner(l4),
        IPPROTO_GRE => Encapsulation::Inner(gre_inner(pkt, l4)),
        IPPROTO_UDP => {
            let payload = l4 + UDP_HEADER;
            match cfg.udp_kind(dport) {
                None => Encapsulation::None,
                // The VXLAN flags are not checked: a receiver that ignores them (or a
                // VXLAN-GBP one) still decapsulates.
                Some(UdpTunnel::Vxlan) => {
                    Encapsulation::Inner(ethernet_inner(pkt, payload + VXLAN_HEADER))
                }
                Some(UdpTunnel::Geneve) => Encapsulation::Inner(geneve_inner(pkt, payload)),
                Some(UdpTunnel::Teredo) => Encapsulation::Inner(teredo_inner(pkt, payload)),
            }
        }
        _ => Encapsulation::None,
    }
}

/// GRE (RFC 2784/2890): 4 bytes, plus 4 for each of checksum, key and sequence number.
/// Version and routing bits are not checked: a receiver that rejects them delivers
/// nothing, one that does not must not be handed an unjudged inner packet.
#[inline(always)]
fn gre_inner<P: PacketBytes + ?Sized>(pkt: &P, off: usize) -> usize {
    let Some(h) = pkt.read::<4>(off) else {
        return NO_INNER;
    };
    let mut len = 4;
    for bit in [GRE_CSUM, GRE_KEY, GRE_SEQ] {
        if h[0] & bit != 0 {
            len += 4;
        }
    }
    by_ethertype(pkt, u16::from_be_bytes([h[2], h[3]]), off + len)
}

/// Geneve (RFC 8926): 8 bytes plus `opt_len` 4-byte words of options.
#[inline(always)]
fn geneve_inner<P: PacketBytes + ?Sized>(pkt: &P, off: usize) -> usize {
    let Some(h) = pkt.read::<4>(off) else {
        return NO_INNER;
    };
    let options = ((h[0] & 0x3f) as usize) * 4;
    by_ethertype(
        pkt,
        u16::from_be_bytes([h[2], h[3]]),
        off + GENEVE_HEADER + options,
    )
}

/// Teredo (RFC 4380): an authentication indicator (0x0001, ID and value lengths, nonce,
/// confirmation), then an origin indication (0x0000, 8 bytes), each optional, then IPv6.
#[inline(always)]
fn teredo_inner<P: PacketBytes + ?Sized>(pkt: &P, off: usize) -> usize {
    let mut at = off;
    let Some(h) = pkt.read::<4>(at) else {
        return NO_INNER;
    };
    if h[0] == 0 && h[1] == 1 {
        at += TEREDO_AUTH_FIXED + h[2] as usize + h[3] as usize;
    }
    let Some(h) = pkt.read::<2>(at) else {
        return NO_INNER;
    };
    if h[0] == 0 && h[1] == 0 {
        at += TEREDO_ORIGIN;
    }
    at
}

/// The inner packet after an encapsulation's protocol field: IP at once, or an Ethernet
/// frame first.
#[inline(always)]
fn by_ethertype<P: PacketBytes + ?Sized>(pkt: &P, ethertype: u16, off: usize) -> usize {
    match ethertype {
        ETH_P_IP | ETH_P_IPV6 => off,
        ETH_P_TEB => ethernet_inner(pkt, off),
        _ => NO_INNER,
    }
}

/// The IP packet in an Ethernet frame at `off`, behind up to [`MAX_VLAN_TAGS`] tags.
#[inline(always)]
fn ethernet_inner<P: PacketBytes + ?Sized>(pkt: &P, off: usize) -> usize {
    let mut type_at = off + ETH_HEADER - 2;
    for _ in 0..=MAX_VLAN_TAGS {
        let Some(t) = pkt.read::<2>(type_at) else {
            return NO_INNER;
        };
        match u16::from_be_bytes(t) {
            ETH_P_IP | ETH_P_IPV6 => return type_at + 2,
            ETH_P_8021Q | ETH_P_8021AD => type_at += 4,
            _ => return NO_INNER,
        }
    }
    NO_INNER
}

/// The inner packet at `off`: `(true, attempt)` when it must be refused (see the module
/// documentation); `false` when it passes or is not a whole IP header.
#[inline(always)]
fn judge_inner<P: PacketBytes + ?Sized, S: BlockedSet + ?Sized>(
    pkt: &P,
    set: &S,
    cfg: &TunnelConfig,
    off: usize,
) -> (bool, Attempt) {
    let mut attempt = Attempt {
        ipv6: false,
        proto: 0,
        dst: [0; 16],
        dport: 0,
    };
    let Some(first) = pkt.read::<1>(off) else {
        return (false, attempt);
    };
    let first = first[0];
    if first >> 4 == 4 {
        let Some(h) = pkt.read::<20>(off) else {
            return (false, attempt);
        };
        attempt.proto = h[9];
        let dst = [h[16], h[17], h[18], h[19]];
        attempt.dst[..4].copy_from_slice(&dst);
        let later_fragment = u16::from_be_bytes([h[6], h[7]]) & 0x1fff != 0;
        let options = first & 0x0f != 5;
        if !options && !later_fragment {
            attempt.dport = read_dport(pkt, off + 20, attempt.proto);
        }
        let refused =
            v4_blocked(set, dst) || options || is_nested(cfg, attempt.proto, attempt.dport);
        return (refused, attempt);
    }
    if first >> 4 == 6 {
        let Some(h) = pkt.read::<40>(off) else {
            return (false, attempt);
        };
        attempt.ipv6 = true;
        attempt.dst.copy_from_slice(&h[24..40]);
        attempt.proto = h[6];
        attempt.dport = read_dport(pkt, off + 40, attempt.proto);
        let extensions = matches!(
            attempt.proto,
            IPPROTO_HOPOPTS | IPPROTO_ROUTING | IPPROTO_FRAGMENT | IPPROTO_DSTOPTS | IPPROTO_AH
        );
        let refused = v6_blocked(set, attempt.dst)
            || extensions
            || is_nested(cfg, attempt.proto, attempt.dport);
        return (refused, attempt);
    }
    (false, attempt)
}

/// Is an inner packet itself an encapsulation (a second level, which is not parsed)?
#[inline(always)]
fn is_nested(cfg: &TunnelConfig, proto: u8, dport: u16) -> bool {
    proto == IPPROTO_IPIP
        || proto == IPPROTO_IPV6
        || proto == IPPROTO_GRE
        || (proto == IPPROTO_UDP && cfg.udp_kind(dport).is_some())
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;
    use crate::{
        cidr::Cidr,
        classify::{classify_packet, classify_packet_with, IPPROTO_TCP},
    };

    const IMDS4: [u8; 4] = [169, 254, 169, 254];
    const IMDS6: [u8; 16] = [
        0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
    ];
    const VTEP4: [u8; 4] = [10, 0, 0, 2];
    const OTHER4: [u8; 4] = [192, 0, 2, 1];
    const VTEP6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

    fn set() -> [Cidr; 2] {
        [Cidr::v4(IMDS4, 32).unwrap(), Cidr::v6(IMDS6, 128).unwrap()]
    }

    fn ipv4(proto: u8, dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[9] = proto;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    fn ipv6(next: u8, dst: [u8; 16], payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[6] = next;
        p[24..40].copy_from_slice(&dst);
        p.extend_from_slice(payload);
        p
    }

    fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut u = vec![0u8; 8];
        u[0..2].copy_from_slice(&40000u16.to_be_bytes());
        u[2..4].copy_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(payload);
        u
    }

    fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut e = vec![0u8; 12];
        e.extend_from_slice(&ethertype.to_be_bytes());
        e.extend_from_slice(payload);
        e
    }

    fn vxlan(frame: &[u8]) -> Vec<u8> {
        let mut v = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
        v.extend_from_slice(frame);
        v
    }

    fn inner_tcp4(dst: [u8; 4]) -> Vec<u8> {
        ipv4(IPPROTO_TCP, dst, &udp(80, &[]))
    }

    fn inner_udp6(dst: [u8; 16]) -> Vec<u8> {
        ipv6(IPPROTO_UDP, dst, &udp(53, &[]))
    }

    fn judge(p: &[u8]) -> PacketClass {
        classify_packet(p, &set()[..])
    }

    fn tunnel_blocked(class: PacketClass, dst: &[u8]) -> bool {
        matches!(class, PacketClass::Blocked(a, Reason::Tunnel) if a.dst[..dst.len()] == *dst)
    }

    #[test]
    fn vxlan_is_judged_by_its_inner_destination() {
        for port in [VXLAN_PORT, VXLAN_LINUX_PORT] {
            let p = ipv4(
                IPPROTO_UDP,
                VTEP4,
                &udp(port, &vxlan(&ethernet(ETH_P_IP, &inner_tcp4(IMDS4)))),
            );
            let class = judge(&p);
            assert!(tunnel_blocked(class, &IMDS4), "{class:?}");
            assert!(
                matches!(class, PacketClass::Blocked(a, _) if !a.ipv6 && a.dport == 80 && a.proto == IPPROTO_TCP)
            );
            let p = ipv4(
                IPPROTO_UDP,
                VTEP4,
                &udp(port, &vxlan(&ethernet(ETH_P_IP, &inner_tcp4(OTHER4)))),
            );
            assert!(
                matches!(judge(&p), PacketClass::Pass(a) if a.dport == port && a.dst[..4] == VTEP4)
            );
        }
        // Inner IPv6 behind a QinQ pair of VLAN tags, outer IPv6.
        let mut tagged = vec![0u8; 12];
        tagged.extend_from_slice(&[0x88, 0xa8, 0, 1, 0x81, 0x00, 0, 2, 0x86, 0xdd]);
        tagged.extend_from_slice(&inner_udp6(IMDS6));
        let p = ipv6(IPPROTO_UDP, VTEP6, &udp(VXLAN_PORT, &vxlan(&tagged)));
        assert!(tunnel_blocked(judge(&p), &IMDS6));
        // Not a tunnel port: the payload is not looked at.
        let p = ipv4(
            IPPROTO_UDP,
            VTEP4,
            &udp(4790, &vxlan(&ethernet(ETH_P_IP, &inner_tcp4(IMDS4)))),
        );
        assert!(matches!(judge(&p), PacketClass::Pass(_)));
    }

    #[test]
    fn configured_ports_replace_the_defaults() {
        let mut cfg = TunnelConfig::zeroed();
        assert!(cfg.add_port(9999, UdpTunnel::Vxlan));
        let inner = vxlan(&ethernet(ETH_P_IP, &inner_tcp4(IMDS4)));
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(9999, &inner));
        assert!(tunnel_blocked(
            classify_packet_with(&p[..], &set()[..], &cfg),
            &IMDS4
        ));
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(VXLAN_PORT, &inner));
        assert!(matches!(
            classify_packet_with(&p[..], &set()[..], &cfg),
            PacketClass::Pass(_)
        ));
        assert!(!cfg.add_port(0, UdpTunnel::Vxlan));
        for port in 1..=7 {
            assert!(cfg.add_port(port, UdpTunnel::Geneve));
        }
        assert!(
            !cfg.add_port(8, UdpTunnel::Geneve),
            "the ninth port has no slot"
        );
        assert!(cfg.port_may_be_tunnel(9999) && !cfg.port_may_be_tunnel(53));
    }

    #[test]
    fn geneve_with_options_and_each_protocol() {
        let mut header = vec![2u8, 0, 0x65, 0x58, 0, 0, 42, 0]; // 2 words of options
        header.extend_from_slice(&[0xaa; 8]);
        header.extend_from_slice(&ethernet(ETH_P_IP, &inner_tcp4(IMDS4)));
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(GENEVE_PORT, &header));
        assert!(tunnel_blocked(judge(&p), &IMDS4));
        let mut header = vec![0u8, 0, 0x86, 0xdd, 0, 0, 42, 0];
        header.extend_from_slice(&inner_udp6(IMDS6));
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(GENEVE_PORT, &header));
        assert!(tunnel_blocked(judge(&p), &IMDS6));
        // An unknown protocol type cannot be decapsulated into IP: pass.
        let mut header = vec![0u8, 0, 0x88, 0x47, 0, 0, 42, 0];
        header.extend_from_slice(&inner_tcp4(IMDS4));
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(GENEVE_PORT, &header));
        assert!(matches!(judge(&p), PacketClass::Pass(_)));
    }

    #[test]
    fn teredo_with_and_without_indicators() {
        let inner = inner_udp6(IMDS6);
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(TEREDO_PORT, &inner));
        assert!(tunnel_blocked(judge(&p), &IMDS6));
        let mut origin = vec![0u8, 0, 0x12, 0x34, 1, 2, 3, 4];
        origin.extend_from_slice(&inner);
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(TEREDO_PORT, &origin));
        assert!(tunnel_blocked(judge(&p), &IMDS6));
        // Authentication (ID length 2, value length 3) then origin indication.
        let mut auth = vec![0u8, 1, 2, 3, 7, 7, 8, 8, 8];
        auth.extend_from_slice(&[0u8; 9]); // nonce and confirmation
        auth.extend_from_slice(&origin);
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(TEREDO_PORT, &auth));
        assert!(tunnel_blocked(judge(&p), &IMDS6));
        // An IPv4-mapped inner destination is the IPv4 one.
        let mut mapped = [0u8; 16];
        mapped[10] = 0xff;
        mapped[11] = 0xff;
        mapped[12..].copy_from_slice(&IMDS4);
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(TEREDO_PORT, &inner_udp6(mapped)));
        assert!(tunnel_blocked(judge(&p), &mapped));
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(TEREDO_PORT, &inner_udp6(VTEP6)));
        assert!(matches!(judge(&p), PacketClass::Pass(_)));
    }

    #[test]
    fn ip_in_ip_and_gre() {
        let p = ipv4(IPPROTO_IPIP, VTEP4, &inner_tcp4(IMDS4));
        assert!(tunnel_blocked(judge(&p), &IMDS4));
        let p = ipv4(IPPROTO_IPV6, VTEP4, &inner_udp6(IMDS6));
        assert!(tunnel_blocked(judge(&p), &IMDS6));
        let p = ipv6(IPPROTO_IPIP, VTEP6, &inner_tcp4(IMDS4));
        assert!(tunnel_blocked(judge(&p), &IMDS4));
        let p = ipv6(IPPROTO_IPV6, VTEP6, &inner_udp6(IMDS6));
        assert!(tunnel_blocked(judge(&p), &IMDS6));
        // GRE with checksum, key and sequence number, IPv4 inside.
        let mut gre = vec![0xb0u8, 0, 0x08, 0x00];
        gre.extend_from_slice(&[0u8; 12]);
        gre.extend_from_slice(&inner_tcp4(IMDS4));
        let p = ipv4(IPPROTO_GRE, VTEP4, &gre);
        assert!(tunnel_blocked(judge(&p), &IMDS4));
        // GRE key only, transparent Ethernet bridging, IPv6 inside; outer IPv6.
        let mut gre = vec![0x20u8, 0, 0x65, 0x58, 0, 0, 0, 9];
        gre.extend_from_slice(&ethernet(ETH_P_IPV6, &inner_udp6(IMDS6)));
        let p = ipv6(IPPROTO_GRE, VTEP6, &gre);
        assert!(tunnel_blocked(judge(&p), &IMDS6));
        // GRE carrying MPLS: not decapsulated into IP here, pass.
        let mut gre = vec![0u8, 0, 0x88, 0x47];
        gre.extend_from_slice(&inner_tcp4(IMDS4));
        let p = ipv4(IPPROTO_GRE, VTEP4, &gre);
        assert!(matches!(judge(&p), PacketClass::Pass(_)));
        let p = ipv4(IPPROTO_IPIP, VTEP4, &inner_tcp4(OTHER4));
        assert!(matches!(judge(&p), PacketClass::Pass(a) if a.dst[..4] == VTEP4));
    }

    #[test]
    fn truncated_encapsulations_pass_but_a_whole_inner_header_is_judged() {
        let whole = ipv4(
            IPPROTO_UDP,
            VTEP4,
            &udp(VXLAN_PORT, &vxlan(&ethernet(ETH_P_IP, &inner_tcp4(IMDS4)))),
        );
        // Cut inside the VXLAN header, the Ethernet header, the inner IP header: the far end
        // cannot decapsulate an IP packet from any of these.
        for cut in [28 + 4, 28 + 8 + 10, 28 + 8 + 14 + 19] {
            assert!(
                matches!(judge(&whole[..cut]), PacketClass::Pass(_)),
                "cut at {cut}"
            );
        }
        // The whole inner IP header and nothing after it: judged.
        assert!(tunnel_blocked(judge(&whole[..28 + 8 + 14 + 20]), &IMDS4));
        // IPIP cut inside the inner header passes; GRE cut inside its optional fields too.
        let p = ipv4(IPPROTO_IPIP, VTEP4, &inner_tcp4(IMDS4));
        assert!(matches!(judge(&p[..20 + 12]), PacketClass::Pass(_)));
        let mut gre = vec![0xb0u8, 0, 0x08, 0x00];
        gre.extend_from_slice(&[0u8; 12]);
        gre.extend_from_slice(&inner_tcp4(IMDS4));
        let p = ipv4(IPPROTO_GRE, VTEP4, &gre);
        assert!(matches!(judge(&p[..20 + 10]), PacketClass::Pass(_)));
    }

    #[test]
    fn inner_packets_that_need_a_walk_or_nest_are_refused() {
        // Inner IPv4 with options (IHL 6) to an unblocked destination.
        let mut inner = inner_tcp4(OTHER4);
        inner[0] = 0x46;
        inner.splice(20..20, [1u8, 1, 1, 0]);
        let p = ipv4(IPPROTO_IPIP, VTEP4, &inner);
        assert!(tunnel_blocked(judge(&p), &OTHER4));
        // Inner IPv6 with a hop-by-hop header.
        let p = ipv4(
            IPPROTO_IPV6,
            VTEP4,
            &ipv6(IPPROTO_HOPOPTS, VTEP6, &[IPPROTO_UDP, 0, 0, 0, 0, 0, 0, 0]),
        );
        assert!(tunnel_blocked(judge(&p), &VTEP6));
        // VXLAN in VXLAN, and IPIP in GRE: a second level is refused.
        let nested = ipv4(
            IPPROTO_UDP,
            OTHER4,
            &udp(VXLAN_PORT, &vxlan(&ethernet(ETH_P_IP, &inner_tcp4(IMDS4)))),
        );
        let p = ipv4(
            IPPROTO_UDP,
            VTEP4,
            &udp(VXLAN_PORT, &vxlan(&ethernet(ETH_P_IP, &nested))),
        );
        assert!(tunnel_blocked(judge(&p), &OTHER4));
        let mut gre = vec![0u8, 0, 0x08, 0x00];
        gre.extend_from_slice(&ipv4(IPPROTO_IPIP, OTHER4, &inner_tcp4(IMDS4)));
        let p = ipv4(IPPROTO_GRE, VTEP4, &gre);
        assert!(tunnel_blocked(judge(&p), &OTHER4));
    }

    #[test]
    fn deny_all_refuses_every_encapsulation_by_its_outer_packet() {
        let cfg = TunnelConfig {
            deny_all: 1,
            ..TunnelConfig::defaults()
        };
        let denied = |p: &[u8]| {
            matches!(classify_packet_with(p, &set()[..], &cfg),
                PacketClass::Blocked(a, Reason::TunnelDenied) if a.dst[..4] == VTEP4)
        };
        assert!(denied(&ipv4(
            IPPROTO_UDP,
            VTEP4,
            &udp(VXLAN_PORT, &vxlan(&ethernet(ETH_P_IP, &inner_tcp4(OTHER4))))
        )));
        assert!(denied(&ipv4(IPPROTO_UDP, VTEP4, &udp(TEREDO_PORT, &[]))));
        assert!(denied(&ipv4(IPPROTO_GRE, VTEP4, &[])));
        assert!(denied(&ipv4(IPPROTO_IPIP, VTEP4, &inner_tcp4(OTHER4))));
        let p = ipv4(IPPROTO_UDP, VTEP4, &udp(53, &[]));
        assert!(matches!(
            classify_packet_with(&p[..], &set()[..], &cfg),
            PacketClass::Pass(_)
        ));
        // A blocked outer destination keeps its own reason.
        let p = ipv4(IPPROTO_IPIP, IMDS4, &inner_tcp4(OTHER4));
        assert!(matches!(
            classify_packet_with(&p[..], &set()[..], &cfg),
            PacketClass::Blocked(_, Reason::Destination)
        ));
    }

    #[test]
    fn later_fragments_carry_no_encapsulation_header() {
        let mut p = ipv4(IPPROTO_IPIP, VTEP4, &inner_tcp4(IMDS4));
        p[6] = 0x00;
        p[7] = 0x10; // offset 16 * 8 bytes
        assert!(matches!(judge(&p), PacketClass::Pass(_)));
        let mut frag = vec![IPPROTO_IPIP, 0, 0, 0x80, 0, 0, 0, 1]; // offset 16
        frag.extend_from_slice(&inner_tcp4(IMDS4));
        let p = ipv6(IPPROTO_FRAGMENT, VTEP6, &frag);
        assert!(matches!(judge(&p), PacketClass::Pass(_)));
        // The first fragment is judged.
        frag[3] = 0x01; // offset 0, more fragments
        let p = ipv6(IPPROTO_FRAGMENT, VTEP6, &frag);
        assert!(tunnel_blocked(judge(&p), &IMDS4));
    }
}
