//! Blocked destinations: parsing `--block CIDR`, the per-cloud `--preset` sets, and the
//! always-on default set, merged into the sorted list the BPF tries are filled from.
//!
//! # What the presets hold, and what they leave out on purpose
//! Every preset lists single addresses (`/32`, `/128`) of endpoints that hand out instance
//! identity or credentials, each with [`Preset::source`] naming where the address is
//! documented. Broad ranges such as `169.254.0.0/16` are never in a preset: node-local
//! services live there too, most importantly NodeLocal DNSCache at `169.254.20.10` and the
//! cloud DNS resolvers (AWS `169.254.169.253`), and blocking them breaks every pod.
//!
//! - `aws` is IMDS only. The EKS Pod Identity agent (`169.254.170.23`, `fd00:ec2::23`) hands
//!   out credentials scoped to a pod's service account through an association an admin made
//!   on purpose, so blocking it by default would break intended access; clusters that want
//!   tenants kept away from it too add `aws-pod-identity`.
//! - `azure` is IMDS only. The WireServer `168.63.129.16` is also Azure's DNS resolver (and
//!   DHCP and health-probe source), so blocking it breaks pods that use the host's DNS
//!   (`dnsPolicy: Default`, hostNetwork pods) — it is the separate `azure-wireserver`, for
//!   clusters whose tenant pods only ever resolve through cluster DNS.
//! - On GCP, `169.254.169.254` (always blocked) is also the VPC DNS resolver: tenant pods must
//!   resolve through cluster DNS, which runs in an exempt namespace.
//!
//! Parsing accepts host bits and clears them (`10.1.2.3/8` is `10.0.0.0/8`), the way the
//! LPM trie would treat them anyway; [`describe`] prints the canonical form.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use clap::ValueEnum;
use datalab_guard_common::cidr::Cidr;
use ipnet::IpNet;

/// A `--block` value or preset entry that is not a CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlocklistError {
    #[error("invalid CIDR {input:?}: empty")]
    Empty { input: String },
    #[error("invalid CIDR {input:?}: {addr:?} is not an IPv4 or IPv6 address")]
    BadAddress { input: String, addr: String },
    #[error("invalid CIDR {input:?}: prefix length {prefix:?} is not a number")]
    BadPrefix { input: String, prefix: String },
    #[error("invalid CIDR {input:?}: prefix length {prefix} exceeds {max}")]
    PrefixTooLong {
        input: String,
        prefix: String,
        max: u8,
    },
}

/// Always blocked, whatever the flags: AWS-style IMDS over IPv4 (used by most clouds) and
/// IPv6 (DESIGN.md "Default blocked set").
pub const DEFAULT_BLOCKED: [&str; 2] = ["169.254.169.254/32", "fd00:ec2::254/128"];

/// Parses `a.b.c.d/n`, `a.b.c.d` (= /32), `x::y/n` or `x::y` (= /128). Surrounding
/// whitespace is ignored; host bits are cleared.
pub fn parse_cidr(s: &str) -> Result<Cidr, BlocklistError> {
    let input = s.to_owned();
    let trimmed = s.trim();
    if trimmed.is_empty() {
        return Err(BlocklistError::Empty { input });
    }
    let (addr_text, prefix_text) = match trimmed.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (trimmed, None),
    };
    let addr: IpAddr = addr_text.parse().map_err(|_| BlocklistError::BadAddress {
        input: input.clone(),
        addr: addr_text.to_owned(),
    })?;
    let max = match addr {
        IpAddr::V4(_) => 32u8,
        IpAddr::V6(_) => 128u8,
    };
    let prefix = match prefix_text {
        None => max,
        Some(p) => {
            // Digits only: `u32::from_str` would also take "+8".
            if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
                return Err(BlocklistError::BadPrefix {
                    input,
                    prefix: p.to_owned(),
                });
            }
            // All digits, so the only parse failure is overflow: far too long either way.
            match p.parse::<u32>() {
                Ok(n) if n <= u32::from(max) => n as u8,
                _ => {
                    return Err(BlocklistError::PrefixTooLong {
                        input,
                        prefix: p.to_owned(),
                        max,
                    })
                }
            }
        }
    };
    let cidr = match addr {
        IpAddr::V4(a) => Cidr::v4(a.octets(), prefix),
        IpAddr::V6(a) => Cidr::v6(a.octets(), prefix),
    };
    // The prefix was checked above, so the constructors cannot refuse it.
    Ok(cidr.expect("prefix length checked against the family maximum"))
}

