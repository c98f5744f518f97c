//! Everything the eBPF programs and the agent must agree on: the `#[repr(C)]` layouts of
//! map keys, values and events, the map names (which are also the bpffs pin names), the
//! counter layout, and the destination classifier.
//!
//! The classifier is written once, generic over how packet bytes are read and how the
//! blocked set is looked up, so the exact code that runs in the kernel is unit-tested,
//! property-tested against `std::net` and fuzzed on the host.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod cidr;
pub mod classify;
pub mod counters;
pub mod maps;
pub mod types;

pub use classify::{classify_packet, BlockedSet, PacketBytes, PacketClass};
pub use types::*;
