//! The Kubernetes side of the node agent: the client, the node-local caches of namespaces
//! and pods, conversion into the policy core's plain types, and Events on offending pods.
//! Nothing here decides a verdict (that is `policy`) or touches the kernel (`bpf`).

pub mod backoff;
pub mod client;
pub mod convert;
pub mod events;
pub mod informer;
pub mod retry;
pub mod store;
pub mod taint;
pub mod watch;

pub use client::connect;
pub use watch::{ClusterView, WatchHealth};
