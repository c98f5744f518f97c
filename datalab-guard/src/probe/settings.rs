//! What the probe loop is configured with ([`ProbeSettings`]): `probe.*` from the
//! configuration and the targets derived from the blocked set ([`targets_from_blocked`]).
//! The agent sends a fresh value through a `watch` channel on every reload; the loop reads
//! it before each round.

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use datalab_guard_common::cidr::Cidr;

use crate::config::{Config, ProbeConfig};

/// One set of probe settings, as the loop uses them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSettings {
    /// `probe.enabled`: when false the loop probes nothing and forgets earlier results.
    pub enabled: bool,
    /// `probe.interval`: from the end of one round to the start of the next.
    pub interval: Duration,
    /// `probe.jitter`: a random part of it is added to every wait, so that nodes do not
    /// probe in lockstep.
    pub jitter: Duration,
    /// `probe.timeout`: how long one connect may take.
    pub timeout: Duration,
    /// Where to connect (`probe.port` on the single-address blocked destinations). Empty:
    /// nothing to probe, treated like `enabled: false`.
    pub targets: Vec<SocketAddr>,
}

impl ProbeSettings {
    /// The settings for `config`, whose full blocked set (`config.blocklist()`) is `blocked`.
    pub fn from_config(config: &Config, blocked: &[Cidr]) -> Self {
        Self::new(
            &config.probe,
            targets_from_blocked(blocked, config.probe.port),
        )
    }

    /// `probe` with explicit targets (`probe.port` is not used).
    pub fn new(probe: &ProbeConfig, targets: Vec<SocketAddr>) -> Self {
        ProbeSettings {
            enabled: probe.enabled,
            interval: probe.interval.as_std(),
            jitter: probe.jitter.as_std(),
            timeout: probe.timeout.as_std(),
            targets,
        }
    }

    /// Whether these settings ask for any probing at all.
    pub fn probes(&self) -> bool {
        self.enabled && !self.targets.is_empty()
    }
}

/// The probe targets for a blocked set: every single-address CIDR (/32, /128) on `port`, in
/// order, without duplicates. Wider blocked ranges have no one address worth probing and
/// are skipped, and so are IPv6 link-local addresses (fe80::/10, e.g. OpenStack's), which
/// need an interface to be connected to.
pub fn targets_from_blocked(blocked: &[Cidr], port: u16) -> Vec<SocketAddr> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for cidr in blocked {
        let ip = match *cidr {
            Cidr::V4 { addr, prefix: 32 } => IpAddr::V4(Ipv4Addr::from(addr)),
            Cidr::V6 { addr, prefix: 128 } => {
                let v6 = Ipv6Addr::from(addr);
                if v6.segments()[0] & 0xffc0 == 0xfe80 {
                    continue;
                }
                IpAddr::V6(v6)
            }
            _ => continue,
        };
        let target = SocketAddr::new(ip, port);
        if seen.insert(target) {
            out.push(target);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{blocklist::parse_cidr, config::HumanDuration};

    const V4: &str = "169.254.169.254:80";
    const V6: &str = "[fd00:ec2::254]:80";

    #[test]
    fn targets_are_single_addresses() {
        let blocked: Vec<Cidr> = [
            "169.254.169.254/32",
            "fd00:ec2::254/128",
            "169.254.169.254",
            "100.64.0.0/10",
            "fe80::a9fe:a9fe/128",
            "fd00::/8",
            "168.63.129.16/32",
        ]
        .iter()
        .map(|s| parse_cidr(s).unwrap())
        .collect();
        let want: Vec<SocketAddr> = [V4, V6, "168.63.129.16:80"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(targets_from_blocked(&blocked, 80), want);
        assert_eq!(
            targets_from_blocked(&blocked, 8080)[0],
            "169.254.169.254:8080".parse().unwrap()
        );
        assert_eq!(targets_from_blocked(&[], 80), []);
    }

    #[test]
    fn settings_follow_the_config_and_its_blocked_set() {
        let mut config = Config {
            probe: ProbeConfig {
                enabled: true,
                interval: HumanDuration::from_secs(60),
                jitter: HumanDuration::from_millis(1500),
                timeout: HumanDuration::from_millis(700),
                port: 8080,
            },
            ..Config::default()
        };
        let blocked = vec![
            parse_cidr("169.254.169.254/32").unwrap(),
            parse_cidr("100.64.0.0/10").unwrap(),
        ];
        let settings = ProbeSettings::from_config(&config, &blocked);
        assert_eq!(
            settings,
            ProbeSettings {
                enabled: true,
                interval: Duration::from_secs(60),
                jitter: Duration::from_millis(1500),
                timeout: Duration::from_millis(700),
                targets: vec!["169.254.169.254:8080".parse().unwrap()],
            }
        );
        assert!(settings.probes());
        // The default blocked set always has single addresses to probe.
        assert!(!ProbeSettings::from_config(&config, &config.blocklist())
            .targets
            .is_empty());
        config.probe.enabled = false;
        assert!(!ProbeSettings::from_config(&config, &blocked).probes());
        config.probe.enabled = true;
        assert!(!ProbeSettings::from_config(&config, &blocked[1..]).probes());
    }
}
