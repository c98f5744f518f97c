//! Generated IPv4 and IPv6 packets for the classifier oracle: destinations near the blocked
//! networks (and IPv4 ones embedded in IPv6), IPv4 options (NOP, EOL, LSRR, SSRR, record
//! route, timestamp, router alert, unknown and malformed ones), IPv6 extension header chains
//! (hop-by-hop, destination options, routing with segments left 0 or not, fragments first
//! or later, AH) and, now and then, a wrong header length or a packet cut short; and
//! encapsulations of such packets (VXLAN, Geneve, Teredo, IPIP, 6in4, GRE with its optional
//! fields, Ethernet with VLAN tags, a second level now and then), whole, cut short, or
//! with a protocol field that carries no IP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use proptest::{
    prelude::*,
    strategy::ValueTree,
    test_runner::{Config, RngAlgorithm, TestRng, TestRunner},
};

use super::oracle::Net;

pub const IMDS4: [u8; 4] = [169, 254, 169, 254];
pub const IMDS6: [u8; 16] = [
    0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
];
const BLOCK4: [u8; 4] = [100, 100, 0, 0];
const BLOCK6: [u8; 16] = [0xfd, 0x20, 0, 0xce, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// The blocked networks the packets are judged against: the metadata addresses and one
/// wider network per family (the same set as the packet tests).
pub fn blocked_nets() -> Vec<Net> {
    vec![
        Net {
            addr: IpAddr::V4(Ipv4Addr::from(IMDS4)),
            prefix: 32,
        },
        Net {
            addr: IpAddr::V6(Ipv6Addr::from(IMDS6)),
            prefix: 128,
        },
        Net {
            addr: IpAddr::V4(Ipv4Addr::from(BLOCK4)),
            prefix: 16,
        },
        Net {
            addr: IpAddr::V6(Ipv6Addr::from(BLOCK6)),
            prefix: 64,
        },
    ]
}

/// IPv4 destinations: the blocked ones, their neighbours, the edges of the /16, anything.
fn v4_dst() -> impl Strategy<Value = [u8; 4]> {
    prop_oneof![
        Just(IMDS4),
        Just([169, 254, 169, 253]),
        Just([169, 254, 169, 255]),
        any::<u16>().prop_map(|l| [100, 100, (l >> 8) as u8, l as u8]),
        Just([100, 99, 255, 255]),
        Just([100, 101, 0, 0]),
        any::<[u8; 4]>(),
    ]
}

/// IPv6 destinations: the blocked ones, neighbours, the /64, IPv4-mapped and NAT64 forms of
/// IPv4 destinations, and forms that look embedded but are not (IPv4-compatible, the
/// local-use NAT64 prefix 64:ff9b:1::/48).
fn v6_dst() -> impl Strategy<Value = [u8; 16]> {
    let embed = |prefix: [u8; 12]| {
        v4_dst().prop_map(move |v4| {
            let mut a = [0u8; 16];
            a[..12].copy_from_slice(&prefix);
            a[12..].copy_from_slice(&v4);
            a
        })
    };
    prop_oneof![
        Just(IMDS6),
        (any::<u8>()).prop_map(|last| {
            let mut a = IMDS6;
            a[15] = last;
            a
        }),
        any::<u64>().prop_map(|iid| {
            let mut a = BLOCK6;
            a[8..].copy_from_slice(&iid.to_be_bytes());
            a
        }),
        Just({
            let mut a = BLOCK6;
            a[7] = 1;
            a
        }),
        embed([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]),
        embed([0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0]),
        embed([0; 12]),
        embed([0, 0x64, 0xff, 0x9b, 0, 1, 0, 0, 0, 0, 0, 0]),
        any::<[u8; 16]>(),
    ]
}

/// One IPv4 option as bytes (well formed or not).
fn v4_option() -> impl Strategy<Value = Vec<u8>> {
    let route = |kind: u8| {
        (prop::collection::vec(v4_dst(), 0..4), 0u8..4).prop_map(move |(hops, ptr_hop)| {
            let mut o = vec![kind, (3 + 4 * hops.len()) as u8, 4 + 4 * ptr_hop];
            hops.iter().for_each(|h| o.extend_from_slice(h));
            o
        })
    };
    prop_oneof![
        3 => Just(vec![1]),
        1 => Just(vec![0]),
        2 => route(0x83),
        2 => route(0x89),
        1 => (0usize..4).prop_map(|n| {
            let mut o = vec![7, (3 + 4 * n) as u8, 4];
            o.resize(3 + 4 * n, 0);
            o
        }),
        1 => (1usize..4).prop_map(|n| {
            let mut o = vec![0x44, (4 + 4 * n) as u8, 5, 0];
            o.resize(4 + 4 * n, 0);
            o
        }),
        1 => Just(vec![0x94, 4, 0, 0]),
        // Unknown options (copied flag or not), including kinds that are LSRR/SSRR without
        // the copied flag (0x03, 0x09): not source routes to the kernel's option parser.
        2 => (any::<u8>(), 2u8..12).prop_map(|(kind, len)| {
            let kind = if matches!(kind, 0 | 1 | 0x83 | 0x89) { kind ^ 0x40 } else { kind };
            let mut o = vec![kind, len];
            o.resize(usize::from(len), 0xaa);
            o
        }),
        // Malformed: any length byte, any body.
        2 => (any::<u8>(), any::<u8>(), prop::collection::vec(any::<u8>(), 0..6)).prop_map(
            |(kind, len, body)| {
                let kind = if kind <= 1 { kind + 2 } else { kind };
                let mut o = vec![kind, len];
                o.extend(body);
                o
            },
        ),
    ]
}

/// Upper-layer protocols after the IP header or the extension headers.
fn upper_proto() -> impl Strategy<Value = u8> {
    prop_oneof![
        4 => Just(6u8),
        4 => Just(17u8),
        1 => Just(1u8),
        1 => Just(58u8),
        1 => Just(132u8),
        1 => Just(136u8),
        1 => Just(59u8),
        1 => Just(50u8),
        1 => any::<u8>(),
    ]
}

/// The L4 header: source port 40000, the given destination port, some bytes after it.
fn l4(dport: u16, extra: usize) -> Vec<u8> {
    let mut b = vec![0x9c, 0x40];
    b.extend_from_slice(&dport.to_be_bytes());
    b.resize(4 + extra, 0x11);
    b
}

/// How a generated packet is damaged, if at all.
#[derive(Clone, Copy, Debug)]
enum Damage {
    None,
    /// Cut to this fraction (per mille) of its length (never below the fixed header).
    Cut(u16),
    /// IPv4 only: this IHL instead of the right one.
    Ihl(u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        8 => Just(Damage::None),
        1 => (0u16..1000).prop_map(Damage::Cut),
        1 => (0u8..16).prop_map(Damage::Ihl),
    ]
}

fn cut(mut p: Vec<u8>, damage: Damage, fixed: usize) -> Vec<u8> {
    if let Damage::Cut(per_mille) = damage {
        let keep = fixed + (p.len() - fixed) * usize::from(per_mille) / 1000;
        p.truncate(keep);
    }
    p
}

/// IPv4 packets with options.
pub fn v4_packet() -> impl Strategy<Value = Vec<u8>> {
    (
        v4_dst(),
        prop::collection::vec(v4_option(), 0..5),
        any::<bool>(),
        upper_proto(),
        any::<u16>(),
        prop_oneof![4 => Just(0u16), 1 => 1u16..0x2000],
        damage(),
    )
        .prop_map(|(dst, options, pad_with_nop, proto, dport, frag, damage)| {
            let mut opts: Vec<u8> = options.concat();
            opts.truncate(40);
            while !opts.len().is_multiple_of(4) {
                opts.push(u8::from(pad_with_nop));
            }
            let ihl = 5 + opts.len() / 4;
            let mut p = vec![0u8; 20];
            p[0] = 0x40 | ihl as u8;
            p[6..8].copy_from_slice(&frag.to_be_bytes());
            p[8] = 64;
            p[9] = proto;
            p[12..16].copy_from_slice(&[192, 0, 2, 2]);
            p[16..20].copy_from_slice(&dst);
            p.extend_from_slice(&opts);
            p.extend(l4(dport, 8));
            let total = p.len() as u16;
            p[2..4].copy_from_slice(&total.to_be_bytes());
            if let Damage::Ihl(bad) = damage {
                p[0] = 0x40 | bad;
            }
            cut(p, damage, 20)
        })
}

/// One IPv6 extension header: (its type, its bytes with the next-header byte left 0).
fn v6_ext() -> impl Strategy<Value = (u8, Vec<u8>)> {
    let options = |kind: u8| {
        (0u8..3).prop_map(move |len8| {
            let size = (usize::from(len8) + 1) * 8;
            // PadN covering the option area.
            let mut h = vec![0, len8, 1, (size - 4) as u8];
            h.resize(size, 0);
            (kind, h)
        })
    };
    prop_oneof![
        3 => options(0),
        3 => options(60),
        // Routing: type 0 (deprecated), 2 (mobile IPv6), 3 (RPL), 4 (segment routing) or
        // any; segments left 0 or not; 0..3 addresses.
        4 => (
            prop_oneof![Just(0u8), Just(2), Just(3), Just(4), any::<u8>()],
            prop_oneof![2 => Just(0u8), 1 => 1u8..4, 1 => any::<u8>()],
            prop::collection::vec(v6_dst(), 0..3),
        )
            .prop_map(|(rtype, left, addrs)| {
                let mut h = vec![0, (2 * addrs.len()) as u8, rtype, left, 0, 0, 0, 0];
                addrs.iter().for_each(|a| h.extend_from_slice(a));
                (43, h)
            }),
        // Fragment: first (offset 0) or a later one, more-fragments flag either way.
        3 => (prop_oneof![Just(0u16), 1u16..0x2000], any::<bool>()).prop_map(|(offset, more)| {
            let word = (offset << 3) | u16::from(more);
            let mut h = vec![0, 0];
            h.extend_from_slice(&word.to_be_bytes());
            h.extend_from_slice(&[0, 0, 0, 7]);
            (44, h)
        }),
        // AH: payload length 1..4 (12..24 bytes), now and then the malformed 0.
        2 => prop_oneof![4 => 1u8..5, 1 => Just(0u8)].prop_map(|plen| {
            let mut h = vec![0, plen, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1];
            h.resize((usize::from(plen) + 2) * 4, 0x22);
            (51, h)
        }),
    ]
}

/// IPv6 packets with extension header chains (up to 10 headers, past the walk's bound).
pub fn v6_packet() -> impl Strategy<Value = Vec<u8>> {
    (
        v6_dst(),
        prop_oneof![3 => prop::collection::vec(v6_ext(), 0..4), 1 => prop::collection::vec(v6_ext(), 4..11)],
        upper_proto(),
        any::<u16>(),
        damage(),
    )
        .prop_map(|(dst, exts, upper, dport, damage)| {
            let first_next = exts.first().map_or(upper, |(kind, _)| *kind);
            let mut p = vec![0u8; 40];
            p[0] = 0x60;
            p[6] = first_next;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&dst);
            for (i, (_, bytes)) in exts.iter().enumerate() {
                let mut h = bytes.clone();
                h[0] = exts.get(i + 1).map_or(upper, |(kind, _)| *kind);
                p.extend(h);
            }
            p.extend(l4(dport, 8));
            let payload = (p.len() - 40) as u16;
            p[4..6].copy_from_slice(&payload.to_be_bytes());
            cut(p, damage, 40)
        })
}

