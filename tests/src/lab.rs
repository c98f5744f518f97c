//! [`Lab`]: an isolated two-host network for one test.
//!
//! ```text
//!   tenant namespace                         metadata host namespace
//!   veth-tenant ─────────── veth pair ────────── veth-imds
//!   192.0.2.2/24                             169.254.169.254/16  (IMDS, v4)
//!   169.254.1.2/16                           192.0.2.1/24        ("other" v4 host)
//!   2001:db8::2/64                           fd00:ec2::254/64    (IMDS, v6)
//!   default via 192.0.2.1 / 2001:db8::1      2001:db8::1/64      ("other" v6 host)
//!                                            nftables ingress counters, dg-fake-imds
//! ```
//!
//! Both namespaces and the veth pair are created by the lab and live only inside those two
//! namespaces: the veth is created *in* the tenant namespace with its peer placed directly in
//! the metadata namespace, so no interface, route or rule of the machine's root namespace is
//! ever touched and nothing can leak to the real network (TOOLCHAIN.md's test network rule).
//! Deleting the namespaces on drop destroys the veth pair with them.
//!
//! Packets are counted on the metadata host's side by an nftables `netdev` table whose chain
//! hooks *ingress* of its veth: that is the earliest point a packet can be seen, before any IP
//! validation, socket lookup or firewall, so it counts TCP SYNs, UDP, ICMP and hand-built raw
//! packets alike. "Zero IMDS packets" therefore means nothing arrived, whatever the protocol.
//! Neighbour discovery is excluded (it is the kernel's own traffic, not the tenant's).

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    process::{Child, Output, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{
    bins, names,
    probe::{probe_in, ProbeResult},
    process::{command_in, display_argv, netns_path, run_checked, with_netns_thread},
};

/// The v4 metadata endpoint, on the metadata host.
pub const IMDS_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// The v6 metadata endpoint (AWS), on the metadata host.
pub const IMDS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254);
/// An ordinary v4 address of the metadata host, which tenants may reach.
pub const OTHER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// An ordinary v6 address of the metadata host, which tenants may reach.
pub const OTHER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// The tenant's v4 address (and default gateway side).
pub const TENANT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// The tenant's link-local v4 address, so 169.254.169.254 is on-link as in a cloud VM.
pub const TENANT_LINK_LOCAL_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 2);
/// The tenant's v6 address.
pub const TENANT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// Interface name of the tenant's end of the veth pair (inside the tenant namespace).
pub const TENANT_IF: &str = "veth-tenant";
/// Interface name of the metadata host's end (inside the metadata namespace).
pub const IMDS_IF: &str = "veth-imds";

/// A second pod added by [`Lab::add_second_pod`]: its interface (inside its namespace)...
pub const POD2_IF: &str = "veth-pod2";
/// ...and the host side of its veth pair (inside the metadata namespace, which then plays
/// the node's part for the pod-edge layer: every pod's veth peer lives there).
pub const POD2_HOST_IF: &str = "veth-imds2";

const NFT_TABLE: &str = "dglab";

/// Packets that reached the metadata host, per destination address (see module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketCounters {
    /// To 169.254.169.254.
    pub imds_v4: u64,
    /// To fd00:ec2::254.
    pub imds_v6: u64,
    /// To 192.0.2.1.
    pub other_v4: u64,
    /// To 2001:db8::1 (neighbour discovery excluded).
    pub other_v6: u64,
}

impl PacketCounters {
    /// Packets to either metadata endpoint.
    pub fn imds(&self) -> u64 {
        self.imds_v4 + self.imds_v6
    }

    /// Packets to `addr`, which must be one of the four counted addresses.
    pub fn to(&self, addr: IpAddr) -> Option<u64> {
        match addr {
            IpAddr::V4(a) if a == IMDS_V4 => Some(self.imds_v4),
            IpAddr::V6(a) if a == IMDS_V6 => Some(self.imds_v6),
            IpAddr::V4(a) if a == OTHER_V4 => Some(self.other_v4),
            IpAddr::V6(a) if a == OTHER_V6 => Some(self.other_v6),
            // ::ffff:a.b.c.d leaves the host as plain IPv4.
            IpAddr::V6(a) => a.to_ipv4_mapped().and_then(|v4| self.to(IpAddr::V4(v4))),
            _ => None,
        }
    }
}

