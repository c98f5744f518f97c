//! Fuzzes the destination classifier with arbitrary packets and blocked sets.
//! Run: `cargo +nightly fuzz run classify` (needs cargo-fuzz; not run in CI).
//!
//! Invariants: no panic; the fast-path test never passes a packet the full classifier
//! blocks; a packet whose plain destination is in the set is always blocked.
#![no_main]

use datalab_guard_common::{
    cidr::{prefilter, Cidr},
    classify::{classify_packet, fast_path_pass, v4_blocked, v6_blocked, PacketClass},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // First bytes choose the blocked set: a v4 and a v6 CIDR.
    if data.len() < 22 {
        return;
    }
    let (head, packet) = data.split_at(22);
    let v4 = Cidr::v4([head[0], head[1], head[2], head[3]], head[4] % 33).unwrap();
    let mut a6 = [0u8; 16];
    a6.copy_from_slice(&head[5..21]);
    let v6 = Cidr::v6(a6, head[21] % 129).unwrap();
    let set = [v4, v6];
    let class = classify_packet(packet, &set[..]);
    let (m4, m6) = prefilter(set.iter());
    if packet.len() >= 40 || (packet.len() >= 20 && packet[0] >> 4 != 6) {
        let next = if packet[0] >> 4 == 6 { packet[6] } else { 0 };
        let dst_first = if packet[0] >> 4 == 6 { packet[24] } else { packet[16] };
        if fast_path_pass(packet[0], next, dst_first, &m4, &m6) {
            assert!(!matches!(class, PacketClass::Blocked(..)), "fast path passed a blocked packet");
        }
    }
    match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            if v4_blocked(&set[..], [packet[16], packet[17], packet[18], packet[19]]) {
                assert!(matches!(class, PacketClass::Blocked(..)));
            }
        }
        Some(6) if packet.len() >= 40 => {
            let mut dst = [0u8; 16];
            dst.copy_from_slice(&packet[24..40]);
            if v6_blocked(&set[..], dst) {
                assert!(matches!(class, PacketClass::Blocked(..)));
            }
        }
        _ => {}
    }
});
