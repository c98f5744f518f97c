//! BPF_PROG_TEST_RUN tests of the egress program on crafted packets: the kernel's verdict,
//! the in-kernel counters, and agreement with the host classifier on the same bytes. The
//! encapsulated and generated packets also go through the pod-edge program, in Ethernet
//! frames with zero to three VLAN tags, which must agree too.
//! Needs root (loads programs, pins maps in a private bpffs).

use std::collections::BTreeMap;

use datalab_guard::bpf::testrun::TestRunner;
use datalab_guard_common::{
    cidr::Cidr,
    classify::{classify_packet, PacketClass, Reason},
    counters::Stat,
    maps::programs,
    Action, Family, Hook, Mode, TunnelConfig, Verdict, VerdictEntry,
};
use datalab_guard_tests::BpffsDir;

/// The packet generator and the independent oracle of the common crate's property tests.
#[path = "../../datalab-guard-common/tests/support/mod.rs"]
mod support;

const IMDS4: [u8; 4] = [169, 254, 169, 254];
const IMDS6: [u8; 16] = [
    0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
];
const OTHER4: [u8; 4] = [192, 0, 2, 1];
const OTHER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const TCP: u8 = 6;
const UDP: u8 = 17;
const PASS: u32 = 1;
const DROP: u32 = 0;
/// The edge program's verdicts: on to the next program (`TC_ACT_UNSPEC`), or drop.
const EDGE_NEXT: i32 = -1;
const EDGE_DROP: i32 = 2;

fn blocked() -> Vec<Cidr> {
    vec![
        Cidr::v4(IMDS4, 32).unwrap(),
        Cidr::v6(IMDS6, 128).unwrap(),
        Cidr::v4([100, 100, 0, 0], 16).unwrap(),
        Cidr::v6(
            [0xfd, 0x20, 0, 0xce, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            64,
        )
        .unwrap(),
    ]
}

/// A test runner whose maps live in a private bpffs (fields drop in order: pins, mount).
struct Runner {
    runner: TestRunner,
    _bpffs: BpffsDir,
}

impl std::ops::Deref for Runner {
    type Target = TestRunner;
    fn deref(&self) -> &TestRunner {
        &self.runner
    }
}

impl std::ops::DerefMut for Runner {
    fn deref_mut(&mut self) -> &mut TestRunner {
        &mut self.runner
    }
}

/// Runs the edge program on `packet` in a frame with `tags` VLAN tags; a disagreement with
/// the host's judgement `host` (verdict, or the one audit event a drop must produce, with
/// the edge hook and the host's reason and destination) is returned as a line.
fn edge_disagrees(r: &mut Runner, packet: &[u8], tags: usize, host: PacketClass) -> Option<String> {
    let verdict = r.run_edge(&ether(tags, packet)).expect("edge test run");
    let events = r.take_audit_events().expect("audit events");
    let ok = match host {
        PacketClass::Blocked(a, reason) => {
            verdict == EDGE_DROP
                && events.len() == 1
                && events[0].hook == Hook::Edge as u8
                && events[0].reason == reason as u8
                && events[0].dst == a.dst
                && events[0].dport == a.dport
        }
        PacketClass::Pass(_) | PacketClass::NotIp => verdict == EDGE_NEXT && events.is_empty(),
    };
    (!ok)
        .then(|| format!("edge ({tags} tags): verdict {verdict}, host {host:?}, events {events:?}"))
}

fn runner(mode: Mode, default: Verdict, policy: &BTreeMap<u64, VerdictEntry>) -> Option<Runner> {
    if !datalab_guard_tests::require_root() {
        return None;
    }
    let bpffs = BpffsDir::new().expect("private bpffs");
    let mut r = TestRunner::new(&bpffs.path().join("runner")).expect("load programs (verifier)");
    r.configure(&blocked(), mode, default, policy)
        .expect("configure maps");
    Some(Runner {
        runner: r,
        _bpffs: bpffs,
    })
}

fn v4(dst: [u8; 4], proto: u8, options: &[u8], dport: u16) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let total = ihl * 4 + 8;
    let mut p = vec![0u8; total];
    p[0] = 0x40 | ihl as u8;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[8] = 64;
    p[9] = proto;
    p[12..16].copy_from_slice(&[192, 0, 2, 2]);
    p[16..20].copy_from_slice(&dst);
    p[20..20 + options.len()].copy_from_slice(options);
    p[ihl * 4..ihl * 4 + 2].copy_from_slice(&40000u16.to_be_bytes());
    p[ihl * 4 + 2..ihl * 4 + 4].copy_from_slice(&dport.to_be_bytes());
    p
}