/// The running fake metadata server and what it printed.
struct FakeImds {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

/// Two network namespaces joined by a veth pair; see the module docs. Dropping it kills the
/// fake metadata server and deletes both namespaces.
pub struct Lab {
    id: String,
    tenant_ns: String,
    imds_ns: String,
    created: Vec<String>,
    fake_imds: Option<FakeImds>,
}

impl std::fmt::Debug for Lab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lab")
            .field("tenant_ns", &self.tenant_ns)
            .field("imds_ns", &self.imds_ns)
            .field("fake_imds", &self.fake_imds.as_ref().map(|f| f.child.id()))
            .finish()
    }
}

impl Lab {
    /// Builds the lab with the kit's default name prefix.
    pub fn new() -> Result<Self> {
        Self::with_prefix(names::DEFAULT_PREFIX)
    }

    /// Builds the lab; namespaces are named `<prefix>-<pid>-<n>-tenant` / `...-imds`.
    /// Fails loudly if `ip` or `nft` is missing or the kernel refuses anything.
    pub fn with_prefix(prefix: &str) -> Result<Self> {
        let id = names::unique_name(prefix);
        let mut lab = Lab {
            tenant_ns: format!("{id}-tenant"),
            imds_ns: format!("{id}-imds"),
            id,
            created: Vec::new(),
            fake_imds: None,
        };
        // On error `lab` is dropped here and removes whatever was already created.
        lab.build()
            .with_context(|| format!("building network lab {}", lab.id))?;
        Ok(lab)
    }