/// The canonical text of a CIDR, e.g. `169.254.169.254/32`; the inverse of [`parse_cidr`].
pub fn describe(c: &Cidr) -> String {
    to_ipnet(c).to_string()
}

/// The same prefix as an [`IpNet`] (for callers that want std/ipnet address types).
pub fn to_ipnet(c: &Cidr) -> IpNet {
    match *c {
        Cidr::V4 { addr, prefix } => IpNet::new(IpAddr::V4(Ipv4Addr::from(addr)), prefix),
        Cidr::V6 { addr, prefix } => IpNet::new(IpAddr::V6(Ipv6Addr::from(addr)), prefix),
    }
    .expect("a Cidr never holds a prefix longer than its family allows")
}

/// Metadata endpoints of one cloud or platform (`--preset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, ValueEnum)]
pub enum Preset {
    /// AWS EC2 IMDS (IPv4 and IPv6).
    Aws,
    /// EKS Pod Identity agent (credentials of pods' own service accounts; not part of aws).
    AwsPodIdentity,
    /// Google Cloud metadata server (IPv4 and IPv6-only instances).
    #[value(alias = "gce")]
    Gcp,
    /// Azure IMDS.
    Azure,
    /// Azure WireServer 168.63.129.16; also Azure's DNS resolver, so pods using host DNS break.
    AzureWireserver,
    /// Oracle Cloud Infrastructure IMDS (IPv4, IPv6, and OCI Classic).
    #[value(alias = "oci")]
    Oracle,
    /// Alibaba Cloud ECS metadata (IPv4 and IPv6).
    #[value(alias = "aliyun")]
    Alibaba,
    /// Tencent Cloud CVM metadata (metadata.tencentyun.com).
    Tencent,
    /// OpenStack Nova metadata (IPv4 and IPv6).
    Openstack,
    /// DigitalOcean droplet metadata.
    #[value(name = "digitalocean")]
    DigitalOcean,
    /// Hetzner Cloud server metadata.
    Hetzner,
    /// IBM Cloud VPC instance metadata.
    Ibm,
    /// Akamai Cloud (Linode) metadata (IPv4 and IPv6).
    #[value(alias = "akamai")]
    Linode,
    /// Scaleway instance metadata (IPv4 and IPv6).
    Scaleway,
    /// Huawei Cloud ECS metadata.
    Huawei,
    /// Vultr instance metadata.
    Vultr,
}

impl Preset {
    /// Every preset, in declaration order.
    pub const ALL: [Preset; 16] = [
        Preset::Aws,
        Preset::AwsPodIdentity,
        Preset::Gcp,
        Preset::Azure,
        Preset::AzureWireserver,
        Preset::Oracle,
        Preset::Alibaba,
        Preset::Tencent,
        Preset::Openstack,
        Preset::DigitalOcean,
        Preset::Hetzner,
        Preset::Ibm,
        Preset::Linode,
        Preset::Scaleway,
        Preset::Huawei,
        Preset::Vultr,
    ];

