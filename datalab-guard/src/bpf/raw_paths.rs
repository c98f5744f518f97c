//! Whether the paths around the IP stack (AF_PACKET, AF_XDP: frames that no socket-address
//! or cgroup_skb hook sees) are closed on this node, read from the pins alone, for `status`
//! and `check`: by the BPF LSM program (`--deny-raw-sockets`), by the pod-edge layer
//! (interfaces under `<bpffs>/edge/`), both, or neither.

use datalab_guard_common::maps::programs;

use super::{edge, PinLayout};

/// What closes raw paths under one bpffs directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawPaths {
    /// The BPF LSM program's link is pinned and the config turns it on.
    pub lsm: bool,
    /// Interfaces (host-side ifindex) with the edge program.
    pub edge_interfaces: Vec<u32>,
}

impl RawPaths {
    /// Reads the pins; `deny_raw_sockets` is the CONFIG map's switch.
    pub fn read(layout: &PinLayout, deny_raw_sockets: bool) -> RawPaths {
        let lsm = deny_raw_sockets && layout.link(programs::PACKET_SOCKET).exists();
        let edge_interfaces = edge::attached(layout)
            .map(|records| records.iter().map(|r| r.ifindex).collect())
            .unwrap_or_default();
        RawPaths {
            lsm,
            edge_interfaces,
        }
    }

    /// `bpf_lsm`, `edge_layer`, `bpf_lsm+edge_layer` or `neither` (status JSON `raw_paths`).
    pub fn label(&self) -> &'static str {
        match (self.lsm, !self.edge_interfaces.is_empty()) {
            (true, true) => "bpf_lsm+edge_layer",
            (true, false) => "bpf_lsm",
            (false, true) => "edge_layer",
            (false, false) => "neither",
        }
    }

    /// One line for people.
    pub fn describe(&self) -> String {
        let edge = match self.edge_interfaces.len() {
            0 => None,
            1 => Some("edge layer (1 pod interface)".to_owned()),
            n => Some(format!("edge layer ({n} pod interfaces)")),
        };
        match (self.lsm, edge) {
            (true, Some(edge)) => format!("BPF LSM and {edge}"),
            (true, None) => "BPF LSM".to_owned(),
            (false, Some(edge)) => format!("{edge}; pods without a covered interface rely on dropping NET_RAW"),
            (false, None) => "neither (no BPF LSM program, no edge layer): a tenant with CAP_NET_RAW can send AF_PACKET frames".to_owned(),
        }
    }

    pub fn closed(&self) -> bool {
        self.lsm || !self.edge_interfaces.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_name_what_closes_raw_paths() {
        let r = |lsm, n: u32| RawPaths {
            lsm,
            edge_interfaces: (1..=n).collect(),
        };
        assert_eq!(r(false, 0).label(), "neither");
        assert!(!r(false, 0).closed());
        assert!(r(false, 0).describe().starts_with("neither"));
        assert_eq!(r(true, 0).label(), "bpf_lsm");
        assert_eq!(r(false, 2).label(), "edge_layer");
        assert!(r(false, 2).describe().contains("2 pod interfaces"));
        assert_eq!(r(true, 1).label(), "bpf_lsm+edge_layer");
        assert!(r(true, 1).closed());
    }

    #[test]
    fn an_empty_directory_has_neither() {
        let dir = std::env::temp_dir().join(format!("dg-raw-paths-{}", std::process::id()));
        let r = RawPaths::read(&PinLayout::new(&dir), true);
        assert_eq!(r.label(), "neither");
    }
}