/// An outer IPv4 or IPv6 header (no options or extension headers: those are the plain
/// generators' job) with protocol `proto` around `payload`.
fn outer(v6: bool, dst4: [u8; 4], dst6: [u8; 16], proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = if v6 {
        let mut p = vec![0u8; 40];
        p[0] = 0x60;
        p[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        p[6] = proto;
        p[7] = 64;
        p[8..24].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        p[24..40].copy_from_slice(&dst6);
        p
    } else {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        p[8] = 64;
        p[9] = proto;
        p[12..16].copy_from_slice(&[192, 0, 2, 2]);
        p[16..20].copy_from_slice(&dst4);
        p
    };
    p.extend_from_slice(payload);
    p
}

/// An Ethernet frame around `inner`: 0 to 3 VLAN tags (three is one more than is walked),
/// and the ethertype that fits the inner packet's version or, now and then, ARP.
fn ethernet(tags: usize, arp: bool, inner: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for i in 0..tags {
        f.extend_from_slice(if i % 2 == 0 {
            &[0x88, 0xa8]
        } else {
            &[0x81, 0x00]
        });
        f.extend_from_slice(&[0, 7]);
    }
    let ethertype: u16 = match (arp, inner.first().map(|b| b >> 4)) {
        (true, _) => 0x0806,
        (false, Some(6)) => 0x86dd,
        _ => 0x0800,
    };
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(inner);
    f
}

/// The ethertype of an IP packet's version.
fn ip_ethertype(inner: &[u8]) -> u16 {
    if inner.first().map(|b| b >> 4) == Some(6) {
        0x86dd
    } else {
        0x0800
    }
}

fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0x9c, 0x40];
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An inner packet: a generated plain one, or (a second level) IPIP around one.
fn inner_packet() -> BoxedStrategy<Vec<u8>> {
    // Boxed, like the other compound strategies here: their value trees, nested by value,
    // overflow a test thread's stack in a debug build.
    prop_oneof![
        4 => v4_packet().boxed(),
        4 => v6_packet().boxed(),
        1 => (v4_dst(), v4_packet().boxed()).prop_map(|(dst, p)| outer(false, dst, [0; 16], 4, &p)),
    ]
    .boxed()
}