    fn build(&mut self) -> Result<()> {
        for ns in [self.tenant_ns.clone(), self.imds_ns.clone()] {
            ip(&["netns", "add", &ns])?;
            self.created.push(ns.clone());
            // Before any interface exists: new interfaces skip duplicate address detection,
            // so v6 addresses (link-local included) are usable at once.
            set_sysctls(
                &ns,
                &[
                    ("net/ipv6/conf/all/accept_dad", "0"),
                    ("net/ipv6/conf/default/accept_dad", "0"),
                    ("net/ipv6/conf/default/accept_ra", "0"),
                    // Client and server TCP Fast Open; 0x200: the server accepts data in the
                    // SYN without a cookie, so a TFO probe's first packet carries its request.
                    ("net/ipv4/tcp_fastopen", "515"),
                    // Unprivileged-style ICMP echo sockets, as container runtimes allow.
                    ("net/ipv4/ping_group_range", "0 2147483647"),
                ],
            )?;
        }
        let (t, m) = (self.tenant_ns.as_str(), self.imds_ns.as_str());
        ip(&[
            "-n", t, "link", "add", TENANT_IF, "type", "veth", "peer", "name", IMDS_IF, "netns", m,
        ])?;

        for addr in ["169.254.169.254/16", "192.0.2.1/24"] {
            ip(&["-n", m, "addr", "add", addr, "dev", IMDS_IF])?;
        }
        for addr in ["fd00:ec2::254/64", "2001:db8::1/64"] {
            ip(&["-n", m, "-6", "addr", "add", addr, "dev", IMDS_IF, "nodad"])?;
        }
        for addr in ["192.0.2.2/24", "169.254.1.2/16"] {
            ip(&["-n", t, "addr", "add", addr, "dev", TENANT_IF])?;
        }
        ip(&[
            "-n",
            t,
            "-6",
            "addr",
            "add",
            "2001:db8::2/64",
            "dev",
            TENANT_IF,
            "nodad",
        ])?;
        for ns in [t, m] {
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", m, "link", "set", IMDS_IF, "up"])?;
        ip(&["-n", t, "link", "set", TENANT_IF, "up"])?;
        ip(&[
            "-n",
            t,
            "route",
            "add",
            "default",
            "via",
            "192.0.2.1",
            "dev",
            TENANT_IF,
        ])?;
        ip(&[
            "-n",
            t,
            "-6",
            "route",
            "add",
            "default",
            "via",
            "2001:db8::1",
            "dev",
            TENANT_IF,
        ])?;

        self.install_counters()?;
        self.wait_usable(Duration::from_secs(10))
    }

    fn install_counters(&self) -> Result<()> {
        let ruleset = format!(
            r#"table netdev {NFT_TABLE} {{
  counter imds_v4 {{ }}
  counter imds_v6 {{ }}
  counter other_v4 {{ }}
  counter other_v6 {{ }}
  chain ingress {{
    type filter hook ingress device "{IMDS_IF}" priority -500; policy accept;
    icmpv6 type {{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, nd-redirect }} accept
    ip daddr {IMDS_V4} counter name "imds_v4"
    ip6 daddr {IMDS_V6} counter name "imds_v6"
    ip daddr {OTHER_V4} counter name "other_v4"
    ip6 daddr {OTHER_V6} counter name "other_v6"
  }}
}}
"#
        );
        let mut cmd = command_in(None, Some(&self.imds_ns), &["nft", "-f", "-"])?;
        run_checked(
            &mut cmd,
            "nft -f - (packet counters in the metadata namespace)",
            Some(ruleset.as_bytes()),
        )
        .context("nftables is required for the lab's packet counters (apt-get install nftables)")?;
        Ok(())
    }

    /// Adds a second pod-like namespace `<id>-pod2` joined to the metadata namespace by its
    /// own veth pair ([`POD2_IF`] ↔ [`POD2_HOST_IF`], 198.51.100.2/24 ↔ .1), whose host side
    /// feeds the same packet counters. Returns the namespace's name; it is deleted with the
    /// lab.
    pub fn add_second_pod(&mut self) -> Result<String> {
        let ns = format!("{}-pod2", self.id);
        ip(&["netns", "add", &ns])?;
        self.created.push(ns.clone());
        let m = self.imds_ns.clone();
        ip(&[
            "-n",
            &ns,
            "link",
            "add",
            POD2_IF,
            "type",
            "veth",
            "peer",
            "name",
            POD2_HOST_IF,
            "netns",
            &m,
        ])?;
        ip(&["-n", &ns, "addr", "add", "198.51.100.2/24", "dev", POD2_IF])?;
        ip(&[
            "-n",
            &m,
            "addr",
            "add",
            "198.51.100.1/24",
            "dev",
            POD2_HOST_IF,
        ])?;
        for (n, dev) in [
            (ns.as_str(), POD2_IF),
            (ns.as_str(), "lo"),
            (m.as_str(), POD2_HOST_IF),
        ] {
            ip(&["-n", n, "link", "set", dev, "up"])?;
        }
        let ruleset = format!(
            r#"table netdev {NFT_TABLE} {{
  chain ingress_pod2 {{
    type filter hook ingress device "{POD2_HOST_IF}" priority -500; policy accept;
    ip daddr {IMDS_V4} counter name "imds_v4"
    ip6 daddr {IMDS_V6} counter name "imds_v6"
    ip daddr {OTHER_V4} counter name "other_v4"
  }}
}}
"#
        );
        let mut cmd = command_in(None, Some(&self.imds_ns), &["nft", "-f", "-"])?;
        run_checked(
            &mut cmd,
            "nft -f - (second pod's counters)",
            Some(ruleset.as_bytes()),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let link = ip(&["-n", &m, "link", "show", "dev", POD2_HOST_IF])?;
            if link.contains("LOWER_UP") && !link.contains("state DOWN") {
                return Ok(ns);
            }
            if Instant::now() > deadline {
                bail!("{POD2_HOST_IF} not up: {}", link.trim());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until both veth ends are up and no v6 address is tentative.
    fn wait_usable(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut pending = Vec::new();
            for (ns, dev) in [(&self.tenant_ns, TENANT_IF), (&self.imds_ns, IMDS_IF)] {
                let tentative = ip(&["-n", ns, "-6", "addr", "show", "dev", dev, "tentative"])?;
                if !tentative.trim().is_empty() {
                    pending.push(format!("{ns}: tentative v6 addresses:\n{tentative}"));
                }
                let link = ip(&["-n", ns, "link", "show", "dev", dev])?;
                if !link.contains("LOWER_UP") || link.contains("state DOWN") {
                    pending.push(format!("{ns}: {dev} not up yet: {}", link.trim()));
                }
            }
            if pending.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("lab not usable after {timeout:?}: {}", pending.join("; "));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The unique id shared by this lab's names (`<prefix>-<pid>-<n>`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Name of the tenant network namespace (as in `ip netns list`).
    pub fn tenant_ns(&self) -> &str {
        &self.tenant_ns
    }

    /// Name of the metadata host network namespace.
    pub fn imds_ns(&self) -> &str {
        &self.imds_ns
    }

    /// Runs `argv` in the metadata host namespace and returns its output (a non-zero exit is
    /// not an error; check `status`).
    pub fn run_in_imds<S: AsRef<std::ffi::OsStr>>(&self, argv: &[S]) -> Result<Output> {
        let mut cmd = command_in(None, Some(&self.imds_ns), argv)?;
        cmd.stdin(Stdio::null());
        cmd.output()
            .with_context(|| format!("running {} in {}", display_argv(argv), self.imds_ns))
    }

    /// Runs `argv` in the tenant namespace inside `cgroup` (joined before exec).
    pub fn run_in_tenant<S: AsRef<std::ffi::OsStr>>(
        &self,
        cgroup: &Path,
        argv: &[S],
    ) -> Result<Output> {
        crate::process::run_in(cgroup, Some(&self.tenant_ns), argv)
    }

    /// Runs one `dg-probe` attempt from the tenant namespace inside `cgroup`, default timeout.
    pub fn probe(
        &self,
        cgroup: &Path,
        kind: &str,
        addr: impl ToString,
        port: u16,
    ) -> Result<ProbeResult> {
        probe_in(
            cgroup,
            Some(&self.tenant_ns),
            kind,
            &addr.to_string(),
            port,
            None,
        )
    }

    /// Like [`Lab::probe`] with an explicit timeout in milliseconds.
    pub fn probe_timeout(
        &self,
        cgroup: &Path,
        kind: &str,
        addr: impl ToString,
        port: u16,
        timeout_ms: u64,
    ) -> Result<ProbeResult> {
        probe_in(
            cgroup,
            Some(&self.tenant_ns),
            kind,
            &addr.to_string(),
            port,
            Some(timeout_ms),
        )
    }

    /// Starts `dg-fake-imds` in the metadata namespace and waits until it printed `ready`
    /// (all of its sockets are bound). It is killed and reaped when the lab is dropped.
    pub fn start_fake_imds(&mut self) -> Result<()> {
        if self.fake_imds.is_some() {
            bail!("the fake metadata server is already running");
        }
        let bin = bins::fake_imds_bin()?;
        let mut cmd = command_in(None, Some(&self.imds_ns), &[bin.as_os_str()])?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped");
        let stderr = child.stderr.take().expect("piped");
        let out_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.trim() == "ready" {
                    let _ = ready_tx.send(());
                }
                out_log.lock().unwrap().push(line);
            }
        });
        let err_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                err_log.lock().unwrap().push(line);
            }
        });
        // Stored before waiting so that a failure below still kills and reaps it.
        self.fake_imds = Some(FakeImds { child, log });
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(()) => Ok(()),
            Err(_) => Err(anyhow!(
                "dg-fake-imds did not print `ready` within 10 s; its output: {:?}",
                self.fake_imds_log()
            )),
        }
    }

    /// Everything the fake metadata server printed so far (stdout and stderr; one line per
    /// request served).
    pub fn fake_imds_log(&self) -> Vec<String> {
        self.fake_imds
            .as_ref()
            .map(|f| f.log.lock().unwrap().clone())
            .unwrap_or_default()
    }

    /// Reads the metadata host's ingress counters.
    pub fn counters(&self) -> Result<PacketCounters> {
        let mut cmd = command_in(
            None,
            Some(&self.imds_ns),
            &[
                "nft", "-j", "list", "counters", "table", "netdev", NFT_TABLE,
            ],
        )?;
        let out = run_checked(&mut cmd, "nft -j list counters", None)?;
        parse_counters(&String::from_utf8_lossy(&out.stdout))
    }

    /// Packets that reached 169.254.169.254 or fd00:ec2::254 so far. Panics if the counters
    /// cannot be read: a test must never mistake "could not count" for "nothing arrived".
    pub fn imds_packets(&self) -> u64 {
        self.counters()
            .expect("reading the lab's nftables counters")
            .imds()
    }

    /// Packets that reached `addr` so far (one of the four counted metadata-host addresses;
    /// a v4-mapped v6 address counts as its v4 address). Panics on any other address.
    pub fn packets_to(&self, addr: IpAddr) -> u64 {
        self.counters()
            .expect("reading the lab's nftables counters")
            .to(addr)
            .unwrap_or_else(|| panic!("the lab does not count packets to {addr}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut f) = self.fake_imds.take() {
            let _ = f.child.kill();
            let _ = f.child.wait();
        }
        for ns in self.created.drain(..).rev() {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("datalab-guard-tests: could not delete network namespace {ns}: {e:#}");
            }
        }
    }
}

