//! Property tests of the classifier against `std::net`: CIDR membership, embedded IPv4
//! forms, and whole-packet judgements on generated IPv4/IPv6 packets, plus "never panics"
//! on arbitrary bytes (what the kernel side could be handed by a raw socket).

use std::net::{Ipv4Addr, Ipv6Addr};

use datalab_guard_common::{
    cidr::{first_byte_may_match, prefilter, Cidr},
    classify::{
        classify_packet, embedded_v4, fast_path_pass, v6_blocked, FastHeader, PacketClass, Reason,
    },
    TunnelConfig,
};
use proptest::prelude::*;

fn std_v4_contains(net: Ipv4Addr, prefix: u8, ip: Ipv4Addr) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    };
    (u32::from(net) & mask) == (u32::from(ip) & mask)
}

fn std_v6_contains(net: Ipv6Addr, prefix: u8, ip: Ipv6Addr) -> bool {
    let mask = if prefix == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(prefix))
    };
    (u128::from(net) & mask) == (u128::from(ip) & mask)
}

/// Addresses near a network, so membership is true often enough to matter.
fn near_v4() -> impl Strategy<Value = (u32, u8, u32)> {
    (any::<u32>(), 0u8..=32, any::<u32>(), 0u32..=32).prop_map(|(net, prefix, noise, flip_bits)| {
        let ip = if flip_bits == 32 {
            noise
        } else {
            net ^ (noise & ((1u64 << flip_bits) - 1) as u32)
        };
        (net, prefix, ip)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn v4_membership_matches_std((net, prefix, ip) in near_v4()) {
        let cidr = Cidr::v4(net.to_be_bytes(), prefix).unwrap();
        prop_assert_eq!(cidr.contains_v4(ip.to_be_bytes()), std_v4_contains(net.into(), prefix, ip.into()));
    }

    #[test]
    fn v6_membership_matches_std(net in any::<u128>(), prefix in 0u8..=128, noise in any::<u128>(), flip in 0u32..=128) {
        let ip = if flip == 128 { noise } else { net ^ (noise & ((1u128 << flip) - 1)) };
        let cidr = Cidr::v6(net.to_be_bytes(), prefix).unwrap();
        prop_assert_eq!(cidr.contains_v6(ip.to_be_bytes()), std_v6_contains(net.into(), prefix, ip.into()));
    }

    #[test]
    fn mapped_addresses_match_std(v4 in any::<u32>(), v6 in any::<u128>()) {
        let mapped = Ipv4Addr::from(v4).to_ipv6_mapped();
        prop_assert_eq!(embedded_v4(&mapped.octets()), Some(v4.to_be_bytes()));
        let addr = Ipv6Addr::from(v6);
        let nat64 = addr.segments()[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
        let expected = addr.to_ipv4_mapped().map(|a| a.octets()).or(if nat64 { Some(addr.octets()[12..].try_into().unwrap()) } else { None });
        prop_assert_eq!(embedded_v4(&addr.octets()), expected);
    }

    #[test]
    fn prefilter_never_hides_a_blocked_v4_address((net, prefix, ip) in near_v4()) {
        let cidr = Cidr::v4(net.to_be_bytes(), prefix).unwrap();
        let (v4, _) = prefilter([cidr].iter());
        if cidr.contains_v4(ip.to_be_bytes()) {
            prop_assert!(first_byte_may_match(&v4, ip.to_be_bytes()[0]));
        }
    }

    #[test]
    fn prefilter_never_hides_a_blocked_v6_address(net in any::<u128>(), prefix in 0u8..=128, noise in any::<u128>(), flip in 0u32..=128) {
        let ip = if flip == 128 { noise } else { net ^ (noise & ((1u128 << flip) - 1)) };
        let cidr = Cidr::v6(net.to_be_bytes(), prefix).unwrap();
        let (_, v6) = prefilter([cidr].iter());
        if cidr.contains_v6(ip.to_be_bytes()) {
            prop_assert!(first_byte_may_match(&v6, ip.to_be_bytes()[0]));
        }
    }

    /// Plain IPv4 packets: blocked exactly when std says the destination is in a CIDR, and
    /// the fast path never passes a packet the full classifier would block.
    #[test]
    fn plain_v4_packets_match_std((net, prefix, dst) in near_v4(), proto in any::<u8>(), tail in proptest::collection::vec(any::<u8>(), 0..40)) {
        let set = [Cidr::v4(net.to_be_bytes(), prefix).unwrap()];
        let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0, 10, 0, 0, 1];
        p.extend_from_slice(&dst.to_be_bytes());
        p.extend_from_slice(&tail);
        let expected = std_v4_contains(net.into(), prefix, dst.into());
        // The tail may happen to be an encapsulated packet the tunnel rules refuse (protocol
        // 4, 41, 47): that is not the destination rule this property is about.
        let got = matches!(classify_packet(&p[..], &set[..]), PacketClass::Blocked(_, r) if r != Reason::Tunnel);
        prop_assert_eq!(got, expected);
        let (m4, m6) = prefilter(set.iter());
        if fast_path_pass(FastHeader::of(&p), &m4, &m6, &TunnelConfig::defaults()) {
            prop_assert!(!expected);
        }
    }

    #[test]
    fn plain_v6_packets_match_std(net in any::<u128>(), prefix in 0u8..=128, noise in any::<u128>(), flip in 0u32..=128, next in prop_oneof![Just(6u8), Just(17), Just(58), Just(132), Just(59)]) {
        let dst = if flip == 128 { noise } else { net ^ (noise & ((1u128 << flip) - 1)) };
        let set = [Cidr::v6(net.to_be_bytes(), prefix).unwrap()];
        let mut p = [0u8; 48];
        p[0] = 0x60;
        p[6] = next;
        p[24..40].copy_from_slice(&dst.to_be_bytes());
        let expected = std_v6_contains(net.into(), prefix, dst.into())
            || v6_blocked(&set[..], dst.to_be_bytes());
        let got = matches!(classify_packet(&p[..], &set[..]), PacketClass::Blocked(..));
        prop_assert_eq!(got, expected);
        let (m4, m6) = prefilter(set.iter());
        if fast_path_pass(FastHeader::of(&p), &m4, &m6, &TunnelConfig::defaults()) {
            prop_assert!(!expected);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let set = [Cidr::v4([169, 254, 169, 254], 32).unwrap(), Cidr::v6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254).octets(), 128).unwrap()];
        let _ = classify_packet(&bytes[..], &set[..]);
    }
}
