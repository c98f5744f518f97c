//! The classifier against an independent oracle (`support/oracle.rs`: etherparse and
//! `std::net`, never the code under test) on generated packets with IPv4 options, IPv6
//! extension headers and embedded IPv4 destinations. Every disagreement fails: verdict,
//! reason, the destination field, and the protocol and port the audit record reports.

mod support;

use std::{collections::BTreeMap, net::IpAddr};

use datalab_guard_common::{
    cidr::{prefilter, Cidr},
    classify::{classify_packet, fast_path_pass, Attempt, FastHeader, PacketClass, Reason},
    TunnelConfig,
};
use proptest::prelude::*;
use support::{
    oracle::{judge, Expected, Judgement, Net, Why},
    packet_gen::{blocked_nets, packet, seeded_packets, seeded_tunnel_packets},
};

fn cidrs(nets: &[Net]) -> Vec<Cidr> {
    nets.iter()
        .map(|n| match n.addr {
            IpAddr::V4(a) => Cidr::v4(a.octets(), n.prefix).unwrap(),
            IpAddr::V6(a) => Cidr::v6(a.octets(), n.prefix).unwrap(),
        })
        .collect()
}

fn why(reason: Reason) -> Option<Why> {
    match reason {
        Reason::Destination => Some(Why::Destination),
        Reason::SourceRoute => Some(Why::SourceRoute),
        Reason::Unparseable => Some(Why::Unparseable),
        Reason::Tunnel => Some(Why::Tunnel),
        Reason::RawSocket | Reason::TunnelDenied => None,
    }
}

/// `Err(description)` when the classifier and the oracle disagree on `pkt`.
fn compare(pkt: &[u8], set: &[Cidr], nets: &[Net]) -> Result<Expected, String> {
    let expected = judge(pkt, nets);
    let got = classify_packet(pkt, set);
    let check_attempt = |a: &Attempt| -> Result<(), String> {
        if a.dst != expected.dst {
            return Err(format!("dst {:?}, oracle {:?}", a.dst, expected.dst));
        }
        match expected.l4 {
            Some(l4) if (a.proto, a.dport) != l4 => Err(format!(
                "(proto, dport) ({}, {}), oracle {l4:?}",
                a.proto, a.dport
            )),
            _ => Ok(()),
        }
    };
    let result = match (got, expected.judgement) {
        (PacketClass::NotIp, Judgement::NotIp) => Ok(()),
        (PacketClass::Pass(a), Judgement::Pass) => check_attempt(&a),
        (PacketClass::Blocked(a, r), Judgement::Blocked(w)) if why(r) == Some(w) => {
            check_attempt(&a)
        }
        (got, want) => Err(format!("classifier {got:?}, oracle {want:?}")),
    };
    result
        .map(|()| expected)
        .map_err(|e| format!("{e}\npacket {pkt:02x?}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 10_000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn classifier_matches_the_oracle(pkt in packet()) {
        let nets = blocked_nets();
        let set = cidrs(&nets);
        if let Err(e) = compare(&pkt, &set, &nets) {
            prop_assert!(false, "{}", e);
        }
    }

    /// The fast path may only pass what the oracle passes.
    #[test]
    fn fast_path_never_passes_what_the_oracle_blocks(pkt in packet()) {
        let nets = blocked_nets();
        let set = cidrs(&nets);
        let (m4, m6) = prefilter(set.iter());
        let tunnels = TunnelConfig::defaults();
        if fast_path_pass(FastHeader::of(&pkt), &m4, &m6, &tunnels) {
            prop_assert_eq!(
                judge(&pkt, &nets).judgement,
                Judgement::Pass,
                "fast path passed {:02x?}", pkt
            );
        }
    }
}

/// The generator reaches every verdict and reason often enough for the comparison to mean
/// something (a generator that only made plain packets would pass the property above).
#[test]
fn generated_packets_cover_every_verdict() {
    let nets = blocked_nets();
    let set = cidrs(&nets);
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    let mut tunnel_counts: BTreeMap<String, usize> = BTreeMap::new();
    for pkt in &seeded_tunnel_packets(17, 3000) {
        match compare(pkt, &set, &nets) {
            Ok(e) => {
                *tunnel_counts
                    .entry(format!("{:?}", e.judgement))
                    .or_default() += 1;
            }
            Err(e) => panic!("disagreement on an encapsulated packet: {e}"),
        }
    }
    println!("oracle verdicts on 3000 seeded encapsulated packets: {tunnel_counts:#?}");
    for judgement in ["Pass", "Blocked(Tunnel)"] {
        let n = tunnel_counts.get(judgement).copied().unwrap_or(0);
        assert!(n >= 300, "only {n} encapsulated packets judged {judgement}");
    }
    let mut failures = Vec::new();
    let packets = seeded_packets(13, 5000);
    for pkt in &packets {
        match compare(pkt, &set, &nets) {
            Ok(e) => {
                let family = if pkt[0] >> 4 == 6 { "v6" } else { "v4" };
                *counts
                    .entry(format!("{family} {:?}", e.judgement))
                    .or_default() += 1;
            }
            Err(e) => failures.push(e),
        }
    }
    println!(
        "oracle verdicts on {} seeded packets: {counts:#?}",
        packets.len()
    );
    assert!(
        failures.is_empty(),
        "{} disagreements, first: {}",
        failures.len(),
        failures[0]
    );
    for family in ["v4", "v6"] {
        for judgement in [
            "Pass",
            "Blocked(Destination)",
            "Blocked(SourceRoute)",
            "Blocked(Unparseable)",
        ] {
            let n = counts
                .get(&format!("{family} {judgement}"))
                .copied()
                .unwrap_or(0);
            assert!(
                n >= 50,
                "only {n} generated packets judged {family} {judgement}"
            );
        }
    }
}
