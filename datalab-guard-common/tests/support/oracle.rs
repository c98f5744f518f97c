//! A reference judge for the destination classifier, written from the classifier's
//! documented rules and NOT from its code: header fields are decoded by `etherparse` (an
//! independent, widely used packet crate), addresses and prefixes by `std::net`, and the
//! policy below is the one the module documentation of `classify` states:
//!
//! - Not IPv4 or IPv6, or shorter than the fixed header (20/40 bytes): not IP, nothing to judge.
//! - The destination (for IPv6 also the IPv4 address embedded in `::ffff:0:0/96` or
//!   `64:ff9b::/96`) in the blocked set: blocked, reason destination.
//! - IPv4: an IHL below 5 is unparseable. The options are walked: EOL ends them, NOP is one
//!   byte, LSRR (0x83) or SSRR (0x89) is a source route, every other option has a length
//!   byte of at least 2 that must stay inside the header; an option byte past the end of the
//!   packet is unparseable.
//! - IPv6: the extension headers hop-by-hop, destination options, routing, fragment and AH
//!   are walked (at most [`MAX_EXT_HEADERS`]); a routing header with segments left is a
//!   source route; a header that does not fit in the packet, or a chain longer than the
//!   bound, is unparseable; a fragment header with a non-zero offset ends the walk (the
//!   headers were judged with the first fragment).
//!
//! - Encapsulations (the module documentation of `tunnel`), with the default tunnel ports
//!   (VXLAN 4789 and 8472, Geneve 6081, Teredo 3544), for a packet that passed the rules
//!   above and whose upper layer is visible (not a later fragment): IP protocols 4 and 41
//!   carry an IP packet at once; GRE (47) has 4 bytes plus 4 for each of its checksum, key
//!   and sequence flags, then IPv4/IPv6 (0x0800/0x86DD) or Ethernet (0x6558); VXLAN has an
//!   8-byte header then Ethernet; Geneve 8 bytes plus its options then Ethernet or IP;
//!   Teredo an optional authentication indicator (0x0001, 13 bytes plus the ID and value
//!   lengths), an optional origin indication (0x0000, 8 bytes), then the packet. Ethernet:
//!   up to two VLAN tags (0x8100, 0x88A8), then IPv4 or IPv6; anything else carries no IP.
//!   The inner packet (a whole fixed header of its version, else it passes) is refused,
//!   reason tunnel, reporting the inner destination, protocol and port, when its
//!   destination is blocked, when it is IPv4 with options (IHL not 5) or IPv6 whose next
//!   header is an extension header, or when it is itself an encapsulation (protocol 4, 41,
//!   47, or UDP to a tunnel port).
//!
//! The oracle also says which L4 protocol and destination port an audit record reports
//! when the walk reached the upper layer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    Ethernet2HeaderSlice, IpAuthHeaderSlice, Ipv4Header, Ipv6FragmentHeaderSlice, Ipv6Header,
    Ipv6RawExtHeaderSlice, SingleVlanHeaderSlice,
};

/// Extension headers the classifier promises to walk before it gives up (fail closed).
pub const MAX_EXT_HEADERS: usize = 8;

const HOPOPTS: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AH: u8 = 51;
const DSTOPTS: u8 = 60;

/// Why the oracle blocks a packet (mirrors the audit `reason`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Why {
    Destination,
    SourceRoute,
    Unparseable,
    /// The inner packet of an encapsulation is refused.
    Tunnel,
}

/// The oracle's judgement of one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judgement {
    NotIp,
    Pass,
    Blocked(Why),
}

/// The judgement plus what the audit record would report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    pub judgement: Judgement,
    /// The destination field (IPv4 in the first 4 bytes), when the packet is IP.
    pub dst: [u8; 16],
    /// (L4 protocol, destination port) when the header walk reached the upper layer.
    pub l4: Option<(u8, u16)>,
}