/// Runs `ip ARGS` and returns its stdout; fails with its stderr.
fn ip(args: &[&str]) -> Result<String> {
    let mut cmd = std::process::Command::new(crate::process::tool("ip".as_ref()));
    cmd.args(args);
    let out = run_checked(&mut cmd, &format!("ip {}", args.join(" ")), None)
        .context("iproute2 is required for the lab (apt-get install iproute2)")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes sysctls (paths relative to /proc/sys) inside namespace `ns`.
fn set_sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    with_netns_thread(ns, move || {
        for (key, value) in &settings {
            let path = format!("/proc/sys/{key}");
            std::fs::write(&path, value).with_context(|| format!("writing {value:?} to {path}"))?;
        }
        Ok(())
    })
    .with_context(|| format!("setting sysctls in namespace {ns}"))
}

/// Parses `nft -j list counters` output.
fn parse_counters(json: &str) -> Result<PacketCounters> {
    let v: serde_json::Value = serde_json::from_str(json).context("parsing nft JSON output")?;
    let items = v["nftables"]
        .as_array()
        .ok_or_else(|| anyhow!("no `nftables` array in {json}"))?;
    let mut c = PacketCounters::default();
    let mut seen = 0;
    for item in items {
        let Some(counter) = item.get("counter") else {
            continue;
        };
        let packets = counter["packets"]
            .as_u64()
            .ok_or_else(|| anyhow!("bad counter {counter}"))?;
        let slot = match counter["name"].as_str() {
            Some("imds_v4") => &mut c.imds_v4,
            Some("imds_v6") => &mut c.imds_v6,
            Some("other_v4") => &mut c.other_v4,
            Some("other_v6") => &mut c.other_v6,
            _ => continue,
        };
        *slot = packets;
        seen += 1;
    }
    if seen != 4 {
        bail!("expected 4 lab counters in nft output, found {seen}: {json}");
    }
    Ok(c)
}

