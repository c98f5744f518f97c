//! CIDR values in the form the LPM tries store them, and the first-byte prefilter bitmaps
//! the eBPF fast path tests before any trie lookup.

/// An IPv4 or IPv6 prefix with host bits cleared.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cidr {
    V4 { addr: [u8; 4], prefix: u8 },
    V6 { addr: [u8; 16], prefix: u8 },
}

impl Cidr {
    /// Builds a CIDR, clearing host bits. `None` when the prefix is too long.
    pub fn v4(addr: [u8; 4], prefix: u8) -> Option<Cidr> {
        if prefix > 32 {
            return None;
        }
        Some(Cidr::V4 {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    pub fn v6(addr: [u8; 16], prefix: u8) -> Option<Cidr> {
        if prefix > 128 {
            return None;
        }
        Some(Cidr::V6 {
            addr: mask(addr, prefix),
            prefix,
        })
    }

    pub fn prefix(&self) -> u8 {
        match self {
            Cidr::V4 { prefix, .. } | Cidr::V6 { prefix, .. } => *prefix,
        }
    }

    pub fn contains_v4(&self, ip: [u8; 4]) -> bool {
        match self {
            Cidr::V4 { addr, prefix } => mask(ip, *prefix) == *addr,
            Cidr::V6 { .. } => false,
        }
    }

    pub fn contains_v6(&self, ip: [u8; 16]) -> bool {
        match self {
            Cidr::V6 { addr, prefix } => mask(ip, *prefix) == *addr,
            Cidr::V4 { .. } => false,
        }
    }
}

/// Clears every bit after the first `prefix` bits.
pub fn mask<const N: usize>(mut addr: [u8; N], prefix: u8) -> [u8; N] {
    let prefix = prefix as usize;
    for (i, byte) in addr.iter_mut().enumerate() {
        let bit_start = i * 8;
        if bit_start >= prefix {
            *byte = 0;
        } else if bit_start + 8 > prefix {
            let keep = prefix - bit_start; // 1..=7
            *byte &= 0xffu8 << (8 - keep);
        }
    }
    addr
}

/// Sets, in a 256-bit bitmap, every first byte that addresses in `addr/prefix` can have.
pub fn mark_first_byte(bitmap: &mut [u32; 8], first: u8, prefix: u8) {
    let span: u32 = if prefix >= 8 { 1 } else { 1 << (8 - prefix) };
    let start = u32::from(first) & !(span - 1);
    for b in start..start + span {
        bitmap[(b / 32) as usize] |= 1 << (b % 32);
    }
}

/// Tests one bit of a first-byte bitmap.
#[inline(always)]
pub fn first_byte_may_match(bitmap: &[u32; 8], first: u8) -> bool {
    bitmap[(first >> 5) as usize] & (1u32 << (first & 31)) != 0
}

/// The prefilter bitmaps for a set of CIDRs. Bit 0 of the IPv6 map is always set: embedded
/// IPv4 forms (mapped, compatible, NAT64) start with 0x00 and must reach the slow path.
pub fn prefilter<'a>(cidrs: impl IntoIterator<Item = &'a Cidr>) -> ([u32; 8], [u32; 8]) {
    let mut v4 = [0u32; 8];
    let mut v6 = [0u32; 8];
    mark_first_byte(&mut v6, 0, 8);
    for cidr in cidrs {
        match cidr {
            Cidr::V4 { addr, prefix } => mark_first_byte(&mut v4, addr[0], *prefix),
            Cidr::V6 { addr, prefix } => mark_first_byte(&mut v6, addr[0], *prefix),
        }
    }
    (v4, v6)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_clears_host_bits() {
        assert_eq!(mask([169, 254, 169, 254], 16), [169, 254, 0, 0]);
        assert_eq!(mask([255, 255, 255, 255], 0), [0, 0, 0, 0]);
        assert_eq!(mask([255, 255, 255, 255], 31), [255, 255, 255, 254]);
        assert_eq!(mask([0xff; 16], 9)[..3], [0xff, 0x80, 0]);
    }

    #[test]
    fn prefilter_covers_short_prefixes() {
        let cidrs = [
            Cidr::v4([169, 254, 169, 254], 32).unwrap(),
            Cidr::v4([100, 64, 0, 0], 2).unwrap(),
            Cidr::v6(
                [0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0x54],
                128,
            )
            .unwrap(),
        ];
        let (v4, v6) = prefilter(cidrs.iter());
        assert!(first_byte_may_match(&v4, 169));
        for b in 64..128u8 {
            assert!(first_byte_may_match(&v4, b), "{b}");
        }
        assert!(!first_byte_may_match(&v4, 10));
        assert!(!first_byte_may_match(&v4, 128));
        assert!(first_byte_may_match(&v6, 0xfd));
        assert!(first_byte_may_match(&v6, 0));
        assert!(!first_byte_may_match(&v6, 0x20));
    }

    #[test]
    fn zero_prefix_marks_everything() {
        let (v4, _) = prefilter([Cidr::v4([1, 2, 3, 4], 0).unwrap()].iter());
        assert!(v4.iter().all(|w| *w == u32::MAX));
    }
}