fn v6(dst: [u8; 16], next: u8, ext: &[u8], dport: u16) -> Vec<u8> {
    let mut p = vec![0u8; 40 + ext.len() + 8];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&((ext.len() + 8) as u16).to_be_bytes());
    p[6] = next;
    p[7] = 64;
    p[8..24].copy_from_slice(&OTHER6);
    p[24..40].copy_from_slice(&dst);
    p[40..40 + ext.len()].copy_from_slice(ext);
    let l4 = 40 + ext.len();
    p[l4 + 2..l4 + 4].copy_from_slice(&dport.to_be_bytes());
    p
}

fn mapped(v4: [u8; 4]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[10] = 0xff;
    a[11] = 0xff;
    a[12..].copy_from_slice(&v4);
    a
}

fn with_last(mut base: [u8; 16], last: u8) -> [u8; 16] {
    base[15] = last;
    base
}

/// Hop-by-hop options (8 bytes) then a Segment Routing header listing `segments`.
fn hbh_then_srh(segments: &[[u8; 16]], final_next: u8) -> Vec<u8> {
    let mut ext = vec![0u8; 8];
    ext[0] = 43;
    let mut srh = vec![0u8; 8];
    srh[0] = final_next;
    srh[1] = (segments.len() * 2) as u8;
    srh[2] = 4;
    srh[3] = segments.len() as u8 - 1;
    srh[4] = segments.len() as u8 - 1;
    for s in segments {
        srh.extend_from_slice(s);
    }
    ext.extend_from_slice(&srh);
    ext
}

/// The cases every test runs: (name, packet, expected verdict for a guarded cgroup).
fn cases() -> Vec<(&'static str, Vec<u8>, u32)> {
    let lsrr_via_imds = [1, 0x83, 11, 4, 192, 0, 2, 9, 169, 254, 169, 254, 0, 0, 0, 0];
    let record_route = [7, 7, 4, 169, 254, 169, 254, 0];
    // Source routing is refused whatever it lists, not only when it lists IMDS.
    let ssrr_via_other = [0x89, 7, 4, 192, 0, 2, 9, 0];
    vec![
        ("v4 tcp to IMDS", v4(IMDS4, TCP, &[], 80), DROP),
        ("v4 udp to IMDS", v4(IMDS4, UDP, &[], 53), DROP),
        ("v4 icmp to IMDS", v4(IMDS4, 1, &[], 0), DROP),
        ("v4 to other", v4(OTHER4, TCP, &[], 80), PASS),
        (
            "v4 just below IMDS",
            v4([169, 254, 169, 253], TCP, &[], 80),
            PASS,
        ),
        (
            "v4 just above IMDS",
            v4([169, 254, 169, 255], TCP, &[], 80),
            PASS,
        ),
        (
            "v4 inside /16 block",
            v4([100, 100, 7, 9], TCP, &[], 443),
            DROP,
        ),
        (
            "v4 below /16 block",
            v4([100, 99, 255, 255], TCP, &[], 443),
            PASS,
        ),
        (
            "v4 above /16 block",
            v4([100, 101, 0, 0], TCP, &[], 443),
            PASS,
        ),
        (
            "v4 options to IMDS",
            v4(IMDS4, TCP, &record_route, 80),
            DROP,
        ),
        (
            "v4 options to other",
            v4(OTHER4, TCP, &record_route, 80),
            PASS,
        ),
        (
            "v4 LSRR via IMDS",
            v4(OTHER4, TCP, &lsrr_via_imds, 80),
            DROP,
        ),
        (
            "v4 SSRR via other",
            v4(OTHER4, TCP, &ssrr_via_other, 80),
            DROP,
        ),
        (
            "v4 malformed option",
            v4(OTHER4, TCP, &[0x44, 40, 0, 0], 80),
            DROP,
        ),
        ("v4 loopback", v4([127, 0, 0, 1], TCP, &[], 80), PASS),
        ("v6 tcp to IMDS", v6(IMDS6, TCP, &[], 80), DROP),
        ("v6 udp to IMDS", v6(IMDS6, UDP, &[], 53), DROP),
        ("v6 to other", v6(OTHER6, TCP, &[], 80), PASS),
        (
            "v6 just below IMDS",
            v6(with_last(IMDS6, 0x53), TCP, &[], 80),
            PASS,
        ),
        (
            "v6 just above IMDS",
            v6(with_last(IMDS6, 0x55), TCP, &[], 80),
            PASS,
        ),
        (
            "v6 inside /64 block",
            v6(
                [0xfd, 0x20, 0, 0xce, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0x54],
                TCP,
                &[],
                80,
            ),
            DROP,
        ),
        (
            "v6 outside /64 block",
            v6(
                [0xfd, 0x20, 0, 0xce, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 2, 0x54],
                TCP,
                &[],
                80,
            ),
            PASS,
        ),
        ("v6 v4-mapped IMDS", v6(mapped(IMDS4), TCP, &[], 80), DROP),
        ("v6 v4-mapped other", v6(mapped(OTHER4), TCP, &[], 80), PASS),
        (
            "v6 ext headers to IMDS",
            v6(IMDS6, 0, &hbh_then_srh(&[OTHER6], TCP), 80),
            DROP,
        ),
        (
            "v6 ext headers to other",
            v6(OTHER6, 0, &hbh_then_srh(&[OTHER6], TCP), 80),
            PASS,
        ),
        (
            "v6 SRH via IMDS",
            v6(OTHER6, 0, &hbh_then_srh(&[OTHER6, IMDS6], TCP), 80),
            DROP,
        ),
        (
            "v6 fragment to other",
            v6(OTHER6, 44, &[UDP, 0, 0, 1, 0, 0, 0, 1], 53),
            PASS,
        ),
        ("v6 loopback", v6(with_last([0; 16], 1), TCP, &[], 80), PASS),
        (
            "v4 header only, to IMDS",
            v4(IMDS4, TCP, &[], 80)[..20].to_vec(),
            DROP,
        ),
        (
            "v4 header only, to other",
            v4(OTHER4, TCP, &[], 80)[..20].to_vec(),
            PASS,
        ),
        ("v4 cut inside options", truncated_options(), DROP),
        (
            "v6 header only, to IMDS",
            v6(IMDS6, TCP, &[], 80)[..40].to_vec(),
            DROP,
        ),
        (
            "v6 header only, to other",
            v6(OTHER6, TCP, &[], 80)[..40].to_vec(),
            PASS,
        ),
        (
            "v6 cut inside ext header",
            v6(OTHER6, 0, &hbh_then_srh(&[OTHER6], TCP), 80)[..44].to_vec(),
            DROP,
        ),
        (
            "v4 cut before ports",
            v4(IMDS4, UDP, &[], 53)[..21].to_vec(),
            DROP,
        ),
    ]
}

