//! Everything the eBPF programs and the agent must agree on: the `#[repr(C)]` layouts of
//! map keys, values and events, the map names (which are also the bpffs pin names), the
//! counter layout, and the in-kernel decisions: the destination classifier, the verdict
//! resolution over cgroup ancestors, and the audit rate limit.
//!
//! The decisions are written once, generic over how packet bytes, ancestors, map entries
//! and rate state are looked up, so the exact code that runs in the kernel is unit-tested
//! on the host (the classifier also property-tested against `std::net` and fuzzed).
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

pub mod cidr;
pub mod classify;
pub mod counters;
pub mod maps;
pub mod ratelimit;
pub mod resolve;
pub mod tunnel;
pub mod types;

pub use classify::{classify_packet, classify_packet_with, BlockedSet, PacketBytes, PacketClass};
pub use types::*;