    /// The preset's addresses as text (single hosts only; see the module docs).
    fn entries(self) -> &'static [&'static str] {
        match self {
            Preset::Aws => &["169.254.169.254/32", "fd00:ec2::254/128"],
            Preset::AwsPodIdentity => &["169.254.170.23/32", "fd00:ec2::23/128"],
            Preset::Gcp => &["169.254.169.254/32", "fd20:ce::254/128"],
            Preset::Azure => &["169.254.169.254/32"],
            Preset::AzureWireserver => &["168.63.129.16/32"],
            Preset::Oracle => &[
                "169.254.169.254/32",
                "fd00:c1::a9fe:a9fe/128",
                "192.0.0.192/32",
            ],
            Preset::Alibaba => &["100.100.100.200/32", "fd00:100::100:200/128"],
            Preset::Tencent => &["169.254.0.23/32"],
            Preset::Openstack => &["169.254.169.254/32", "fe80::a9fe:a9fe/128"],
            Preset::DigitalOcean => &["169.254.169.254/32"],
            Preset::Hetzner => &["169.254.169.254/32"],
            Preset::Ibm => &["169.254.169.254/32"],
            Preset::Linode => &["169.254.169.254/32", "fd00:a9fe:a9fe::1/128"],
            Preset::Scaleway => &["169.254.42.42/32", "fd00:42::42/128"],
            Preset::Huawei => &["169.254.169.254/32"],
            Preset::Vultr => &["169.254.169.254/32"],
        }
    }

    /// The preset's CIDRs.
    pub fn cidrs(self) -> Vec<Cidr> {
        self.entries()
            .iter()
            .map(|e| parse_cidr(e).expect("preset entries are valid CIDRs (unit-tested)"))
            .collect()
    }

    /// Where the addresses are documented.
    pub fn source(self) -> &'static str {
        match self {
            Preset::Aws => {
                "https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/instancedata-data-retrieval.html \
                 (IPv6 endpoint on Nitro instances)"
            }
            Preset::AwsPodIdentity => "https://docs.aws.amazon.com/eks/latest/userguide/pod-id-agent-setup.html",
            Preset::Gcp => {
                "https://cloud.google.com/compute/docs/metadata/querying-metadata \
                 (fd20:ce::254 serves IPv6-only instances)"
            }
            Preset::Azure => "https://learn.microsoft.com/azure/virtual-machines/instance-metadata-service",
            Preset::AzureWireserver => {
                "https://learn.microsoft.com/azure/virtual-network/what-is-ip-address-168-63-129-16 \
                 (also the DNS resolver: blocking it breaks pods using the host's DNS)"
            }
            Preset::Oracle => {
                "https://docs.oracle.com/iaas/Content/Compute/Tasks/gettingmetadata.htm \
                 (IPv6 endpoint as used by the OCI SDKs; 192.0.0.192 is OCI Classic)"
            }
            Preset::Alibaba => {
                "https://www.alibabacloud.com/help/en/ecs/user-guide/view-instance-metadata \
                 (IPv6 endpoint for IPv6-only ENIs)"
            }
            Preset::Tencent => "https://www.tencentcloud.com/document/product/213/4934 (metadata.tencentyun.com)",
            Preset::Openstack => {
                "https://docs.openstack.org/nova/latest/user/metadata.html \
                 (Neutron serves IPv6 metadata at fe80::a9fe:a9fe)"
            }
            Preset::DigitalOcean => "https://docs.digitalocean.com/reference/api/metadata/",
            Preset::Hetzner => "https://docs.hetzner.cloud/reference/cloud#server-metadata",
            Preset::Ibm => "https://cloud.ibm.com/docs/vpc?topic=vpc-imd-about",
            Preset::Linode => "https://techdocs.akamai.com/cloud-computing/docs/metadata-service-api",
            Preset::Scaleway => "https://cloudinit.readthedocs.io/en/latest/reference/datasources/scaleway.html",
            Preset::Huawei => "https://support.huaweicloud.com/intl/en-us/usermanual-ecs/ecs_03_0166.html",
            Preset::Vultr => "https://www.vultr.com/metadata/",
        }
    }
}

impl Preset {
    /// The `--preset` name (also used in the config file and in `status`).
    pub fn name(self) -> &'static str {
        match self {
            Preset::Aws => "aws",
            Preset::AwsPodIdentity => "aws-pod-identity",
            Preset::Gcp => "gcp",
            Preset::Azure => "azure",
            Preset::AzureWireserver => "azure-wireserver",
            Preset::Oracle => "oracle",
            Preset::Alibaba => "alibaba",
            Preset::Tencent => "tencent",
            Preset::Openstack => "openstack",
            Preset::DigitalOcean => "digitalocean",
            Preset::Hetzner => "hetzner",
            Preset::Ibm => "ibm",
            Preset::Linode => "linode",
            Preset::Scaleway => "scaleway",
            Preset::Huawei => "huawei",
            Preset::Vultr => "vultr",
        }
    }
}

impl fmt::Display for Preset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The same names and aliases as `--preset` (clap's parser), so a config file and the
/// command line can never disagree.
impl FromStr for Preset {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        <Preset as ValueEnum>::from_str(s, false).map_err(|_| {
            let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
            format!("unknown preset {s:?} (known: {})", names.join(", "))
        })
    }
}