/// An outer IPv4 (or, with `v6`, IPv6) header with protocol `proto` around `payload`.
fn outer(v6: bool, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = if v6 {
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        h[6] = proto;
        h[7] = 64;
        h[24..40].copy_from_slice(&OTHER6);
        h
    } else {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        h[8] = 64;
        h[9] = proto;
        h[12..16].copy_from_slice(&[10, 0, 0, 1]);
        h[16..20].copy_from_slice(&OTHER4);
        h
    };
    p.extend_from_slice(payload);
    p
}

fn udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = vec![0x9c, 0x40];
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// An Ethernet frame (with `tags` VLAN tags) around an IP packet.
fn ether(tags: usize, inner: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    for _ in 0..tags {
        f.extend_from_slice(&[0x81, 0x00, 0, 7]);
    }
    let ethertype: u16 = if inner[0] >> 4 == 6 { 0x86dd } else { 0x0800 };
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(inner);
    f
}

fn vxlan(port: u16, inner: &[u8]) -> Vec<u8> {
    let mut v = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
    v.extend(ether(0, inner));
    udp(port, &v)
}

fn geneve(protocol: u16, option_words: u8, inner: &[u8]) -> Vec<u8> {
    let mut g = vec![option_words, 0];
    g.extend_from_slice(&protocol.to_be_bytes());
    g.extend_from_slice(&[0, 0, 42, 0]);
    g.resize(8 + 4 * usize::from(option_words), 0x5a);
    if protocol == 0x6558 {
        g.extend(ether(1, inner));
    } else {
        g.extend_from_slice(inner);
    }
    udp(6081, &g)
}

/// Teredo with an authentication indicator (ID length 1, value length 2) and an origin
/// indication in front of the IPv6 packet.
fn teredo(inner: &[u8]) -> Vec<u8> {
    let mut t = vec![0, 1, 1, 2, 0xaa, 0xbb, 0xbb];
    t.extend_from_slice(&[0; 9]);
    t.extend_from_slice(&[0, 0, 0x12, 0x34, 1, 2, 3, 4]);
    t.extend_from_slice(inner);
    udp(3544, &t)
}

