//! Test support shared by the host property tests (`classifier_oracle.rs`) and the kernel
//! comparison in `tests/tests/packets.rs` (included there by path): a generator of IPv4 and
//! IPv6 packets with options, extension headers and embedded IPv4 destinations, and an
//! oracle that judges them without the code under test.

pub mod oracle;
pub mod packet_gen;