impl serde::Serialize for Preset {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Preset {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// The blocked set: the default set, every `--block` value and every preset, sorted
/// (IPv4 first) and without duplicates. The first bad `--block` value is the error.
pub fn build_blocklist(blocks: &[String], presets: &[Preset]) -> Result<Vec<Cidr>, BlocklistError> {
    let mut all: Vec<Cidr> = DEFAULT_BLOCKED
        .iter()
        .map(|d| parse_cidr(d).expect("default entries are valid CIDRs"))
        .collect();
    for block in blocks {
        all.push(parse_cidr(block)?);
    }
    for preset in presets {
        all.extend(preset.cidrs());
    }
    all.sort();
    all.dedup();
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_describe_round_trip() {
        for text in [
            "169.254.169.254/32",
            "10.0.0.0/8",
            "0.0.0.0/0",
            "fd00:ec2::254/128",
            "fd00::/8",
            "::/0",
            "::ffff:169.254.169.254/128",
        ] {
            let cidr = parse_cidr(text).unwrap();
            assert_eq!(describe(&cidr), text);
            assert_eq!(parse_cidr(&describe(&cidr)).unwrap(), cidr);
        }
    }

    #[test]
    fn bare_addresses_are_host_routes() {
        assert_eq!(
            parse_cidr("169.254.169.254").unwrap(),
            Cidr::v4([169, 254, 169, 254], 32).unwrap()
        );
        assert_eq!(
            describe(&parse_cidr("fd00:ec2::254").unwrap()),
            "fd00:ec2::254/128"
        );
        assert_eq!(
            describe(&parse_cidr("  100.100.100.200 ").unwrap()),
            "100.100.100.200/32"
        );
    }

    #[test]
    fn host_bits_are_cleared() {
        assert_eq!(
            describe(&parse_cidr("169.254.169.254/16").unwrap()),
            "169.254.0.0/16"
        );
        assert_eq!(
            describe(&parse_cidr("fd00:ec2::254/32").unwrap()),
            "fd00:ec2::/32"
        );
    }

    #[test]
    fn errors_name_the_input_and_the_problem() {
        let cases = [
            (
                "169.254.169.254/33",
                r#"invalid CIDR "169.254.169.254/33": prefix length 33 exceeds 32"#,
            ),
            (
                "fd00::1/129",
                r#"invalid CIDR "fd00::1/129": prefix length 129 exceeds 128"#,
            ),
            (
                "1.2.3.4/99999999999",
                r#"invalid CIDR "1.2.3.4/99999999999": prefix length 99999999999 exceeds 32"#,
            ),
            ("", r#"invalid CIDR "": empty"#),
            ("   ", r#"invalid CIDR "   ": empty"#),
            (
                "metadata",
                r#"invalid CIDR "metadata": "metadata" is not an IPv4 or IPv6 address"#,
            ),
            (
                "1.2.3/8",
                r#"invalid CIDR "1.2.3/8": "1.2.3" is not an IPv4 or IPv6 address"#,
            ),
            (
                "1.2.3.4/",
                r#"invalid CIDR "1.2.3.4/": prefix length "" is not a number"#,
            ),
            (
                "1.2.3.4/+8",
                r#"invalid CIDR "1.2.3.4/+8": prefix length "+8" is not a number"#,
            ),
            (
                "1.2.3.4/8/9",
                r#"invalid CIDR "1.2.3.4/8/9": prefix length "8/9" is not a number"#,
            ),
            (
                "fe80::1%eth0",
                r#"invalid CIDR "fe80::1%eth0": "fe80::1%eth0" is not an IPv4 or IPv6 address"#,
            ),
        ];
        for (input, message) in cases {
            assert_eq!(
                parse_cidr(input).unwrap_err().to_string(),
                message,
                "{input}"
            );
        }
    }

    #[test]
    fn presets_are_well_formed_single_hosts_with_sources() {
        for preset in Preset::ALL {
            let cidrs = preset.cidrs();
            assert!(!cidrs.is_empty(), "{preset:?}");
            for cidr in &cidrs {
                // Single hosts only: a broad range would hit node-local services.
                let host = match cidr {
                    Cidr::V4 { .. } => 32,
                    Cidr::V6 { .. } => 128,
                };
                assert_eq!(
                    cidr.prefix(),
                    host,
                    "{preset:?} has a range: {}",
                    describe(cidr)
                );
            }
            assert!(preset.source().starts_with("https://"), "{preset:?}");
        }
    }

    #[test]
    fn every_preset_has_a_command_line_name() {
        let names: Vec<String> = Preset::ALL
            .iter()
            .map(|p| p.to_possible_value().unwrap().get_name().to_owned())
            .collect();
        for expected in [
            "aws",
            "aws-pod-identity",
            "gcp",
            "azure",
            "azure-wireserver",
            "oracle",
            "alibaba",
            "digitalocean",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} missing from {names:?}"
            );
        }
        assert_eq!(
            <Preset as ValueEnum>::from_str("oci", true),
            Ok(Preset::Oracle)
        );
        assert_eq!(
            <Preset as ValueEnum>::from_str("aliyun", true),
            Ok(Preset::Alibaba)
        );
        // ALL really is all of them.
        assert_eq!(Preset::ALL.len(), Preset::value_variants().len());
    }

    #[test]
    fn names_match_the_command_line_and_parse_back() {
        for preset in Preset::ALL {
            assert_eq!(
                preset.to_possible_value().unwrap().get_name(),
                preset.name()
            );
            assert_eq!(preset.name().parse::<Preset>(), Ok(preset));
            assert_eq!(preset.to_string(), preset.name());
            let json = serde_json::to_string(&preset).unwrap();
            assert_eq!(serde_json::from_str::<Preset>(&json).unwrap(), preset);
        }
        assert_eq!("oci".parse::<Preset>(), Ok(Preset::Oracle));
        let err = "amazon".parse::<Preset>().unwrap_err();
        assert!(
            err.starts_with(r#"unknown preset "amazon" (known: aws, aws-pod-identity, gcp"#),
            "{err}"
        );
        assert!(serde_json::from_str::<Preset>(r#""nope""#).is_err());
    }

    #[test]
    fn no_preset_reaches_dns_resolvers_or_node_local_services() {
        // NodeLocal DNSCache, the AWS VPC resolver, the AWS time service, the ECS agent.
        let protected = [
            "169.254.20.10",
            "169.254.169.253",
            "169.254.169.123",
            "169.254.170.2",
        ];
        for preset in Preset::ALL {
            for cidr in preset.cidrs() {
                for addr in protected {
                    assert!(
                        !cidr.contains_v4(v4(addr).octets()),
                        "{preset:?} blocks {addr}"
                    );
                }
            }
        }
        let default = build_blocklist(&[], &[]).unwrap();
        for addr in protected {
            assert!(!default.iter().any(|c| c.contains_v4(v4(addr).octets())));
        }
    }

    #[test]
    fn credential_side_services_are_opt_in() {
        let wireserver = parse_cidr("168.63.129.16").unwrap();
        let pod_identity = parse_cidr("169.254.170.23").unwrap();
        assert!(!Preset::Azure.cidrs().contains(&wireserver));
        assert!(Preset::AzureWireserver.cidrs().contains(&wireserver));
        assert!(!Preset::Aws.cidrs().contains(&pod_identity));
        assert!(Preset::AwsPodIdentity.cidrs().contains(&pod_identity));
    }

    #[test]
    fn default_set_is_always_present() {
        let defaults: Vec<Cidr> = DEFAULT_BLOCKED
            .iter()
            .map(|d| parse_cidr(d).unwrap())
            .collect();
        for (blocks, presets) in [
            (vec![], vec![]),
            (vec!["10.0.0.1".to_owned()], vec![]),
            (vec![], vec![Preset::Alibaba]),
            (
                vec!["fd00::/8".to_owned()],
                vec![Preset::Scaleway, Preset::Tencent],
            ),
        ] {
            let set = build_blocklist(&blocks, &presets).unwrap();
            for d in &defaults {
                assert!(set.contains(d), "{} missing", describe(d));
            }
        }
    }

    #[test]
    fn blocklist_is_sorted_and_deduplicated() {
        let blocks = vec![
            "169.254.169.254".to_owned(),
            "10.0.0.0/8".to_owned(),
            "10.1.0.0/8".to_owned(),
        ];
        let set = build_blocklist(&blocks, &[Preset::Aws, Preset::Gcp, Preset::Aws]).unwrap();
        let text: Vec<String> = set.iter().map(describe).collect();
        assert_eq!(
            text,
            [
                "10.0.0.0/8",
                "169.254.169.254/32",
                "fd00:ec2::254/128",
                "fd20:ce::254/128"
            ]
        );
    }

    #[test]
    fn a_bad_block_fails_the_whole_list() {
        let err = build_blocklist(&["169.254.169.254/33".to_owned()], &[Preset::Aws]).unwrap_err();
        assert!(err.to_string().contains("prefix length 33 exceeds 32"));
    }
}