/// GRE with `flags` (checksum 0x80, key 0x20, sequence 0x10) and `protocol`.
fn gre(flags: u8, protocol: u16, inner: &[u8]) -> Vec<u8> {
    let mut g = vec![flags, 0];
    g.extend_from_slice(&protocol.to_be_bytes());
    g.resize(4 + 4 * flags.count_ones() as usize, 0x77);
    if protocol == 0x6558 {
        g.extend(ether(0, inner));
    } else {
        g.extend_from_slice(inner);
    }
    g
}

/// Encapsulated packets from a guarded cgroup, with the verdict the rules promise: the
/// inner destination decides; a truncated encapsulation or a non-IP payload passes (the
/// far end cannot decapsulate an IP packet from it either); an inner packet with options
/// or extension headers, or a second level, is refused.
fn tunnel_cases() -> Vec<(&'static str, Vec<u8>, u32)> {
    let tcp4 = |dst| v4(dst, TCP, &[], 80);
    let udp6 = |dst| v6(dst, UDP, &[], 53);
    let mut out = Vec::new();
    for v6_outer in [false, true] {
        let o = |proto, payload: &[u8]| outer(v6_outer, proto, payload);
        out.extend([
            (
                "vxlan 4789 to IMDS",
                o(UDP, &vxlan(4789, &tcp4(IMDS4))),
                DROP,
            ),
            (
                "vxlan 8472 to IMDS6",
                o(UDP, &vxlan(8472, &udp6(IMDS6))),
                DROP,
            ),
            ("vxlan to other", o(UDP, &vxlan(4789, &tcp4(OTHER4))), PASS),
            (
                "udp 4790 carrying vxlan",
                o(UDP, &vxlan(4790, &tcp4(IMDS4))),
                PASS,
            ),
            (
                "geneve eth (1 vlan) to IMDS",
                o(UDP, &geneve(0x6558, 2, &tcp4(IMDS4))),
                DROP,
            ),
            (
                "geneve ipv6 to IMDS6",
                o(UDP, &geneve(0x86dd, 0, &udp6(IMDS6))),
                DROP,
            ),
            (
                "geneve mpls",
                o(UDP, &geneve(0x8847, 0, &tcp4(IMDS4))),
                PASS,
            ),
            ("teredo to IMDS6", o(UDP, &teredo(&udp6(IMDS6))), DROP),
            (
                "teredo to mapped IMDS",
                o(UDP, &teredo(&udp6(mapped(IMDS4)))),
                DROP,
            ),
            ("teredo to other", o(UDP, &teredo(&udp6(OTHER6))), PASS),
            ("ipip to IMDS", o(4, &tcp4(IMDS4)), DROP),
            ("ipip to other", o(4, &tcp4(OTHER4)), PASS),
            ("6in4 to IMDS6", o(41, &udp6(IMDS6)), DROP),
            (
                "gre csum+key+seq to IMDS",
                o(47, &gre(0xb0, 0x0800, &tcp4(IMDS4))),
                DROP,
            ),
            (
                "gre key ipv6 to IMDS6",
                o(47, &gre(0x20, 0x86dd, &udp6(IMDS6))),
                DROP,
            ),
            (
                "gre teb to IMDS",
                o(47, &gre(0, 0x6558, &tcp4(IMDS4))),
                DROP,
            ),
            (
                "gre teb to other",
                o(47, &gre(0x10, 0x6558, &tcp4(OTHER4))),
                PASS,
            ),
            ("gre mpls", o(47, &gre(0, 0x8847, &tcp4(IMDS4))), PASS),
            (
                "inner v4 options",
                o(4, &v4(OTHER4, TCP, &[1, 1, 1, 0], 80)),
                DROP,
            ),
            (
                "inner v6 hop-by-hop",
                o(41, &v6(OTHER6, 0, &[TCP, 0, 1, 4, 0, 0, 0, 0], 80)),
                DROP,
            ),
            (
                "vxlan in vxlan",
                o(
                    UDP,
                    &vxlan(4789, &outer(false, UDP, &vxlan(4789, &tcp4(OTHER4)))),
                ),
                DROP,
            ),
            (
                "ipip in gre",
                o(47, &gre(0, 0x0800, &outer(false, 4, &tcp4(OTHER4)))),
                DROP,
            ),
        ]);
        let l3 = if v6_outer { 40 } else { 20 };
        let whole = o(UDP, &vxlan(4789, &tcp4(IMDS4)));
        out.extend([
            (
                "vxlan cut in its header",
                whole[..l3 + 8 + 5].to_vec(),
                PASS,
            ),
            (
                "vxlan cut in the ethernet header",
                whole[..l3 + 16 + 10].to_vec(),
                PASS,
            ),
            (
                "vxlan cut in the inner IP header",
                whole[..l3 + 30 + 19].to_vec(),
                PASS,
            ),
            (
                "vxlan with only the inner IP header",
                whole[..l3 + 30 + 20].to_vec(),
                DROP,
            ),
            (
                "gre cut in its key",
                o(47, &gre(0x20, 0x0800, &tcp4(IMDS4)))[..l3 + 6].to_vec(),
                PASS,
            ),
            (
                "teredo cut in its indicator",
                o(UDP, &teredo(&udp6(IMDS6)))[..l3 + 8 + 10].to_vec(),
                PASS,
            ),
            (
                "ipip cut in the inner header",
                o(4, &tcp4(IMDS4))[..l3 + 12].to_vec(),
                PASS,
            ),
        ]);
    }
    out
}

