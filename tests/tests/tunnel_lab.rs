//! Tunnels end to end: a real Linux VXLAN device (and a Geneve one where the kernel has
//! Geneve) decapsulates on the metadata host of a lab, as an overlay CNI's endpoint does on
//! every node. A process in a guarded cgroup sends it, with a plain UDP socket, a datagram
//! whose inner packet goes to the metadata address (`dg-probe vxlan-imds`): the egress
//! program drops it (the `sendto` fails with EPERM), nothing comes out of the device, and
//! `blocked_total{hook="egress"}` counts the drop. The same datagram
//! from an exempt cgroup does come out of the device, which proves the lab would deliver
//! the guarded one if the guard let it through.
//!
//! "Came out of the device" is counted by an nftables `netdev` chain on the tunnel device's
//! ingress: the decapsulated frame, before the IP layer. The devices live in the lab's
//! metadata namespace and go with it. Needs root.

use std::time::Duration;

use datalab_guard_tests::{require_root, Lab, LocalGuard};

/// The metadata host's address the tenant reaches its tunnel endpoint at.
const VTEP: &str = "192.0.2.1";
/// The tenant's address: a Geneve device only accepts its configured remote.
const TENANT: &str = "192.0.2.2";
const VXLAN_IF: &str = "dgvx0";
const GENEVE_IF: &str = "dggn0";
/// The tunnel device's MAC, so that the inner frame is addressed to it.
const TUNNEL_MAC: &str = "02:00:00:00:42:01";
const NFT_TABLE: &str = "dgtunnel";

/// The lab, the agent guarding `tenant` and exempting `exempt`. Fields drop in order:
/// agent, pins, cgroups, network (with the tunnel devices in it).
struct TunnelLab {
    guard: LocalGuard,
    lab: Lab,
}

impl TunnelLab {
    fn start() -> TunnelLab {
        let lab = Lab::new().expect("lab");
        let guard = LocalGuard::start(&[]).expect("local agent");
        TunnelLab { guard, lab }
    }

    /// Runs a command in the metadata namespace; its stdout, or its stderr as the error.
    fn imds(&self, argv: &[&str]) -> Result<String, String> {
        let out = self
            .lab
            .run_in_imds(argv)
            .expect("run in the metadata namespace");
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "`{}` failed: {}",
                argv.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Creates the tunnel device `name` (`ip link add name <kind args>`), up, with a
    /// counter of inner packets to 169.254.169.254 on its ingress.
    fn add_endpoint(&self, name: &str, kind_args: &[&str]) -> Result<(), String> {
        let mut add = vec!["ip", "link", "add", name, "address", TUNNEL_MAC];
        add.extend_from_slice(kind_args);
        self.imds(&add)?;
        self.imds(&["ip", "link", "set", name, "up"])?;
        let rules = format!(
            "table netdev {NFT_TABLE}_{name} {{\n  chain inner {{\n    type filter hook \
             ingress device {name} priority 0;\n    ip daddr 169.254.169.254 counter\n  }}\n}}\n"
        );
        let file = std::env::temp_dir().join(format!("{}-{name}.nft", self.lab.id()));
        std::fs::write(&file, rules).expect("write nft rules");
        let loaded = self.imds(&["nft", "-f", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        loaded.map(drop)
    }

    /// Inner packets to the metadata address that came out of tunnel device `name`.
    fn inner_arrivals(&self, name: &str) -> u64 {
        let table = format!("{NFT_TABLE}_{name}");
        let listing = self
            .imds(&["nft", "list", "table", "netdev", &table])
            .expect("list the counter");
        listing
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no packet counter in {listing}"))
    }

    /// Sends one encapsulated datagram (`dg-probe KIND VTEP PORT`) from `cgroup`: whether
    /// it left the socket. The socket hooks see an ordinary destination and let it through;
    /// when the egress program drops it, the kernel fails the `sendto` with EPERM.
    fn send(&self, cgroup: &std::path::Path, kind: &str, port: u16) -> bool {
        std::env::set_var("DG_PROBE_INNER_MAC", TUNNEL_MAC);
        let r = self
            .lab
            .probe_timeout(cgroup, kind, VTEP, port, 1000)
            .unwrap_or_else(|e| panic!("{kind}: {e:#}"));
        assert!(
            r.ok || r.is_eperm(),
            "{kind} from {}: {r:?}",
            cgroup.display()
        );
        r.ok
    }

    fn egress_blocked(&self) -> u64 {
        let text = self
            .guard
            .agent
            .metrics(self.guard.metrics)
            .expect("metrics");
        text.lines()
            .filter(|l| {
                l.starts_with("datalab_guard_blocked_total{")
                    && l.contains("hook=\"egress\"")
                    && l.contains("family=\"ipv4\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    }

    /// The guarded send arrives nowhere and is counted; the exempt one arrives.
    fn check_endpoint(&self, name: &str, kind: &str, port: u16) {
        let blocked_before = self.egress_blocked();
        for _ in 0..3 {
            assert!(
                !self.send(&self.guard.guarded, kind, port),
                "{kind}: the guarded datagram must be refused at egress (EPERM)"
            );
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(
            self.inner_arrivals(name),
            0,
            "{kind}: an inner packet from the guarded cgroup came out of {name}"
        );
        assert_eq!(
            self.egress_blocked() - blocked_before,
            3,
            "{kind}: each guarded datagram is counted once at egress"
        );
        let reasons: Vec<String> = self
            .guard
            .agent
            .audit_events()
            .iter()
            .filter_map(|e| e["reason"].as_str().map(str::to_owned))
            .collect();
        assert!(
            reasons.iter().any(|r| r == "tunnel"),
            "{kind}: an audit line with reason tunnel: {reasons:?}"
        );
        assert!(
            self.send(&self.guard.exempt, kind, port),
            "{kind}: the exempt datagram must leave"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while self.inner_arrivals(name) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            self.inner_arrivals(name),
            1,
            "{kind}: the exempt cgroup's inner packet must come out of {name} (else the lab \
             proves nothing)"
        );
    }
}

#[test]
fn an_encapsulated_packet_to_the_metadata_address_never_leaves_the_far_tunnel_device() {
    if !require_root() {
        return;
    }
    let t = TunnelLab::start();
    t.add_endpoint(
        VXLAN_IF,
        &[
            "type", "vxlan", "id", "42", "dstport", "4789", "local", VTEP,
        ],
    )
    .expect("a VXLAN device in the lab");
    t.check_endpoint(VXLAN_IF, "vxlan-imds", 4789);
    // Geneve where the kernel has it (this project's CI host builds VXLAN in but not
    // Geneve; Debian's kernels have both).
    match t.add_endpoint(GENEVE_IF, &["type", "geneve", "id", "42", "remote", TENANT]) {
        Ok(()) => t.check_endpoint(GENEVE_IF, "geneve-imds", 6081),
        Err(why) if why.contains("Unknown device type") => {
            println!("geneve: not checked, this kernel has no Geneve device: {why}");
        }
        Err(why) => panic!("a Geneve device in the lab: {why}"),
    }
}