/// A blocked network as `std::net` sees it.
#[derive(Clone, Copy, Debug)]
pub struct Net {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Net {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

fn blocked(set: &[Net], ip: IpAddr) -> bool {
    set.iter().any(|n| n.contains(ip))
}

/// The IPv4 address a socket or a NAT64 translator would turn this IPv6 address into.
fn embedded(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = ip.segments();
    // RFC 6052 well-known prefix 64:ff9b::/96.
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let o = ip.octets();
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    None
}

/// Bytes 2..4 of a TCP, UDP, UDP-Lite or SCTP header; 0 for other protocols or when absent.
fn dport(rest: &[u8], proto: u8) -> u16 {
    match proto {
        6 | 17 | 136 | 132 => rest
            .get(2..4)
            .map_or(0, |p| u16::from_be_bytes([p[0], p[1]])),
        _ => 0,
    }
}

/// Judges `pkt` against `set`.
pub fn judge(pkt: &[u8], set: &[Net]) -> Expected {
    let not_ip = Expected {
        judgement: Judgement::NotIp,
        dst: [0; 16],
        l4: None,
    };
    match pkt.first().map(|b| b >> 4) {
        Some(4) if pkt.len() >= 20 => judge_v4(pkt, set),
        Some(6) if pkt.len() >= 40 => judge_v6(pkt, set),
        _ => not_ip,
    }
}

fn judge_v4(pkt: &[u8], set: &[Net]) -> Expected {
    // etherparse decodes the fixed 20 bytes; the IHL it would object to is read on its own
    // (a malformed IHL is one of the cases judged).
    let ihl = usize::from(pkt[0] & 0x0f);
    let mut fixed = [0u8; 20];
    fixed.copy_from_slice(&pkt[..20]);
    fixed[0] = 0x45;
    let (hdr, _) = Ipv4Header::from_slice(&fixed).expect("20 bytes with IHL 5 always decode");
    let dst = Ipv4Addr::from(hdr.destination);
    let mut dst16 = [0u8; 16];
    dst16[..4].copy_from_slice(&hdr.destination);
    let proto = hdr.protocol.0;
    let first_fragment = hdr.fragment_offset.value() == 0;
    let header_len = ihl * 4;
    let port = if ihl >= 5 && first_fragment {
        dport(pkt.get(header_len..).unwrap_or(&[]), proto)
    } else {
        0
    };
    let with = |judgement| Expected {
        judgement,
        dst: dst16,
        l4: Some((proto, port)),
    };
    if blocked(set, IpAddr::V4(dst)) {
        return with(Judgement::Blocked(Why::Destination));
    }
    if ihl < 5 {
        return with(Judgement::Blocked(Why::Unparseable));
    }
    if let Err(why) = v4_options(pkt, header_len) {
        return with(Judgement::Blocked(why));
    }
    let upper = if first_fragment {
        pkt.get(header_len..)
    } else {
        None
    };
    tunnels::judge(pkt, proto, upper, set).unwrap_or(with(Judgement::Pass))
}

/// Walks the options between byte 20 and `header_len` (RFC 791 section 3.1).
fn v4_options(pkt: &[u8], header_len: usize) -> Result<(), Why> {
    let mut off = 20;
    while off < header_len {
        let kind = *pkt.get(off).ok_or(Why::Unparseable)?;
        match kind {
            0 => return Ok(()),
            1 => off += 1,
            0x83 | 0x89 => return Err(Why::SourceRoute),
            _ => {
                let len = usize::from(*pkt.get(off + 1).ok_or(Why::Unparseable)?);
                if len < 2 || off + len > header_len {
                    return Err(Why::Unparseable);
                }
                off += len;
            }
        }
    }
    Ok(())
}

fn judge_v6(pkt: &[u8], set: &[Net]) -> Expected {
    let (hdr, _) = Ipv6Header::from_slice(&pkt[..40]).expect("40 bytes of version 6 decode");
    let dst = Ipv6Addr::from(hdr.destination);
    let direct = blocked(set, IpAddr::V6(dst))
        || embedded(dst).is_some_and(|v4| blocked(set, IpAddr::V4(v4)));
    let (walk, l4, upper) = v6_walk(&pkt[40..], hdr.next_header.0);
    let judgement = if direct {
        Judgement::Blocked(Why::Destination)
    } else {
        match walk {
            Ok(()) => {
                let proto = l4.map_or(0, |(proto, _)| proto);
                if let Some(inner) = tunnels::judge(pkt, proto, upper, set) {
                    return inner;
                }
                Judgement::Pass
            }
            Err(why) => Judgement::Blocked(why),
        }
    };
    Expected {
        judgement,
        dst: hdr.destination,
        l4,
    }
}

/// What the IPv6 walk found: its verdict, the upper layer's (protocol, port) when reached,
/// and the upper layer's bytes when they are a header (not a later fragment's payload).
type V6Walk<'a> = (Result<(), Why>, Option<(u8, u16)>, Option<&'a [u8]>);

/// Walks the extension headers (RFC 8200 section 4) in `rest`, the bytes after the fixed
/// header; returns the verdict of the walk and the upper layer when reached.
fn v6_walk(mut rest: &[u8], mut next: u8) -> V6Walk<'_> {
    let mut walked = 0;
    loop {
        if !matches!(next, HOPOPTS | DSTOPTS | ROUTING | AH | FRAGMENT) {
            return (Ok(()), Some((next, dport(rest, next))), Some(rest));
        }
        if walked == MAX_EXT_HEADERS {
            // One extension header more than the bound.
            return (Err(Why::Unparseable), None, None);
        }
        walked += 1;
        match next {
            AH => {
                let Ok(h) = IpAuthHeaderSlice::from_slice(rest) else {
                    return (Err(Why::Unparseable), None, None);
                };
                next = h.next_header().0;
                rest = &rest[h.slice().len()..];
            }
            FRAGMENT => {
                let Ok(h) = Ipv6FragmentHeaderSlice::from_slice(rest) else {
                    return (Err(Why::Unparseable), None, None);
                };
                next = h.next_header().0;
                rest = &rest[h.slice().len()..];
                if h.fragment_offset().value() != 0 {
                    // A later fragment: the rest is payload, its headers went with the first.
                    return (Ok(()), Some((next, 0)), None);
                }
            }
            _ => {
                let Ok(h) = Ipv6RawExtHeaderSlice::from_slice(rest) else {
                    return (Err(Why::Unparseable), None, None);
                };
                // The routing header's payload starts with its type and segments left.
                if next == ROUTING && h.payload()[1] != 0 {
                    return (Err(Why::SourceRoute), None, None);
                }
                next = h.next_header().0;
                rest = &rest[h.slice().len()..];
            }
        }
    }
}