/// IHL says 60 bytes of header but the packet ends after 24.
fn truncated_options() -> Vec<u8> {
    let mut p = v4(OTHER4, TCP, &[1, 1, 1, 1], 80)[..24].to_vec();
    p[0] = 0x4f;
    p
}

/// Shorter than an IP header: BPF_PROG_TEST_RUN refuses these (the IP layer never makes
/// them), so only the host classifier is checked; it must not judge them blocked.
fn host_only_cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", Vec::new()),
        ("one byte", vec![0x45]),
        (
            "v4 truncated header",
            v4(IMDS4, TCP, &[], 80)[..12].to_vec(),
        ),
        (
            "v6 truncated header",
            v6(IMDS6, TCP, &[], 80)[..30].to_vec(),
        ),
    ]
}

const ARP_REQUEST: [u8; 28] = [
    0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 169, 254, 169, 254,
];

#[test]
fn short_packets_and_non_ip_frames_pass() {
    let set = blocked();
    for (name, packet) in host_only_cases() {
        assert_eq!(
            classify_packet(&packet[..], &set[..]),
            PacketClass::NotIp,
            "{name}"
        );
    }
    let Some(r) = runner(Mode::Enforce, Verdict::Guard, &BTreeMap::new()) else {
        return;
    };
    // An ARP request for 169.254.169.254: not IP, not ours to judge.
    assert_eq!(
        r.run_ethertype(programs::EGRESS, 0x0806, &ARP_REQUEST, 1)
            .unwrap()
            .verdict,
        PASS
    );
    assert_eq!(
        classify_packet(&ARP_REQUEST[..], &set[..]),
        PacketClass::NotIp
    );
}

