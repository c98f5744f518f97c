//! The eBPF object built from `datalab-guard-ebpf` by build.rs, embedded in the binary.

use aya::include_bytes_aligned;

/// The object file (ELF, BTF included).
pub static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datalab-guard"));

/// Identity of the embedded programs, recorded in the META map. A running install whose
/// hash differs is upgraded (new links attached before old ones are detached). FNV-1a: a
/// stable function, unlike std's hasher, so the same object always has the same hash.
pub fn object_hash() -> u64 {
    fnv1a(OBJECT)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_vectors() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    #[test]
    fn object_is_an_ebpf_elf() {
        assert_eq!(&OBJECT[..4], b"\x7fELF");
        // e_machine 247 = EM_BPF, little endian.
        assert_eq!(u16::from_le_bytes([OBJECT[18], OBJECT[19]]), 247);
    }
}