/// Encapsulations, decoded from their RFCs (GRE 2784/2890, VXLAN 7348, Geneve 8926, Teredo
/// 4380) with Ethernet and VLAN headers by etherparse.
mod tunnels {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::{
        blocked, dport, embedded, Ethernet2HeaderSlice, Expected, Judgement, Net,
        SingleVlanHeaderSlice, Why, AH, DSTOPTS, FRAGMENT, HOPOPTS, ROUTING,
    };

    const VXLAN: [u16; 2] = [4789, 8472];
    const GENEVE: u16 = 6081;
    const TEREDO: u16 = 3544;

    fn tunnel_port(port: u16) -> bool {
        VXLAN.contains(&port) || port == GENEVE || port == TEREDO
    }

    fn be16(b: &[u8], at: usize) -> Option<u16> {
        b.get(at..at + 2).map(|p| u16::from_be_bytes([p[0], p[1]]))
    }

    /// `Some(expected)` when `upper` (the bytes after the outer headers, `None` for a later
    /// fragment) carries an inner packet that must be refused; `None`: the outer verdict
    /// (pass) stands.
    pub fn judge(_pkt: &[u8], proto: u8, upper: Option<&[u8]>, set: &[Net]) -> Option<Expected> {
        let upper = upper?;
        let inner = match proto {
            4 | 41 => Some(upper),
            47 => gre(upper),
            17 => {
                let port = be16(upper, 2)?;
                let payload = upper.get(8..).unwrap_or(&[]);
                if VXLAN.contains(&port) {
                    payload.get(8..).and_then(ethernet)
                } else if port == GENEVE {
                    geneve(payload)
                } else if port == TEREDO {
                    teredo(payload)
                } else {
                    None
                }
            }
            _ => None,
        }?;
        refused_inner(inner, set)
    }