#[test]
fn guarded_cgroup_verdicts_match_expectations_and_host_classifier() {
    let Some(r) = runner(Mode::Enforce, Verdict::Guard, &BTreeMap::new()) else {
        return;
    };
    let set = blocked();
    let mut failures = Vec::new();
    for (name, packet, expected) in cases() {
        let kernel = r.run(programs::EGRESS, &packet, 1).expect(name).verdict;
        let host = match classify_packet(&packet[..], &set[..]) {
            PacketClass::Blocked(..) => DROP,
            PacketClass::Pass(_) | PacketClass::NotIp => PASS,
        };
        if kernel != expected || host != expected {
            failures.push(format!(
                "{name}: kernel {kernel}, host {host}, expected {expected}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "verdict mismatches:\n{}",
        failures.join("\n")
    );
}

#[test]
fn encapsulated_packets_kernel_and_host_agree_with_expectations() {
    let Some(mut r) = runner(Mode::Enforce, Verdict::Guard, &BTreeMap::new()) else {
        return;
    };
    let set = blocked();
    let mut failures = Vec::new();
    for (name, packet, expected) in tunnel_cases() {
        let v6_outer = packet[0] >> 4 == 6;
        let kernel = r.run(programs::EGRESS, &packet, 1).expect(name).verdict;
        let events = r.take_audit_events().expect("audit events");
        let host = classify_packet(&packet[..], &set[..]);
        let host_verdict = match host {
            PacketClass::Blocked(_, Reason::Tunnel) => DROP,
            PacketClass::Blocked(..) => {
                failures.push(format!("{name} (outer v6 {v6_outer}): host {host:?}"));
                DROP
            }
            PacketClass::Pass(_) | PacketClass::NotIp => PASS,
        };
        // A drop is audited with the inner packet's destination, protocol and port.
        let event_ok = match host {
            PacketClass::Blocked(a, reason) => {
                events.len() == 1
                    && events[0].reason == reason as u8
                    && events[0].dst == a.dst
                    && events[0].proto == a.proto
                    && events[0].dport == a.dport
                    && events[0].family == if a.ipv6 { Family::Ipv6 } else { Family::Ipv4 } as u8
            }
            _ => events.is_empty(),
        };
        if kernel != expected || host_verdict != expected || !event_ok {
            failures.push(format!(
                "{name} (outer v6 {v6_outer}): kernel {kernel}, host {host:?}, expected {expected}, events {events:?}"
            ));
        }
        for tags in 0..=3 {
            if let Some(why) = edge_disagrees(&mut r, &packet, tags, host) {
                failures.push(format!("{name} (outer v6 {v6_outer}): {why}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "tunnel mismatches:\n{}",
        failures.join("\n")
    );
    // The inner destination names the record: VXLAN to IMDS over IPv4 reports 169.254.169.254.
    let p = outer(false, UDP, &vxlan(4789, &v4(IMDS4, TCP, &[], 80)));
    assert_eq!(r.run(programs::EGRESS, &p, 1).unwrap().verdict, DROP);
    let events = r.take_audit_events().unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].dst[..4], IMDS4);
    assert_eq!((events[0].proto, events[0].dport), (TCP, 80));
    assert_eq!(events[0].reason, Reason::Tunnel as u8);
}

#[test]
fn deny_all_tunnels_drops_every_encapsulation_and_nothing_else() {
    let Some(mut r) = runner(Mode::Enforce, Verdict::Guard, &BTreeMap::new()) else {
        return;
    };
    r.set_tunnels(TunnelConfig {
        deny_all: 1,
        ..TunnelConfig::defaults()
    })
    .unwrap();
    let harmless = v4(OTHER4, TCP, &[], 80);
    for (name, packet) in [
        ("vxlan to other", outer(false, UDP, &vxlan(4789, &harmless))),
        ("geneve truncated", outer(true, UDP, &udp(6081, &[]))),
        ("ipip to other", outer(false, 4, &harmless)),
        ("gre mpls", outer(true, 47, &gre(0, 0x8847, &harmless))),
    ] {
        assert_eq!(
            r.run(programs::EGRESS, &packet, 1).unwrap().verdict,
            DROP,
            "{name}"
        );
        let events = r.take_audit_events().unwrap();
        assert_eq!(events.len(), 1, "{name}");
        assert_eq!(events[0].reason, Reason::TunnelDenied as u8, "{name}");
        // The outer packet names the record.
        assert!(
            events[0].dst[..4] == OTHER4 || events[0].dst == OTHER6,
            "{name}"
        );
    }
    for (name, packet) in [
        ("plain udp", outer(false, UDP, &udp(53, &[1, 2, 3]))),
        ("plain tcp v6", v6(OTHER6, TCP, &[], 443)),
    ] {
        assert_eq!(
            r.run(programs::EGRESS, &packet, 1).unwrap().verdict,
            PASS,
            "{name}"
        );
    }
    let counters = r.counters().unwrap();
    assert_eq!(
        counters.iter().map(|c| c.value).sum::<u64>(),
        4,
        "{counters:?}"
    );
    // A configured port replaces the defaults: VXLAN on 9999 only.
    let mut custom = TunnelConfig::zeroed();
    assert!(custom.add_port(9999, datalab_guard_common::UdpTunnel::Vxlan));
    r.set_tunnels(custom).unwrap();
    let to_imds = v4(IMDS4, TCP, &[], 80);
    let on_9999 = outer(false, UDP, &vxlan(9999, &to_imds));
    let on_4789 = outer(false, UDP, &vxlan(4789, &to_imds));
    assert_eq!(r.run(programs::EGRESS, &on_9999, 1).unwrap().verdict, DROP);
    assert_eq!(r.run(programs::EGRESS, &on_4789, 1).unwrap().verdict, PASS);
}

#[test]
fn counters_count_each_drop_by_family_and_hook() {
    let Some(r) = runner(Mode::Enforce, Verdict::Guard, &BTreeMap::new()) else {
        return;
    };
    for _ in 0..3 {
        assert_eq!(
            r.run(programs::EGRESS, &v4(IMDS4, TCP, &[], 80), 1)
                .unwrap()
                .verdict,
            DROP
        );
    }
    assert_eq!(
        r.run(programs::EGRESS, &v6(IMDS6, TCP, &[], 80), 1)
            .unwrap()
            .verdict,
        DROP
    );
    assert_eq!(
        r.run(programs::EGRESS, &v4(OTHER4, TCP, &[], 80), 1)
            .unwrap()
            .verdict,
        PASS
    );
    let counters = r.counters().unwrap();
    let get = |family| {
        counters
            .iter()
            .find(|c| c.action == Action::Blocked && c.family == family && c.hook == Hook::Egress)
            .map(|c| c.value)
    };
    assert_eq!(get(Family::Ipv4), Some(3));
    assert_eq!(get(Family::Ipv6), Some(1));
    assert_eq!(
        counters.iter().map(|c| c.value).sum::<u64>(),
        4,
        "{counters:?}"
    );
}

#[test]
fn audit_mode_passes_but_counts() {
    let Some(r) = runner(Mode::Audit, Verdict::Guard, &BTreeMap::new()) else {
        return;
    };
    assert_eq!(
        r.run(programs::EGRESS, &v4(IMDS4, TCP, &[], 80), 1)
            .unwrap()
            .verdict,
        PASS
    );
    assert_eq!(
        r.run(programs::EGRESS, &v6(IMDS6, UDP, &[], 80), 1)
            .unwrap()
            .verdict,
        PASS
    );
    let counters = r.counters().unwrap();
    assert!(
        counters.iter().all(|c| c.action == Action::Audited),
        "{counters:?}"
    );
    assert_eq!(counters.iter().map(|c| c.value).sum::<u64>(), 2);
}

#[test]
fn exempt_default_verdict_passes_everything_uncounted() {
    let Some(r) = runner(Mode::Enforce, Verdict::Exempt, &BTreeMap::new()) else {
        return;
    };
    for (name, packet, _) in cases() {
        assert_eq!(
            r.run(programs::EGRESS, &packet, 1).unwrap().verdict,
            PASS,
            "{name}"
        );
    }
    assert!(r.counters().unwrap().is_empty());
}

/// The verdict comes from the VERDICTS entry of the packet's cgroup or an ancestor: under
/// test-run that is the calling thread's cgroup, here found from /proc/self/cgroup.
#[test]
fn policy_entry_of_an_ancestor_cgroup_overrides_the_default() {
    if !datalab_guard_tests::require_root() {
        return;
    }
    let own = datalab_guard::cgroups::current_cgroup().expect("own cgroup");
    let own_id = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&own).unwrap());
    let exempt = BTreeMap::from([(
        own_id,
        VerdictEntry {
            verdict: Verdict::Exempt as u32,
            class: 0,
        },
    )]);
    let r = runner(Mode::Enforce, Verdict::Guard, &exempt).unwrap();
    assert_eq!(
        r.run(programs::EGRESS, &v4(IMDS4, TCP, &[], 80), 1)
            .unwrap()
            .verdict,
        PASS
    );
    let guard = BTreeMap::from([(
        own_id,
        VerdictEntry {
            verdict: Verdict::Guard as u32,
            class: 7,
        },
    )]);
    let r = runner(Mode::Enforce, Verdict::Exempt, &guard).unwrap();
    assert_eq!(
        r.run(programs::EGRESS, &v4(IMDS4, TCP, &[], 80), 1)
            .unwrap()
            .verdict,
        DROP
    );
}

#[test]
fn empty_program_is_the_floor_and_passes() {
    let Some(r) = runner(Mode::Enforce, Verdict::Guard, &BTreeMap::new()) else {
        return;
    };
    let result = r
        .run(programs::BENCH_EMPTY, &v4(IMDS4, TCP, &[], 80), 1000)
        .unwrap();
    assert_eq!(result.verdict, PASS);
}

/// The in-kernel audit rate limit at a rate a test can reach: 2 events per window. Ten
/// blocked packets in one window (one BPF_PROG_TEST_RUN call of ten runs, microseconds
/// long) give exactly 2 events and 8 suppressed; all ten are dropped and counted. After the
/// window, the next event carries the 8 it stood for.
#[test]
fn audit_rate_limit_sends_two_events_per_window_and_counts_the_rest() {
    let Some(mut r) = runner(Mode::Enforce, Verdict::Guard, &BTreeMap::new()) else {
        return;
    };
    let window_ms = 400;
    r.set_audit_rate(2, window_ms).unwrap();
    let blocked = v4(IMDS4, TCP, &[], 80);
    let started = std::time::Instant::now();
    assert_eq!(r.run(programs::EGRESS, &blocked, 10).unwrap().verdict, DROP);
    assert!(
        started.elapsed() < std::time::Duration::from_millis(u64::from(window_ms) / 2),
        "ten runs took {:?}: too slow to fall into one window",
        started.elapsed()
    );
    assert_eq!(r.stat(Stat::EventsSuppressed).unwrap(), 8);
    assert_eq!(r.stat(Stat::EventsLost).unwrap(), 0);
    let counted: u64 = r.counters().unwrap().iter().map(|c| c.value).sum();
    assert_eq!(counted, 10, "counters count before the rate limit");
    let events = r.take_audit_events().unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().all(|e| e.suppressed == 0), "{events:?}");
    assert!(events.iter().all(|e| e.dst[..4] == IMDS4 && e.dport == 80));

    // The next window: the first event reports the eight suppressed in the last one.
    std::thread::sleep(std::time::Duration::from_millis(u64::from(window_ms) + 100));
    assert_eq!(r.run(programs::EGRESS, &blocked, 1).unwrap().verdict, DROP);
    let events = r.take_audit_events().unwrap();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].suppressed, 8);
    assert_eq!(
        r.stat(Stat::EventsSuppressed).unwrap(),
        8,
        "a stat, never reset"
    );
}