/// Encapsulated packets: (outer family, outer destinations, encapsulation kind and its
/// variable fields, inner packet, damage).
pub fn tunnel_packet() -> BoxedStrategy<Vec<u8>> {
    (
        any::<bool>(),
        v4_dst().boxed(),
        v6_dst().boxed(),
        0u8..9,
        (
            0usize..4,
            prop_oneof![6 => Just(false), 1 => Just(true)],
            any::<u8>(),
            any::<u16>(),
        ),
        inner_packet(),
        prop_oneof![6 => Just(Damage::None), 1 => (0u16..1000).prop_map(Damage::Cut)],
    )
        .prop_map(
            |(v6, dst4, dst6, kind, (tags, odd, byte, word), inner, damage)| {
                let (proto, payload) = match kind {
                    0 | 1 => {
                        let port = if kind == 0 { 4789 } else { 8472 };
                        let mut v = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
                        v.extend(ethernet(tags.min(3), odd, &inner));
                        (17, udp(port, &v))
                    }
                    2 => {
                        // Geneve: 0..3 words of options, Ethernet, IP, or another protocol.
                        let words = usize::from(byte % 4);
                        let protocol: u16 = match (odd, tags) {
                            (true, _) => 0x8847,
                            (false, 0) => ip_ethertype(&inner),
                            _ => 0x6558,
                        };
                        let mut g = vec![words as u8, 0];
                        g.extend_from_slice(&protocol.to_be_bytes());
                        g.extend_from_slice(&[0, 0, 42, 0]);
                        g.resize(8 + 4 * words, 0x5a);
                        if protocol == 0x6558 {
                            g.extend(ethernet(tags - 1, false, &inner));
                        } else {
                            g.extend_from_slice(&inner);
                        }
                        (17, udp(6081, &g))
                    }
                    3 => {
                        // Teredo: authentication (ID and value lengths from `word`) and origin
                        // indication each present or not.
                        let mut t = Vec::new();
                        if byte & 1 != 0 {
                            let (id, au) = ((word >> 8) as u8 % 8, word as u8 % 8);
                            t.extend_from_slice(&[0, 1, id, au]);
                            t.resize(4 + usize::from(id) + usize::from(au) + 9, 0x33);
                        }
                        if byte & 2 != 0 {
                            t.extend_from_slice(&[0, 0]);
                            t.extend_from_slice(&word.to_be_bytes());
                            t.extend_from_slice(&[1, 2, 3, 4]);
                        }
                        t.extend_from_slice(&inner);
                        (17, udp(3544, &t))
                    }
                    4 => (4, inner),
                    5 => (41, inner),
                    6 | 7 => {
                        // GRE: any of checksum, key, sequence; IP, Ethernet, or MPLS.
                        let flags = byte & 0xb0;
                        let protocol: u16 = match (odd, kind) {
                            (true, _) => 0x8847,
                            (false, 6) => ip_ethertype(&inner),
                            _ => 0x6558,
                        };
                        let mut g = vec![flags, 0];
                        g.extend_from_slice(&protocol.to_be_bytes());
                        g.resize(4 + 4 * (flags.count_ones() as usize), 0x77);
                        if protocol == 0x6558 {
                            g.extend(ethernet(tags.min(2), false, &inner));
                        } else {
                            g.extend_from_slice(&inner);
                        }
                        (47, g)
                    }
                    // UDP to a port next to a tunnel port: not an encapsulation.
                    _ => {
                        let mut v = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
                        v.extend(ethernet(0, false, &inner));
                        (17, udp(4788, &v))
                    }
                };
                let p = outer(v6, dst4, dst6, proto, &payload);
                cut(p, damage, if v6 { 40 } else { 20 })
            },
        )
        .boxed()
}

/// Either family, plain or encapsulated.
pub fn packet() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![2 => v4_packet().boxed(), 2 => v6_packet().boxed(), 1 => tunnel_packet()].boxed()
}

/// `count` packets from a fixed seed: the same packets on every run and machine.
pub fn seeded_packets(seed: u8, count: usize) -> Vec<Vec<u8>> {
    seeded(packet(), seed, count)
}

/// `count` encapsulated packets from a fixed seed.
pub fn seeded_tunnel_packets(seed: u8, count: usize) -> Vec<Vec<u8>> {
    seeded(tunnel_packet(), seed, count)
}

fn seeded(strategy: impl Strategy<Value = Vec<u8>>, seed: u8, count: usize) -> Vec<Vec<u8>> {
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[seed; 32]);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    (0..count)
        .map(|_| {
            strategy
                .new_tree(&mut runner)
                .expect("packet strategy")
                .current()
        })
        .collect()
}