    fn gre(b: &[u8]) -> Option<&[u8]> {
        let flags = *b.first()?;
        let len = 4 + [0x80u8, 0x20, 0x10]
            .iter()
            .filter(|f| flags & **f != 0)
            .count()
            * 4;
        by_ethertype(be16(b, 2)?, b.get(len..)?)
    }

    fn geneve(b: &[u8]) -> Option<&[u8]> {
        let opt_len = usize::from(*b.first()? & 0x3f) * 4;
        by_ethertype(be16(b, 2)?, b.get(8 + opt_len..)?)
    }

    fn teredo(b: &[u8]) -> Option<&[u8]> {
        let mut rest = b;
        if rest.len() < 4 {
            return None;
        }
        if rest[0] == 0 && rest[1] == 1 {
            let skip = 13 + usize::from(rest[2]) + usize::from(rest[3]);
            rest = rest.get(skip..)?;
        }
        if rest.get(..2)? == [0, 0] {
            rest = rest.get(8..)?;
        }
        Some(rest)
    }

    fn by_ethertype(ethertype: u16, b: &[u8]) -> Option<&[u8]> {
        match ethertype {
            0x0800 | 0x86dd => Some(b),
            0x6558 => ethernet(b),
            _ => None,
        }
    }

    /// The IP packet in an Ethernet frame, behind at most two VLAN tags.
    fn ethernet(b: &[u8]) -> Option<&[u8]> {
        let eth = Ethernet2HeaderSlice::from_slice(b).ok()?;
        let mut ethertype = eth.ether_type().0;
        let mut rest = &b[eth.slice().len()..];
        for _ in 0..2 {
            if ethertype != 0x8100 && ethertype != 0x88a8 {
                break;
            }
            let vlan = SingleVlanHeaderSlice::from_slice(rest).ok()?;
            ethertype = vlan.ether_type().0;
            rest = &rest[vlan.slice().len()..];
        }
        matches!(ethertype, 0x0800 | 0x86dd).then_some(rest)
    }

    fn nested(proto: u8, port: u16) -> bool {
        matches!(proto, 4 | 41 | 47) || (proto == 17 && tunnel_port(port))
    }

    fn refused_inner(b: &[u8], set: &[Net]) -> Option<Expected> {
        let version = b.first()? >> 4;
        let mut dst16 = [0u8; 16];
        let (proto, port, refused) = if version == 4 && b.len() >= 20 {
            let ihl = b[0] & 0x0f;
            let proto = b[9];
            let dst = Ipv4Addr::new(b[16], b[17], b[18], b[19]);
            dst16[..4].copy_from_slice(&dst.octets());
            let later_fragment = u16::from_be_bytes([b[6], b[7]]) & 0x1fff != 0;
            let port = if ihl == 5 && !later_fragment {
                dport(&b[20..], proto)
            } else {
                0
            };
            let refused = blocked(set, IpAddr::V4(dst)) || ihl != 5 || nested(proto, port);
            (proto, port, refused)
        } else if version == 6 && b.len() >= 40 {
            let next = b[6];
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&b[24..40]);
            let dst = Ipv6Addr::from(octets);
            dst16 = octets;
            let port = dport(&b[40..], next);
            let refused = blocked(set, IpAddr::V6(dst))
                || embedded(dst).is_some_and(|v4| blocked(set, IpAddr::V4(v4)))
                || matches!(next, HOPOPTS | DSTOPTS | ROUTING | AH | FRAGMENT)
                || nested(next, port);
            (next, port, refused)
        } else {
            return None;
        };
        refused.then_some(Expected {
            judgement: Judgement::Blocked(Why::Tunnel),
            dst: dst16,
            l4: Some((proto, port)),
        })
    }
}