/// Deletes network namespaces named `<prefix>-<pid>-<n>-...` whose owner process is gone.
pub fn cleanup_stale_netns(prefix: &str) -> Result<usize> {
    let dir = Path::new(crate::process::NETNS_DIR);
    if !dir.exists() {
        return Ok(0);
    }
    let mut removed = 0;
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if names::is_stale(&name, prefix) && netns_path(&name).exists() {
            ip(&["netns", "del", &name])?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nft_counters() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"counter": {"family": "netdev", "name": "imds_v4", "table": "dglab", "handle": 2, "packets": 3, "bytes": 180}},
            {"counter": {"family": "netdev", "name": "imds_v6", "table": "dglab", "handle": 3, "packets": 4, "bytes": 0}},
            {"counter": {"family": "netdev", "name": "other_v4", "table": "dglab", "handle": 4, "packets": 5, "bytes": 0}},
            {"counter": {"family": "netdev", "name": "other_v6", "table": "dglab", "handle": 5, "packets": 6, "bytes": 0}}]}"#;
        let c = parse_counters(json).unwrap();
        assert_eq!(
            c,
            PacketCounters {
                imds_v4: 3,
                imds_v6: 4,
                other_v4: 5,
                other_v6: 6
            }
        );
        assert_eq!(c.imds(), 7);
        assert_eq!(c.to("169.254.169.254".parse().unwrap()), Some(3));
        assert_eq!(c.to("::ffff:169.254.169.254".parse().unwrap()), Some(3));
        assert_eq!(c.to("fd00:ec2::254".parse().unwrap()), Some(4));
        assert_eq!(c.to("2001:db8::1".parse().unwrap()), Some(6));
        assert_eq!(c.to("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn missing_counters_are_an_error() {
        assert!(parse_counters(r#"{"nftables": [{"metainfo": {}}]}"#).is_err());
        assert!(parse_counters("not json").is_err());
    }
}
