//! Fuzzes the destination classifier with arbitrary packets and blocked sets, against the
//! independent oracle of the property tests (etherparse + `std::net`,
//! `datalab-guard-common/tests/support/oracle.rs`).
//! Run: `cargo xtask fuzz --seconds N` (nightly and cargo-fuzz; CI runs it for a minute).
//!
//! Invariants: no panic; the classifier's verdict and reason are the oracle's, and so are
//! the destination, protocol and port it reports (for encapsulations, with the default
//! tunnel ports, the inner packet's); the fast-path test never passes a packet the full
//! classifier blocks.
#![no_main]

#[path = "../../datalab-guard-common/tests/support/oracle.rs"]
mod oracle;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use datalab_guard_common::{
    cidr::{prefilter, Cidr},
    classify::{classify_packet, fast_path_pass, Attempt, FastHeader, PacketClass, Reason},
    TunnelConfig,
};
use libfuzzer_sys::fuzz_target;
use oracle::{judge, Judgement, Net, Why};

fn same_attempt(a: &Attempt, e: &oracle::Expected) -> bool {
    a.dst == e.dst && e.l4.is_none_or(|l4| (a.proto, a.dport) == l4)
}

fuzz_target!(|data: &[u8]| {
    // The first 22 bytes choose the blocked set: a v4 and a v6 CIDR.
    if data.len() < 22 {
        return;
    }
    let (head, packet) = data.split_at(22);
    let a4 = [head[0], head[1], head[2], head[3]];
    let p4 = head[4] % 33;
    let mut a6 = [0u8; 16];
    a6.copy_from_slice(&head[5..21]);
    let p6 = head[21] % 129;
    let set = [Cidr::v4(a4, p4).unwrap(), Cidr::v6(a6, p6).unwrap()];
    let nets = [
        Net {
            addr: IpAddr::V4(Ipv4Addr::from(a4)),
            prefix: p4,
        },
        Net {
            addr: IpAddr::V6(Ipv6Addr::from(a6)),
            prefix: p6,
        },
    ];
    let class = classify_packet(packet, &set[..]);
    let expected = judge(packet, &nets);
    let agree = match (class, expected.judgement) {
        (PacketClass::NotIp, Judgement::NotIp) => true,
        (PacketClass::Pass(a), Judgement::Pass) => same_attempt(&a, &expected),
        (PacketClass::Blocked(a, r), Judgement::Blocked(w)) => {
            let same_reason = matches!(
                (r, w),
                (Reason::Destination, Why::Destination)
                    | (Reason::SourceRoute, Why::SourceRoute)
                    | (Reason::Unparseable, Why::Unparseable)
                    | (Reason::Tunnel, Why::Tunnel)
            );
            same_reason && same_attempt(&a, &expected)
        }
        _ => false,
    };
    assert!(agree, "classifier {class:?}, oracle {expected:?}");

    let (m4, m6) = prefilter(set.iter());
    if packet.len() >= 40 || (packet.len() >= 20 && packet[0] >> 4 != 6) {
        let tunnels = TunnelConfig::defaults();
        if fast_path_pass(FastHeader::of(packet), &m4, &m6, &tunnels) {
            assert!(
                !matches!(class, PacketClass::Blocked(..)),
                "fast path passed a blocked packet"
            );
        }
    }
});