/// Kernel, host classifier and the independent oracle (etherparse + `std::net`, see
/// `datalab-guard-common/tests/support/oracle.rs`) on 5,000 generated packets from a fixed
/// seed: IPv4 options (source routes, malformed lengths, bad IHLs), IPv6 extension header
/// chains (routing with and without segments left, fragments, AH, chains past the bound),
/// IPv4-mapped and NAT64 destinations, packets cut short. For every packet the kernel's
/// verdict must be the host's, the host's the oracle's, and a drop must produce exactly one
/// audit event whose reason, protocol, port and destination are the host's.
#[test]
fn generated_packets_kernel_host_and_oracle_agree() {
    use support::{
        oracle::{judge, Judgement},
        packet_gen::{blocked_nets, seeded_packets, seeded_tunnel_packets},
    };
    let Some(mut r) = runner(Mode::Enforce, Verdict::Guard, &BTreeMap::new()) else {
        return;
    };
    let set = blocked();
    let nets = blocked_nets();
    assert_eq!(
        nets.len(),
        set.len(),
        "the oracle judges against the same set"
    );
    let mut packets = seeded_packets(7, 5000);
    packets.extend(seeded_tunnel_packets(9, 2000));
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    let mut failures = Vec::new();
    for (i, packet) in packets.iter().enumerate() {
        let kernel = r
            .run(programs::EGRESS, packet, 1)
            .expect("test run")
            .verdict;
        let events = r.take_audit_events().expect("audit events");
        let host = classify_packet(&packet[..], &set[..]);
        let oracle = judge(packet, &nets).judgement;
        let (host_verdict, label) = match host {
            PacketClass::Blocked(_, reason) => (DROP, format!("drop {}", reason.name())),
            PacketClass::Pass(_) => (PASS, "pass".to_string()),
            PacketClass::NotIp => (PASS, "not ip".to_string()),
        };
        let family = if packet[0] >> 4 == 6 { "v6" } else { "v4" };
        *counts.entry(format!("{family} {label}")).or_default() += 1;
        let oracle_agrees = match (host, oracle) {
            (PacketClass::Blocked(_, reason), Judgement::Blocked(why)) => {
                format!("{why:?}").to_lowercase() == reason.name().replace('_', "")
            }
            (PacketClass::Pass(_), Judgement::Pass) | (PacketClass::NotIp, Judgement::NotIp) => {
                true
            }
            _ => false,
        };
        let event_agrees = match host {
            PacketClass::Blocked(a, reason) => {
                events.len() == 1
                    && events[0].reason == reason as u8
                    && events[0].proto == a.proto
                    && events[0].dport == a.dport
                    && events[0].dst == a.dst
            }
            _ => events.is_empty(),
        };
        if kernel != host_verdict || !oracle_agrees || !event_agrees {
            failures.push(format!(
                "packet {i}: kernel {kernel}, host {host:?}, oracle {oracle:?}, events {events:?}\n  {packet:02x?}"
            ));
        }
        if let Some(why) = edge_disagrees(&mut r, packet, i % 4, host) {
            failures.push(format!("packet {i}: {why}\n  {packet:02x?}"));
        }
    }
    println!(
        "kernel verdicts on {} generated packets: {counts:#?}",
        packets.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} packets disagree:\n{}",
        failures.len(),
        packets.len(),
        failures[..failures.len().min(10)].join("\n")
    );
    for family in ["v4", "v6"] {
        for label in [
            "pass",
            "drop destination",
            "drop source_route",
            "drop unparseable",
            "drop tunnel",
        ] {
            let n = counts
                .get(&format!("{family} {label}"))
                .copied()
                .unwrap_or(0);
            assert!(
                n >= 50,
                "only {n} generated packets were {family} {label}: {counts:?}"
            );
        }
    }
}
