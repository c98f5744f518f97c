//! The cluster-wide controller: leader election on a Lease ([`leader`]), the
//! `allow-web-egress` NetworkPolicy and Pod Security checks ([`provision`], [`psa`]).

pub mod leader;
pub mod provision;
pub mod psa;
