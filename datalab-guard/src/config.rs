//! The node-mode config file (`datalab-guard node --config FILE`, DESIGN.md "Config file").
//!
//! YAML, every key optional with a safe default, unknown keys an error at every level (a
//! typo must not silently fall back to a default). Values are validated while the file is
//! read, so errors carry the key path and the line; the few rules that relate two keys
//! (durations that must be ordered) are checked afterwards and name the key.
//! `deploy/config.example.yaml` is the documented default config; a unit test keeps it equal
//! to [`Config::default`].
//!
//! # Command-line flags and the file
//! The shared flags combine with the file through [`Config::merge_cli`]: `--block` and
//! `--preset` add to `blocked` (nothing can remove the default set), and `--mode`, when given
//! explicitly, overrides `mode`.
//!
//! # Reload
//! [`Config::load`] is all this module offers: the caller decides when to re-read (SIGHUP),
//! and keeps the old config when the new file does not load. Each load logs (warn) the
//! exemptions the file makes dead ([`Config::shadowed_exemptions`]), once per load.
//!
//! # The policy core's config
//! The verdict rules live in the `datalab-guard-policy` crate, which knows nothing of this
//! file: [`Config::policy_config`] hands it the part it reads as a plain
//! [`PolicyConfig`].

use std::{
    env, fmt, fs,
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use datalab_guard_common::{cidr::Cidr, Mode, Verdict};
use datalab_guard_policy::{
    selector::{validate_dns1123_label, validate_dns1123_subdomain, LabelSelector},
    shadowed_exemptions, PodExemption, PolicyConfig, Reason,
};
use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::{
    blocklist::{self, BlocklistError, Preset},
    bpf::DatapathSettings,
    cgroups::pod::CgroupDriver,
};

/// The environment variable holding the agent's own namespace (downward API), used when
/// `leaderElection.namespace` is not set.
pub const POD_NAMESPACE_ENV: &str = "POD_NAMESPACE";

/// Namespace of the leader-election Lease when neither the file nor POD_NAMESPACE names one.
pub const FALLBACK_NAMESPACE: &str = "datalab-guard";

/// A config file that cannot be used. The message names the file, and the key (and line,
/// where the YAML parser knows it) that is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad YAML, an unknown key or a bad value; `message` starts with the key path and ends
    /// with the line and column.
    #[error("invalid config file {}: {message}", path.display())]
    Parse {
        path: PathBuf,
        message: String,
        line: Option<usize>,
        column: Option<usize>,
    },
    /// Values that parse but do not fit together.
    #[error("invalid config file {}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

/// Where the node agent's config comes from: the file (read again on SIGHUP) and the
/// command-line overrides, applied on top of every read.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    pub path: Option<PathBuf>,
    /// `--block`: added to the file's `blocked.cidrs`.
    pub blocks: Vec<String>,
    /// `--preset`: added to the file's `blocked.presets`.
    pub presets: Vec<Preset>,
    /// `--mode`: replaces the file's `mode`.
    pub mode: Option<Mode>,
    /// `--deny-tunnels`: sets `tunnels.denyAll` whatever the file says.
    pub deny_tunnels: bool,
}

impl ConfigSource {
    /// The file (defaults when there is none) with the overrides applied.
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.path {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        config.merge_cli(&self.blocks, &self.presets, self.mode)?;
        config.tunnels.deny_all |= self.deny_tunnels;
        Ok(config)
    }
}

/// The whole file. Field docs say what each setting does; the YAML keys are camelCase.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Config {
    /// Which namespaces are tenant environments.
    pub environments: Environments,
    /// Pods outside environment namespaces that may reach blocked destinations.
    pub exemptions: Exemptions,
    /// Verdict for pods in non-environment namespaces that no exemption matches.
    #[serde(with = "verdict_name")]
    pub non_environment_verdict: Verdict,
    /// Verdict for cgroups with no policy entry (pods not classified yet, anything else under
    /// the cgroup root). `exempt` is fail-open.
    #[serde(with = "verdict_name")]
    pub unknown_cgroup_verdict: Verdict,
    /// Destinations guarded pods may not reach, on top of the default set.
    pub blocked: Blocked,
    #[serde(with = "mode_name")]
    pub mode: Mode,
    /// Refuse AF_PACKET and raw sockets to guarded pods (needs the BPF LSM).
    pub deny_raw_sockets: bool,
    /// Where the agent keeps what it knows across restarts and reboots (`--state-dir`
    /// overrides it). `None`: [`DEFAULT_STATE_DIR`], and a directory that cannot be used is
    /// only a warning; a path: it must be usable or the agent refuses to start. Read at start.
    #[serde(deserialize_with = "de_opt_absolute_path")]
    pub state_dir: Option<PathBuf>,
    /// The node taint key the agent removes from its own Node once it enforces the API's
    /// verdicts; empty: no taint handling (no Node request at all). Read at start.
    #[serde(deserialize_with = "de_taint_key")]
    pub startup_taint: String,
    pub network_policy: NetworkPolicyConfig,
    pub pod_security: PodSecurityConfig,
    pub probe: ProbeConfig,
    pub audit: AuditConfig,
    /// Encapsulations judged by their inner packet (or refused outright).
    pub tunnels: TunnelsConfig,
    pub cgroup: CgroupConfig,
    /// How often pods' cgroups are looked up again (pods whose cgroup appeared late,
    /// missed filesystem events).
    pub rescan_interval: HumanDuration,
    pub leader_election: LeaderElectionConfig,
    /// The controller's own limits (node agents ignore this section).
    pub controller: ControllerConfig,
    /// The node's container runtime (CRI socket), asked which pod a new pod cgroup is when
    /// the API server does not know (yet): see `crate::cri` and `node::runtime_classify`.
    pub runtime: crate::cri::RuntimeConfig,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Environments {
    /// Namespaces whose labels match are environments: all their pods are guarded and no
    /// exemption applies to them.
    pub namespace_selector: LabelSelector,
}

/// Exemptions apply only to pods in non-environment namespaces: environment membership
/// always wins (see `datalab_guard_policy`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Exemptions {
    /// Namespace names.
    #[serde(deserialize_with = "de_label_list")]
    pub namespaces: Vec<String>,
    /// Namespaces whose labels match any of these (none may be empty).
    #[serde(deserialize_with = "de_exemption_selector_list")]
    pub namespace_selectors: Vec<LabelSelector>,
    /// Pods whose labels match, in one namespace or in any non-environment namespace.
    pub pod_selectors: Vec<ExemptPodSelector>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExemptPodSelector {
    /// Only pods in this namespace; absent: in every non-environment namespace.
    #[serde(default, deserialize_with = "de_opt_label")]
    pub namespace: Option<String>,
    /// Required and not empty, so that a forgotten selector cannot mean "every pod".
    #[serde(deserialize_with = "de_exemption_selector")]
    pub selector: LabelSelector,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct Blocked {
    /// Extra CIDRs (`a.b.c.d/n`, `x::y/n`, or bare addresses), validated when loaded.
    #[serde(with = "cidr_list")]
    pub cidrs: Vec<Cidr>,
    /// Cloud presets, named as `--preset`.
    #[serde(with = "preset_list")]
    pub presets: Vec<Preset>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyConfig {
    /// Name of the NetworkPolicy in each environment namespace.
    #[serde(deserialize_with = "de_subdomain")]
    pub name: String,
    /// true: the leader creates and repairs it (server-side apply); false: only reports.
    pub manage: bool,
    /// Whether the policy also carries the IPv6 rule.
    pub dual_stack: DualStack,
    /// Delete the managed policy from a namespace that stops being an environment.
    pub remove_when_not_environment: bool,
}

/// `dualStack: auto | true | false`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DualStack {
    /// IPv6 rule when the cluster has IPv6 addresses.
    Auto,
    /// Always the IPv6 rule too (`true`).
    Enabled,
    /// IPv4 only (`false`).
    Disabled,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSecurityConfig {
    /// The Pod Security Admission level environment namespaces must enforce (at least).
    pub level: PodSecurityLevel,
    /// true: the leader sets `pod-security.kubernetes.io/enforce` to `level`; false: only
    /// verifies and reports.
    pub set_label: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PodSecurityLevel {
    Privileged,
    Baseline,
    Restricted,
}

impl PodSecurityLevel {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PodSecurityLevel::Privileged => "privileged",
            PodSecurityLevel::Baseline => "baseline",
            PodSecurityLevel::Restricted => "restricted",
        }
    }
}

/// The CNI enforcement probe: from a guarded test pod, can the metadata endpoint be reached?
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ProbeConfig {
    pub enabled: bool,
    pub interval: HumanDuration,
    /// Random extra delay up to this, so nodes do not probe in lockstep.
    pub jitter: HumanDuration,
    /// Connect timeout of one probe.
    pub timeout: HumanDuration,
    /// TCP port probed on the blocked address.
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct AuditConfig {
    /// Audit records per guarded cgroup per second (rate-limited in the kernel); 0 = none.
    /// Counters are exact either way.
    pub events_per_second: u32,
    /// Also record a Kubernetes Event on the pod.
    pub kubernetes_events: bool,
    /// At most this many Events per pod per minute.
    pub events_per_pod_per_minute: u32,
    /// At most this many Event writes per minute from one node, all pods and namespaces
    /// together (1 to [`MAX_EVENTS_PER_MINUTE_PER_NODE`]); attempts beyond it are counted
    /// into the pod's next Event.
    pub events_per_minute_per_node: u32,
}

/// The UDP ports whose payload the kernel decapsulates and judges (one level deep), and the
/// switch that refuses every encapsulated packet (IPIP, 6in4 and GRE included) from guarded
/// pods. At most [`datalab_guard_common::MAX_TUNNEL_PORTS`] ports in all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct TunnelsConfig {
    /// VXLAN: 4789 (IANA, Calico) and 8472 (Linux default: flannel, Cilium).
    pub vxlan_ports: Vec<u16>,
    /// Geneve: 6081.
    pub geneve_ports: Vec<u16>,
    /// Teredo: 3544.
    pub teredo_ports: Vec<u16>,
    /// Refuse every encapsulated packet from guarded pods, whatever it carries.
    pub deny_all: bool,
}

impl Default for TunnelsConfig {
    fn default() -> Self {
        use datalab_guard_common::tunnel::{
            GENEVE_PORT, TEREDO_PORT, VXLAN_LINUX_PORT, VXLAN_PORT,
        };
        TunnelsConfig {
            vxlan_ports: vec![VXLAN_PORT, VXLAN_LINUX_PORT],
            geneve_ports: vec![GENEVE_PORT],
            teredo_ports: vec![TEREDO_PORT],
            deny_all: false,
        }
    }
}

impl TunnelsConfig {
    /// The kernel's view (the CONFIG map's `tunnels`), or why the ports do not fit:
    /// port 0, one port under two encapsulations, or more ports than the kernel holds.
    pub fn kernel(&self) -> Result<datalab_guard_common::TunnelConfig, String> {
        use datalab_guard_common::{TunnelConfig, UdpTunnel, MAX_TUNNEL_PORTS};
        let mut cfg = TunnelConfig::zeroed();
        cfg.deny_all = u32::from(self.deny_all);
        let lists = [
            (&self.vxlan_ports, UdpTunnel::Vxlan),
            (&self.geneve_ports, UdpTunnel::Geneve),
            (&self.teredo_ports, UdpTunnel::Teredo),
        ];
        for (ports, kind) in lists {
            for &port in ports {
                if port == 0 {
                    return Err("port 0 is not a tunnel port".into());
                }
                if let Some(other) = cfg.udp_kind(port) {
                    if other != kind {
                        return Err(format!("port {port} is listed for two encapsulations"));
                    }
                }
                if !cfg.add_port(port, kind) {
                    return Err(format!(
                        "more than {MAX_TUNNEL_PORTS} tunnel ports (the kernel holds {MAX_TUNNEL_PORTS})"
                    ));
                }
            }
        }
        Ok(cfg)
    }
}

/// Upper bound of `audit.eventsPerMinutePerNode` (the budget keeps one timestamp per write).
pub const MAX_EVENTS_PER_MINUTE_PER_NODE: u32 = 6000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct CgroupConfig {
    /// The pods' cgroup root, where the programs attach.
    pub root: CgroupRoot,
    /// The kubelet's cgroup driver (decides pod cgroup names); `None` is `auto`: told from
    /// the root's name.
    #[serde(with = "driver_name")]
    pub driver: Option<CgroupDriver>,
}

/// `root: auto` or an absolute path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupRoot {
    /// Found from the cgroup2 mount (kubepods.slice or kubepods).
    Auto,
    Path(PathBuf),
}

impl CgroupConfig {
    /// The configured root, `None` for `auto`.
    pub fn root_path(&self) -> Option<&Path> {
        match &self.root {
            CgroupRoot::Auto => None,
            CgroupRoot::Path(p) => Some(p),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct LeaderElectionConfig {
    /// The Lease that elects the agent doing cluster-wide work (NetworkPolicy, PSA labels).
    #[serde(deserialize_with = "de_subdomain")]
    pub lease_name: String,
    /// `None` (null): the agent's own namespace, see [`LeaderElectionConfig::namespace_or`].
    #[serde(deserialize_with = "de_opt_label")]
    pub namespace: Option<String>,
    pub lease_duration: HumanDuration,
    pub renew_deadline: HumanDuration,
    pub retry_period: HumanDuration,
}

/// `controller:`: how hard the controller may write to the API server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ControllerConfig {
    /// Writes per second, sustained, all writes together (NetworkPolicy applies and
    /// deletions, namespace label applies, Events); the Lease is not counted (1 to
    /// [`MAX_CONTROLLER_WRITES_PER_SECOND`]).
    pub writes_per_second: u32,
    /// Writes that may go at once after a quiet spell (1 to
    /// [`MAX_CONTROLLER_WRITES_PER_SECOND`]).
    pub write_burst: u32,
}

/// Upper bound of `controller.writesPerSecond` and `controller.writeBurst`.
pub const MAX_CONTROLLER_WRITES_PER_SECOND: u32 = 10_000;

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            writes_per_second: 50,
            write_burst: 50,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Defaults (DESIGN.md; mirrored, with comments, in deploy/config.example.yaml).

/// Label that marks environment namespaces by default.
pub const DEFAULT_ENVIRONMENT_SELECTOR: &str = "datalab.io/environment=true";

/// The state directory when neither `--state-dir` nor `stateDir` names one (a hostPath in
/// the DaemonSet).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/datalab-guard";

/// The startup taint the agent removes from its own Node (like Cilium's
/// `node.cilium.io/agent-not-ready`).
pub const DEFAULT_STARTUP_TAINT: &str = "datalab.io/guard-not-ready";

impl Default for Config {
    fn default() -> Self {
        Config {
            environments: Environments::default(),
            exemptions: Exemptions::default(),
            non_environment_verdict: Verdict::Exempt,
            unknown_cgroup_verdict: Verdict::Guard,
            blocked: Blocked::default(),
            mode: Mode::Enforce,
            deny_raw_sockets: false,
            state_dir: None,
            startup_taint: DEFAULT_STARTUP_TAINT.to_owned(),
            network_policy: NetworkPolicyConfig::default(),
            pod_security: PodSecurityConfig::default(),
            probe: ProbeConfig::default(),
            audit: AuditConfig::default(),
            tunnels: TunnelsConfig::default(),
            cgroup: CgroupConfig::default(),
            rescan_interval: HumanDuration::from_secs(10),
            leader_election: LeaderElectionConfig::default(),
            controller: ControllerConfig::default(),
            runtime: crate::cri::RuntimeConfig::default(),
        }
    }
}

impl Default for Environments {
    fn default() -> Self {
        Environments {
            namespace_selector: DEFAULT_ENVIRONMENT_SELECTOR
                .parse()
                .expect("the default selector parses"),
        }
    }
}

impl Default for NetworkPolicyConfig {
    fn default() -> Self {
        NetworkPolicyConfig {
            name: "allow-web-egress".to_owned(),
            manage: true,
            dual_stack: DualStack::Auto,
            remove_when_not_environment: true,
        }
    }
}

impl Default for PodSecurityConfig {
    fn default() -> Self {
        PodSecurityConfig {
            level: PodSecurityLevel::Baseline,
            set_label: false,
        }
    }
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            enabled: true,
            interval: HumanDuration::from_secs(5 * 60),
            jitter: HumanDuration::from_secs(30),
            timeout: HumanDuration::from_secs(2),
            port: 80,
        }
    }
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            events_per_second: 5,
            kubernetes_events: true,
            events_per_pod_per_minute: 1,
            events_per_minute_per_node: 30,
        }
    }
}

impl Default for CgroupConfig {
    fn default() -> Self {
        CgroupConfig {
            root: CgroupRoot::Auto,
            driver: None,
        }
    }
}

impl Default for LeaderElectionConfig {
    fn default() -> Self {
        LeaderElectionConfig {
            lease_name: "datalab-guard-leader".to_owned(),
            namespace: None,
            lease_duration: HumanDuration::from_secs(15),
            renew_deadline: HumanDuration::from_secs(10),
            retry_period: HumanDuration::from_secs(2),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Loading, validation, flags.

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::from_yaml_str(&text, path)?;
        for warning in config.shadowed_exemptions() {
            tracing::warn!(config = %path.display(), "{warning}");
        }
        Ok(config)
    }

    /// The policy core's view of this config. `own_pod_uid` is the agent's own pod (from
    /// the downward API; empty or absent: none), which is always exempt.
    pub fn policy_config(&self, own_pod_uid: Option<String>) -> PolicyConfig {
        PolicyConfig {
            environment_selector: self.environments.namespace_selector.clone(),
            exempt_namespaces: self.exemptions.namespaces.iter().cloned().collect(),
            exempt_namespace_selectors: self.exemptions.namespace_selectors.clone(),
            exempt_pod_selectors: self
                .exemptions
                .pod_selectors
                .iter()
                .map(|rule| PodExemption {
                    namespace: rule.namespace.clone(),
                    selector: rule.selector.clone(),
                })
                .collect(),
            non_environment_verdict: self.non_environment_verdict,
            own_pod_uid: None,
        }
        .with_own_pod_uid(own_pod_uid)
    }

    /// One line per exemption that can never exempt a pod because every namespace it could
    /// match is an environment (where environment membership wins), naming the key. Not an
    /// error: the verdicts are safe, but the operator meant something else.
    pub fn shadowed_exemptions(&self) -> Vec<String> {
        shadowed_exemptions(&self.policy_config(None))
            .into_iter()
            .map(|dead| {
                let key = match dead.kind {
                    Reason::ExemptNamespace => "exemptions.namespaces",
                    Reason::ExemptNamespaceSelector => "exemptions.namespaceSelectors",
                    Reason::ExemptPodSelector => "exemptions.podSelectors",
                    other => other.as_str(),
                };
                format!(
                    "{key}: exemption {:?} never applies: every namespace it matches is an environment (environments.namespaceSelector {:?}), where no exemption applies",
                    dead.rule,
                    self.environments.namespace_selector.to_string()
                )
            })
            .collect()
    }

    /// Parses and validates YAML text; `origin` names the file in errors. An empty document
    /// (or one with only comments) is the default config.
    pub fn from_yaml_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let parsed: Option<Config> = serde_yaml_ng::from_str(text).map_err(|e| {
            let location = e.location();
            let mut message = e.to_string();
            // serde_yaml_ng leaves out a position at the very start of the file (an unknown
            // first key); say it anyway.
            if let Some(l) = location.as_ref().filter(|_| !message.contains(" at line ")) {
                message = format!("{message} at line {} column {}", l.line(), l.column());
            }
            ConfigError::Parse {
                path: origin.to_owned(),
                message,
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
            }
        })?;
        let config = parsed.unwrap_or_default();
        config
            .validate()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: origin.to_owned(),
                key: key.to_owned(),
                message,
            })?;
        Ok(config)
    }

    /// The rules that relate two values, or that a type cannot express. `(key, message)`.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        fn positive(key: &'static str, d: HumanDuration) -> Result<(), (&'static str, String)> {
            if d.is_zero() {
                return Err((key, "must be greater than 0".into()));
            }
            Ok(())
        }
        positive("rescanInterval", self.rescan_interval)?;
        self.runtime.validate()?;
        self.tunnels.kernel().map_err(|e| ("tunnels", e))?;
        let p = &self.probe;
        positive("probe.interval", p.interval)?;
        positive("probe.timeout", p.timeout)?;
        if p.timeout >= p.interval {
            return Err((
                "probe.timeout",
                format!(
                    "{} must be shorter than probe.interval ({})",
                    p.timeout, p.interval
                ),
            ));
        }
        if p.jitter >= p.interval {
            return Err((
                "probe.jitter",
                format!(
                    "{} must be shorter than probe.interval ({})",
                    p.jitter, p.interval
                ),
            ));
        }
        if p.port == 0 {
            return Err(("probe.port", "must be between 1 and 65535".into()));
        }
        let per_node = self.audit.events_per_minute_per_node;
        if !(1..=MAX_EVENTS_PER_MINUTE_PER_NODE).contains(&per_node) {
            return Err((
                "audit.eventsPerMinutePerNode",
                format!(
                    "{per_node} must be between 1 and {MAX_EVENTS_PER_MINUTE_PER_NODE} (audit.kubernetesEvents: false turns pod Events off)"
                ),
            ));
        }
        let c = &self.controller;
        for (key, value) in [
            ("controller.writesPerSecond", c.writes_per_second),
            ("controller.writeBurst", c.write_burst),
        ] {
            if !(1..=MAX_CONTROLLER_WRITES_PER_SECOND).contains(&value) {
                return Err((
                    key,
                    format!("{value} must be between 1 and {MAX_CONTROLLER_WRITES_PER_SECOND}"),
                ));
            }
        }
        // client-go's leader election rules (leaderelection.NewLeaderElector).
        let le = &self.leader_election;
        positive("leaderElection.retryPeriod", le.retry_period)?;
        if le.lease_duration <= le.renew_deadline {
            return Err((
                "leaderElection.leaseDuration",
                format!(
                    "{} must be longer than leaderElection.renewDeadline ({})",
                    le.lease_duration, le.renew_deadline
                ),
            ));
        }
        if le.renew_deadline.as_std() <= le.retry_period.as_std().mul_f64(1.2) {
            return Err((
                "leaderElection.renewDeadline",
                format!(
                    "{} must be longer than 1.2 × leaderElection.retryPeriod ({})",
                    le.renew_deadline, le.retry_period
                ),
            ));
        }
        Ok(())
    }

    /// Combines the shared command-line flags with the file: `blocks` (`--block`) and
    /// `presets` (`--preset`) are added to `blocked`; `mode` overrides the file's `mode` and
    /// must be `Some` only when `--mode` was given explicitly (clap's
    /// `ArgMatches::value_source` is `CommandLine`), so that the flag's default does not
    /// override the file. A bad `--block` value is an error and changes nothing.
    pub fn merge_cli(
        &mut self,
        blocks: &[String],
        presets: &[Preset],
        mode: Option<Mode>,
    ) -> Result<(), BlocklistError> {
        let parsed = blocks
            .iter()
            .map(|b| blocklist::parse_cidr(b))
            .collect::<Result<Vec<_>, _>>()?;
        for cidr in parsed {
            if !self.blocked.cidrs.contains(&cidr) {
                self.blocked.cidrs.push(cidr);
            }
        }
        for preset in presets {
            if !self.blocked.presets.contains(preset) {
                self.blocked.presets.push(*preset);
            }
        }
        if let Some(mode) = mode {
            self.mode = mode;
        }
        Ok(())
    }

    /// The full blocked set: default set + `blocked.cidrs` + presets, sorted, no duplicates.
    pub fn blocklist(&self) -> Vec<Cidr> {
        let texts: Vec<String> = self.blocked.cidrs.iter().map(blocklist::describe).collect();
        blocklist::build_blocklist(&texts, &self.blocked.presets)
            .expect("CIDRs were validated when loaded and describe() output parses")
    }

    /// The datapath settings this config asks for.
    pub fn datapath(&self) -> DatapathSettings {
        DatapathSettings {
            mode: self.mode,
            unknown_cgroup_verdict: self.unknown_cgroup_verdict,
            deny_raw_sockets: self.deny_raw_sockets,
            audit_events_per_second: self.audit.events_per_second,
            tunnels: self
                .tunnels
                .kernel()
                .expect("tunnel ports were validated when loaded"),
        }
    }

    /// Settings that weaken the guard, as lines to log at start (and on reload).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.unknown_cgroup_verdict == Verdict::Exempt {
            out.push(
                "unknownCgroupVerdict is exempt: pods the agent has not classified yet (and anything else under the cgroup root) can reach blocked destinations (fail-open)"
                    .to_owned(),
            );
        }
        if self.mode == Mode::Audit {
            out.push("mode is audit: blocked destinations are reported, not blocked".to_owned());
        }
        if self.environments.namespace_selector.is_empty() {
            out.push("environments.namespaceSelector is empty: every namespace is an environment and no exemption applies".to_owned());
        }
        out
    }
}

impl LeaderElectionConfig {
    /// The Lease's namespace: the configured one, else `pod_namespace` (the agent's own),
    /// else [`FALLBACK_NAMESPACE`].
    pub fn namespace_or(&self, pod_namespace: Option<&str>) -> String {
        self.namespace
            .as_deref()
            .or(pod_namespace.filter(|n| !n.is_empty()))
            .unwrap_or(FALLBACK_NAMESPACE)
            .to_owned()
    }

    /// [`LeaderElectionConfig::namespace_or`] with `POD_NAMESPACE` from the environment.
    pub fn resolved_namespace(&self) -> String {
        self.namespace_or(env::var(POD_NAMESPACE_ENV).ok().as_deref())
    }
}

// ---------------------------------------------------------------------------------------
// Durations.

/// A duration written as in Kubernetes/Go, restricted to whole units: `500ms`, `30s`, `5m`,
/// `1h`, `1m30s`, `0` (or `0s`). Milliseconds are the finest unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HumanDuration(Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> HumanDuration {
        HumanDuration(Duration::from_secs(secs))
    }

    pub const fn from_millis(ms: u64) -> HumanDuration {
        HumanDuration(Duration::from_millis(ms))
    }

    pub const fn as_std(self) -> Duration {
        self.0
    }

    pub const fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

impl From<HumanDuration> for Duration {
    fn from(d: HumanDuration) -> Duration {
        d.0
    }
}

/// Why a duration does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {problem}; write e.g. 500ms, 30s, 5m, 1h or 1m30s")]
pub struct DurationError {
    pub input: String,
    pub problem: &'static str,
}

impl FromStr for HumanDuration {
    type Err = DurationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fail = |problem| DurationError {
            input: s.to_owned(),
            problem,
        };
        let text = s.trim();
        if text.is_empty() {
            return Err(fail("empty"));
        }
        if text == "0" {
            return Ok(HumanDuration::default());
        }
        let mut rest = text;
        let mut total_ms: u64 = 0;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(fail("expected a whole number"));
            }
            let number: u64 = rest[..digits]
                .parse()
                .map_err(|_| fail("number too large"))?;
            rest = &rest[digits..];
            let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
            let unit_ms: u64 = match &rest[..unit_len] {
                "ms" => 1,
                "s" => 1_000,
                "m" => 60_000,
                "h" => 3_600_000,
                "" => return Err(fail("missing unit")),
                _ => return Err(fail("unknown unit (units: ms, s, m, h)")),
            };
            rest = &rest[unit_len..];
            total_ms = number
                .checked_mul(unit_ms)
                .and_then(|ms| total_ms.checked_add(ms))
                .ok_or_else(|| fail("too large"))?;
        }
        Ok(HumanDuration::from_millis(total_ms))
    }
}

/// The canonical form: largest units first, zero parts left out (`1m30s`, `500ms`, `0s`).
/// Sub-millisecond parts (only possible through `Duration` arithmetic) are not shown.
impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        for (unit, len) in [("h", 3_600_000u128), ("m", 60_000), ("s", 1_000), ("ms", 1)] {
            if ms >= len {
                write!(f, "{}{unit}", ms / len)?;
                ms %= len;
            }
        }
        Ok(())
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A bare YAML number (`interval: 30`) is refused with the same message: no guessing
        // whether seconds were meant.
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HumanDuration;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 500ms, 30s, 5m or 1m30s")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<HumanDuration, E> {
                v.parse().map_err(E::custom)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<HumanDuration, E> {
                if v == 0 {
                    return Ok(HumanDuration::default());
                }
                Err(E::custom(DurationError {
                    input: v.to_string(),
                    problem: "missing unit",
                }))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<HumanDuration, E> {
                Err(E::custom(DurationError {
                    input: v.to_string(),
                    problem: "missing unit",
                }))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

// ---------------------------------------------------------------------------------------
// serde helpers for values whose types live elsewhere or need validation on the way in.

impl Serialize for DualStack {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            DualStack::Auto => serializer.serialize_str("auto"),
            DualStack::Enabled => serializer.serialize_bool(true),
            DualStack::Disabled => serializer.serialize_bool(false),
        }
    }
}

impl<'de> Deserialize<'de> for DualStack {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = DualStack;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("auto, true or false")
            }

            fn visit_bool<E: de::Error>(self, v: bool) -> Result<DualStack, E> {
                Ok(if v {
                    DualStack::Enabled
                } else {
                    DualStack::Disabled
                })
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<DualStack, E> {
                match v {
                    "auto" => Ok(DualStack::Auto),
                    "true" => Ok(DualStack::Enabled),
                    "false" => Ok(DualStack::Disabled),
                    _ => Err(E::invalid_value(de::Unexpected::Str(v), &self)),
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl Serialize for CgroupRoot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            CgroupRoot::Auto => serializer.serialize_str("auto"),
            CgroupRoot::Path(p) => serializer.collect_str(&p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for CgroupRoot {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        parse_str(deserializer, "auto or an absolute path", |text| {
            if text == "auto" {
                return Ok(CgroupRoot::Auto);
            }
            let path = PathBuf::from(text);
            if !path.is_absolute() {
                return Err(format!(
                    "cgroup root {text:?} must be \"auto\" or an absolute path (e.g. /sys/fs/cgroup/kubepods.slice)"
                ));
            }
            Ok(CgroupRoot::Path(path))
        })
    }
}

/// Reads a string and parses it inside the visitor, so that serde_yaml_ng attaches the
/// value's own key path (`blocked.cidrs[1]`) and line to the error.
fn parse_str<'de, D, T, E>(
    deserializer: D,
    expecting: &'static str,
    parse: fn(&str) -> Result<T, E>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    E: fmt::Display,
{
    struct Visitor<T, E> {
        expecting: &'static str,
        parse: fn(&str) -> Result<T, E>,
    }
    impl<T, E: fmt::Display> de::Visitor<'_> for Visitor<T, E> {
        type Value = T;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.expecting)
        }

        fn visit_str<Er: de::Error>(self, v: &str) -> Result<T, Er> {
            (self.parse)(v).map_err(Er::custom)
        }
    }
    deserializer.deserialize_str(Visitor { expecting, parse })
}

/// `auto` (`None`) or the kubelet's spelling of a driver.
mod driver_name {
    use serde::{Deserializer, Serializer};

    use super::CgroupDriver;

    pub fn serialize<S: Serializer>(d: &Option<CgroupDriver>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(d.map_or("auto", CgroupDriver::as_str))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<CgroupDriver>, D::Error> {
        super::parse_str(d, "auto, systemd or cgroupfs", |text| match text {
            "auto" => Ok(None),
            other => other.parse::<CgroupDriver>().map(Some).map_err(|_| {
                format!("unknown cgroup driver {other:?} (expected auto, systemd or cgroupfs)")
            }),
        })
    }
}

/// Verdicts as config files and the node's state file spell them.
pub(crate) mod verdict_name {
    use datalab_guard_common::Verdict;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Verdict, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(v.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Verdict, D::Error> {
        super::parse_str(d, "guard or exempt", |text| {
            [Verdict::Guard, Verdict::Exempt]
                .into_iter()
                .find(|v| v.name() == text)
                .ok_or_else(|| format!("unknown verdict {text:?}, expected guard or exempt"))
        })
    }
}

mod mode_name {
    use datalab_guard_common::Mode;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &Mode, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(m.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Mode, D::Error> {
        super::parse_str(d, "enforce or audit", |text| {
            [Mode::Enforce, Mode::Audit]
                .into_iter()
                .find(|m| m.name() == text)
                .ok_or_else(|| format!("unknown mode {text:?}, expected enforce or audit"))
        })
    }
}

/// CIDRs as text; each element is parsed as it is read, so an error names its index.
mod cidr_list {
    use datalab_guard_common::cidr::Cidr;
    use serde::{Deserialize, Deserializer, Serializer};

    use crate::blocklist;

    struct Item(Cidr);

    impl<'de> Deserialize<'de> for Item {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::parse_str(d, "a CIDR such as 169.254.169.254/32", |t| {
                blocklist::parse_cidr(t).map(Item)
            })
        }
    }

    pub fn serialize<S: Serializer>(cidrs: &[Cidr], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(cidrs.iter().map(blocklist::describe))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Cidr>, D::Error> {
        Ok(Vec::<Item>::deserialize(d)?
            .into_iter()
            .map(|i| i.0)
            .collect())
    }
}

/// Presets by `--preset` name; parsed per element (rather than through `Preset`'s own
/// `Deserialize`) so that an error names its index.
mod preset_list {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::blocklist::Preset;

    struct Item(Preset);

    impl<'de> Deserialize<'de> for Item {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            super::parse_str(d, "a preset name such as aws", |t| {
                t.parse::<Preset>().map(Item)
            })
        }
    }

    pub fn serialize<S: Serializer>(presets: &[Preset], s: S) -> Result<S::Ok, S::Error> {
        presets.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Preset>, D::Error> {
        Ok(Vec::<Item>::deserialize(d)?
            .into_iter()
            .map(|i| i.0)
            .collect())
    }
}

/// A namespace name, checked as it is read.
struct Label(String);

impl<'de> Deserialize<'de> for Label {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "a namespace name", |text| {
            validate_dns1123_label(text)
                .map(|()| Label(text.to_owned()))
                .map_err(|e| format!("namespace name {text:?} {e}"))
        })
    }
}

fn de_label_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Vec::<Label>::deserialize(d)?
        .into_iter()
        .map(|l| l.0)
        .collect())
}

fn de_opt_label<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<Label>::deserialize(d)?.map(|l| l.0))
}

/// An exemption selector: never empty, because the empty selector matches everything and
/// a blank or forgotten value must not exempt every pod (`nonEnvironmentVerdict: exempt` is
/// the way to say that).
struct ExemptionSelector(LabelSelector);

impl<'de> Deserialize<'de> for ExemptionSelector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "a label selector", |text| {
            let selector = LabelSelector::parse(text).map_err(|e| e.to_string())?;
            if selector.is_empty() {
                return Err(format!(
                    "empty label selector {text:?}: an exemption selector must not be empty (it would match everything)"
                ));
            }
            Ok(ExemptionSelector(selector))
        })
    }
}

fn de_exemption_selector<'de, D: Deserializer<'de>>(d: D) -> Result<LabelSelector, D::Error> {
    Ok(ExemptionSelector::deserialize(d)?.0)
}

fn de_exemption_selector_list<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Vec<LabelSelector>, D::Error> {
    Ok(Vec::<ExemptionSelector>::deserialize(d)?
        .into_iter()
        .map(|s| s.0)
        .collect())
}

/// An absolute path, checked as it is read.
struct AbsolutePath(PathBuf);

impl<'de> Deserialize<'de> for AbsolutePath {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        parse_str(d, "an absolute path", |text| {
            let path = PathBuf::from(text);
            if path.is_absolute() {
                Ok(AbsolutePath(path))
            } else {
                Err(format!("{text:?} is not an absolute path"))
            }
        })
    }
}

/// An absolute path or null.
fn de_opt_absolute_path<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
    Ok(Option::<AbsolutePath>::deserialize(d)?.map(|p| p.0))
}

/// A taint key (the label key syntax, `[prefix/]name`), or empty for none.
fn de_taint_key<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    parse_str(d, "a taint key", |text| {
        if text.is_empty() {
            return Ok(String::new());
        }
        datalab_guard_policy::selector::validate_key(text)
            .map(|()| text.to_owned())
            .map_err(|e| format!("taint key {text:?}: {e}"))
    })
}

/// An object name (DNS-1123 subdomain), checked as it is read.
fn de_subdomain<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    parse_str(d, "an object name", |text| {
        validate_dns1123_subdomain(text)
            .map(|()| text.to_owned())
            .map_err(|e| format!("name {text:?} {e}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../deploy/config.example.yaml");

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml_str(text, Path::new("/etc/datalab-guard/config.yaml"))
    }

    fn parse_err(text: &str) -> String {
        parse(text).expect_err(text).to_string()
    }

    #[test]
    fn defaults_are_the_designed_ones() {
        let c = Config::default();
        assert_eq!(
            c.environments.namespace_selector.to_string(),
            "datalab.io/environment=true"
        );
        assert!(c.exemptions.namespaces.is_empty());
        assert!(c.exemptions.namespace_selectors.is_empty());
        assert!(c.exemptions.pod_selectors.is_empty());
        assert_eq!(c.non_environment_verdict, Verdict::Exempt);
        assert_eq!(c.unknown_cgroup_verdict, Verdict::Guard);
        assert_eq!(c.mode, Mode::Enforce);
        assert!(!c.deny_raw_sockets);
        assert_eq!(c.network_policy.name, "allow-web-egress");
        assert!(c.network_policy.manage);
        assert_eq!(c.network_policy.dual_stack, DualStack::Auto);
        assert!(c.network_policy.remove_when_not_environment);
        assert_eq!(c.pod_security.level, PodSecurityLevel::Baseline);
        assert!(!c.pod_security.set_label);
        assert!(c.probe.enabled);
        assert_eq!(c.probe.interval.as_std(), Duration::from_secs(300));
        assert_eq!(c.probe.jitter.as_std(), Duration::from_secs(30));
        assert_eq!(c.probe.timeout.as_std(), Duration::from_secs(2));
        assert_eq!(c.probe.port, 80);
        assert_eq!(c.audit.events_per_second, 5);
        assert!(c.audit.kubernetes_events);
        assert_eq!(c.audit.events_per_pod_per_minute, 1);
        assert_eq!(c.audit.events_per_minute_per_node, 30);
        assert_eq!(c.cgroup.root, CgroupRoot::Auto);
        assert_eq!(c.cgroup.driver, None);
        assert_eq!(c.rescan_interval.as_std(), Duration::from_secs(10));
        assert_eq!(c.runtime, crate::cri::RuntimeConfig::default());
        assert_eq!(c.state_dir, None);
        assert_eq!(c.startup_taint, "datalab.io/guard-not-ready");
        assert_eq!(c.leader_election.lease_name, "datalab-guard-leader");
        assert_eq!(c.leader_election.namespace, None);
        assert_eq!(
            c.leader_election.lease_duration.as_std(),
            Duration::from_secs(15)
        );
        assert_eq!(
            c.leader_election.renew_deadline.as_std(),
            Duration::from_secs(10)
        );
        assert_eq!(
            c.leader_election.retry_period.as_std(),
            Duration::from_secs(2)
        );
        c.validate().unwrap();
        assert!(c.warnings().is_empty());
        let texts: Vec<String> = c.blocklist().iter().map(blocklist::describe).collect();
        assert_eq!(texts, blocklist::DEFAULT_BLOCKED);
    }

    #[test]
    fn empty_and_comment_only_files_are_the_defaults() {
        for text in ["", "\n", "# nothing here\n", "---\n"] {
            assert_eq!(parse(text).unwrap(), Config::default(), "{text:?}");
        }
        assert_eq!(parse("probe: {}").unwrap(), Config::default());
    }

    #[test]
    fn the_example_file_is_the_defaults() {
        assert_eq!(parse(EXAMPLE).unwrap(), Config::default());
    }

    /// Every key of the config appears in the example (so it documents all of them), and
    /// the example has no key the config lacks (the parse above would fail).
    #[test]
    fn the_example_file_lists_every_key() {
        fn keys(v: &serde_yaml_ng::Value, prefix: &str, out: &mut Vec<String>) {
            if let serde_yaml_ng::Value::Mapping(m) = v {
                for (k, v) in m {
                    let key = format!("{prefix}{}", k.as_str().unwrap());
                    out.push(key.clone());
                    keys(v, &format!("{key}."), out);
                }
            }
        }
        let example: serde_yaml_ng::Value = serde_yaml_ng::from_str(EXAMPLE).unwrap();
        let defaults = serde_yaml_ng::to_value(Config::default()).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        keys(&example, "", &mut a);
        keys(&defaults, "", &mut b);
        a.sort();
        b.sort();
        assert_eq!(a, b);
        // And every key line has a comment on it or just above it (section keys whose
        // children are commented count through their children).
        let lines: Vec<&str> = EXAMPLE.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if t.is_empty() || t.starts_with('#') || !t.contains(':') {
                continue;
            }
            let is_section = t.ends_with(':');
            let commented = i > 0 && lines[i - 1].trim_start().starts_with('#');
            let first_child_commented = lines
                .get(i + 1)
                .is_some_and(|l| l.trim_start().starts_with('#'));
            assert!(
                commented || (is_section && first_child_commented),
                "example line {} has no comment: {line}",
                i + 1
            );
        }
    }

    #[test]
    fn a_full_config_round_trips() {
        let text = r#"
environments:
  namespaceSelector: "tenant in (yes, true), !legacy"
exemptions:
  namespaces: [kube-system, aws-node]
  namespaceSelectors: ["kubernetes.io/metadata.name=ebs-csi"]
  podSelectors:
    - namespace: kube-system
      selector: k8s-app=aws-node
    - selector: "app.kubernetes.io/name=cloud-agent"
nonEnvironmentVerdict: guard
unknownCgroupVerdict: exempt
blocked:
  cidrs: ["100.100.100.200", "10.1.2.3/8", "fd00::/8"]
  presets: [gcp, oci]
mode: audit
denyRawSockets: true
stateDir: /var/lib/guard-state
startupTaint: ""
networkPolicy:
  name: deny-imds
  manage: false
  dualStack: false
  removeWhenNotEnvironment: false
podSecurity:
  level: restricted
  setLabel: true
probe:
  enabled: false
  interval: 1m30s
  jitter: 500ms
  timeout: 1s
  port: 8080
audit:
  eventsPerSecond: 0
  kubernetesEvents: false
  eventsPerPodPerMinute: 10
  eventsPerMinutePerNode: 120
cgroup:
  root: /sys/fs/cgroup/kubepods.slice
  driver: systemd
rescanInterval: 1h
leaderElection:
  leaseName: guard
  namespace: platform
  leaseDuration: 30s
  renewDeadline: 20s
  retryPeriod: 5s
"#;
        let c = parse(text).unwrap();
        assert_ne!(c, Config::default());
        assert_eq!(
            c.exemptions.pod_selectors[0].namespace.as_deref(),
            Some("kube-system")
        );
        assert_eq!(c.exemptions.pod_selectors[1].namespace, None);
        assert_eq!(c.blocked.presets, [Preset::Gcp, Preset::Oracle]);
        assert_eq!(c.network_policy.dual_stack, DualStack::Disabled);
        assert_eq!(
            c.cgroup.root,
            CgroupRoot::Path("/sys/fs/cgroup/kubepods.slice".into())
        );
        assert_eq!(c.cgroup.driver, Some(CgroupDriver::Systemd));
        assert_eq!(c.probe.interval.as_std(), Duration::from_secs(90));
        assert_eq!(c.state_dir, Some(PathBuf::from("/var/lib/guard-state")));
        assert_eq!(c.startup_taint, "");
        assert_eq!(c.warnings().len(), 2);
        let texts: Vec<String> = c.blocklist().iter().map(blocklist::describe).collect();
        assert!(texts.contains(&"10.0.0.0/8".to_owned()));
        assert!(texts.contains(&"169.254.169.254/32".to_owned()));
        assert!(texts.contains(&"fd20:ce::254/128".to_owned()));

        let written = serde_yaml_ng::to_string(&c).unwrap();
        assert_eq!(parse(&written).unwrap(), c, "{written}");
        let defaults = serde_yaml_ng::to_string(&Config::default()).unwrap();
        assert_eq!(parse(&defaults).unwrap(), Config::default(), "{defaults}");
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key_and_line() {
        let e = parse_err("modes: audit\n");
        assert!(
            e.contains("unknown field `modes`") && e.ends_with("at line 1 column 1"),
            "{e}"
        );

        let e = parse_err("mode: enforce\nmodes: audit\n");
        assert!(e.contains("/etc/datalab-guard/config.yaml"), "{e}");
        assert!(e.contains("unknown field `modes`"), "{e}");
        assert!(e.contains("line 2"), "{e}");

        let e = parse_err("probe:\n  enabled: true\n  intervall: 5m\n");
        assert!(e.contains("probe: unknown field `intervall`"), "{e}");
        assert!(e.contains("line 3"), "{e}");

        let e =
            parse_err("exemptions:\n  podSelectors:\n    - selector: a=b\n      namespaces: [x]\n");
        assert!(e.contains("unknown field `namespaces`"), "{e}");
        assert!(e.contains("exemptions.podSelectors[0]"), "{e}");

        match parse("networkPolicy:\n  dualstack: true\n").unwrap_err() {
            ConfigError::Parse { line, message, .. } => {
                assert_eq!(line, Some(2));
                assert!(
                    message.starts_with("networkPolicy: unknown field `dualstack`"),
                    "{message}"
                );
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn bad_values_are_errors_naming_the_key_and_value() {
        let cases = [
            ("blocked:\n  cidrs: [10.0.0.0/8, 169.254.169.254/33]\n", &["blocked.cidrs[1]", "169.254.169.254/33", "line 2"][..]),
            ("blocked:\n  cidrs: [metadata]\n", &["blocked.cidrs[0]", "\"metadata\""]),
            ("blocked:\n  presets: [aws, awz]\n", &["blocked.presets[1]", "unknown preset \"awz\""]),
            ("probe:\n  interval: 5x\n", &["probe.interval", "invalid duration \"5x\"", "line 2"]),
            ("probe:\n  timeout: 30\n", &["probe.timeout", "missing unit"]),
            ("probe:\n  jitter: -1s\n", &["probe.jitter", "invalid duration"]),
            ("rescanInterval: 1.5s\n", &["rescanInterval", "invalid duration"]),
            ("environments:\n  namespaceSelector: \"a in b\"\n", &["environments.namespaceSelector", "invalid label selector \"a in b\"", "expected '('"]),
            ("exemptions:\n  namespaceSelectors: [\"ok=1\", \"bad key=1\"]\n", &["exemptions.namespaceSelectors[1]", "\"bad key=1\""]),
            ("exemptions:\n  podSelectors:\n    - selector: \"a=b,\"\n", &["exemptions.podSelectors[0].selector", "trailing ','"]),
            ("exemptions:\n  podSelectors:\n    - namespace: kube-system\n", &["exemptions.podSelectors[0]", "missing field `selector`"]),
            ("exemptions:\n  podSelectors:\n    - selector:\n", &["exemptions.podSelectors[0].selector", "must not be empty", "line 3"]),
            ("exemptions:\n  podSelectors:\n    - selector: \" \"\n", &["exemptions.podSelectors[0].selector", "must not be empty"]),
            ("exemptions:\n  namespaceSelectors: [a=b, \"\"]\n", &["exemptions.namespaceSelectors[1]", "must not be empty"]),
            ("exemptions:\n  namespaces: [kube-system, Kube_System]\n", &["exemptions.namespaces[1]", "\"Kube_System\""]),
            ("exemptions:\n  podSelectors:\n    - namespace: \"a.b\"\n      selector: x\n", &["exemptions.podSelectors[0].namespace", "\"a.b\""]),
            ("nonEnvironmentVerdict: allow\n", &["nonEnvironmentVerdict: unknown verdict \"allow\", expected guard or exempt at line 1"]),
            ("unknownCgroupVerdict: Guard\n", &["unknownCgroupVerdict", "guard or exempt"]),
            ("mode: block\n", &["mode", "enforce or audit"]),
            ("networkPolicy:\n  dualStack: maybe\n", &["networkPolicy.dualStack", "auto, true or false"]),
            ("networkPolicy:\n  name: Allow_Web\n", &["networkPolicy.name", "\"Allow_Web\""]),
            ("podSecurity:\n  level: strict\n", &["podSecurity.level", "strict"]),
            ("cgroup:\n  root: kubepods.slice\n", &["cgroup.root", "absolute path"]),
            ("stateDir: var/lib/dg\n", &["stateDir", "\"var/lib/dg\" is not an absolute path"]),
            ("startupTaint: \"not ready\"\n", &["startupTaint", "taint key \"not ready\""]),
            ("startupTaint: a/b/c\n", &["startupTaint", "at most one '/'"]),
            ("cgroup:\n  driver: cgroupv2\n", &["cgroup.driver", "cgroupv2"]),
            ("probe:\n  port: 70000\n", &["probe.port"]),
            ("audit:\n  eventsPerSecond: -1\n", &["audit.eventsPerSecond"]),
            (
                "audit:\n  eventsPerMinutePerNode: 0\n",
                &["audit.eventsPerMinutePerNode", "between 1 and 6000"],
            ),
            (
                "audit:\n  eventsPerMinutePerNode: 6001\n",
                &["audit.eventsPerMinutePerNode"],
            ),
            ("leaderElection:\n  namespace: \"\"\n", &["leaderElection.namespace"]),
            (
                "controller:\n  writesPerSecond: 0\n",
                &["controller.writesPerSecond", "between 1 and 10000"],
            ),
            ("controller:\n  writeBurst: 10001\n", &["controller.writeBurst"]),
            ("controller:\n  writesPerSecond: -5\n", &["controller.writesPerSecond"]),
            ("denyRawSockets: yes\n", &["denyRawSockets"]),
            ("tunnels:\n  vxlanPorts: [0]\n", &["tunnels", "port 0"]),
            ("tunnels:\n  vxlanPorts: [70000]\n", &["tunnels"]),
            (
                "tunnels:\n  genevePorts: [4789]\n",
                &["tunnels", "4789", "two encapsulations"],
            ),
            (
                "tunnels:\n  vxlanPorts: [1, 2, 3, 4, 5, 6, 7]\n",
                &["tunnels", "more than 8"],
            ),
            ("tunnels:\n  udpPorts: [4789]\n", &["udpPorts"]),
            ("probe: [1]\n", &["probe"]),
            ("mode: [enforce\n", &["line 1"]),
        ];
        for (text, needles) in cases {
            let e = parse_err(text);
            for needle in needles {
                assert!(e.contains(needle), "{text:?}: {e:?} lacks {needle:?}");
            }
        }
    }

    #[test]
    fn related_values_are_checked_together() {
        let cases = [
            (
                "probe:\n  timeout: 5m\n",
                "probe.timeout: 5m must be shorter than probe.interval (5m)",
            ),
            ("probe:\n  interval: 10s\n  jitter: 30s\n", "probe.jitter"),
            (
                "probe:\n  interval: 0s\n",
                "probe.interval: must be greater than 0",
            ),
            (
                "probe:\n  timeout: 0\n",
                "probe.timeout: must be greater than 0",
            ),
            ("probe:\n  port: 0\n", "probe.port"),
            (
                "rescanInterval: 0ms\n",
                "rescanInterval: must be greater than 0",
            ),
            ("runtime:\n  timeout: 0s\n", "runtime.timeout"),
            (
                "leaderElection:\n  renewDeadline: 15s\n",
                "leaderElection.leaseDuration",
            ),
            (
                "leaderElection:\n  retryPeriod: 9s\n",
                "leaderElection.renewDeadline",
            ),
            (
                "leaderElection:\n  retryPeriod: 0s\n",
                "leaderElection.retryPeriod",
            ),
        ];
        for (text, needle) in cases {
            let err = parse(text).expect_err(text);
            assert!(
                matches!(err, ConfigError::Invalid { .. }),
                "{text:?}: {err:?}"
            );
            let e = err.to_string();
            assert!(
                e.starts_with("invalid config file /etc/datalab-guard/config.yaml: "),
                "{e}"
            );
            assert!(e.contains(needle), "{text:?}: {e:?} lacks {needle:?}");
        }
    }

    #[test]
    fn dual_stack_accepts_booleans_and_auto() {
        for (text, want) in [
            ("auto", DualStack::Auto),
            ("true", DualStack::Enabled),
            ("false", DualStack::Disabled),
            ("\"true\"", DualStack::Enabled),
            ("'false'", DualStack::Disabled),
        ] {
            let c = parse(&format!("networkPolicy:\n  dualStack: {text}\n")).unwrap();
            assert_eq!(c.network_policy.dual_stack, want, "{text}");
        }
    }

    #[test]
    fn load_reads_files_and_names_them_in_errors() {
        let dir = env::temp_dir().join(format!("datalab-guard-config-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.yaml");
        fs::write(&good, "mode: audit\n").unwrap();
        assert_eq!(Config::load(&good).unwrap().mode, Mode::Audit);
        let bad = dir.join("bad.yaml");
        fs::write(&bad, "mode: audit\nbogus: 1\n").unwrap();
        let e = Config::load(&bad).unwrap_err().to_string();
        assert!(
            e.contains("bad.yaml") && e.contains("bogus") && e.contains("line 2"),
            "{e}"
        );
        let missing = dir.join("missing.yaml");
        let e = Config::load(&missing).unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }));
        assert!(
            e.to_string().starts_with("cannot read config file ")
                && e.to_string().contains("missing.yaml")
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tunnels_reach_the_kernel_config_and_the_flag_denies_them() {
        use datalab_guard_common::UdpTunnel;
        let c = parse("tunnels:\n  vxlanPorts: [9999]\n  teredoPorts: []\n").unwrap();
        let k = c.datapath().tunnels;
        assert_eq!(k.udp_kind(9999), Some(UdpTunnel::Vxlan));
        assert_eq!(k.udp_kind(4789), None);
        assert_eq!(k.udp_kind(3544), None);
        assert_eq!(k.udp_kind(6081), Some(UdpTunnel::Geneve));
        assert_eq!(k.deny_all, 0);
        let d = Config::default().datapath().tunnels;
        for (port, kind) in [
            (4789, UdpTunnel::Vxlan),
            (8472, UdpTunnel::Vxlan),
            (6081, UdpTunnel::Geneve),
            (3544, UdpTunnel::Teredo),
        ] {
            assert_eq!(d.udp_kind(port), Some(kind));
        }
        let source = ConfigSource {
            deny_tunnels: true,
            ..ConfigSource::default()
        };
        assert_eq!(source.load().unwrap().datapath().tunnels.deny_all, 1);
    }

    #[test]
    fn cli_flags_add_to_the_file_and_explicit_mode_overrides() {
        let mut c =
            parse("blocked:\n  cidrs: [10.0.0.0/8]\n  presets: [aws]\nmode: audit\n").unwrap();
        c.merge_cli(
            &["10.0.0.0/8".into(), "192.0.2.1".into()],
            &[Preset::Aws, Preset::Azure],
            None,
        )
        .unwrap();
        let texts: Vec<String> = c.blocked.cidrs.iter().map(blocklist::describe).collect();
        assert_eq!(texts, ["10.0.0.0/8", "192.0.2.1/32"]);
        assert_eq!(c.blocked.presets, [Preset::Aws, Preset::Azure]);
        assert_eq!(c.mode, Mode::Audit, "no explicit --mode keeps the file's");
        c.merge_cli(&[], &[], Some(Mode::Enforce)).unwrap();
        assert_eq!(c.mode, Mode::Enforce);

        let before = c.clone();
        let e = c
            .merge_cli(&["192.0.2.2".into(), "nope".into()], &[], Some(Mode::Audit))
            .unwrap_err();
        assert!(e.to_string().contains("\"nope\""));
        assert_eq!(c, before, "a bad flag changes nothing");
    }

    #[test]
    fn durations_parse_and_print() {
        for (text, ms, canonical) in [
            ("500ms", 500, "500ms"),
            ("30s", 30_000, "30s"),
            ("5m", 300_000, "5m"),
            ("1h", 3_600_000, "1h"),
            ("1m30s", 90_000, "1m30s"),
            ("90s", 90_000, "1m30s"),
            ("1h0m30s", 3_630_000, "1h30s"),
            ("2s500ms", 2_500, "2s500ms"),
            (" 2s ", 2_000, "2s"),
            ("0", 0, "0s"),
            ("0s", 0, "0s"),
        ] {
            let d: HumanDuration = text.parse().unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(d.as_std(), Duration::from_millis(ms), "{text}");
            assert_eq!(d.to_string(), canonical);
            assert_eq!(canonical.parse::<HumanDuration>().unwrap(), d);
        }
        for bad in [
            "",
            "s",
            "5",
            "5 m",
            "5M",
            "1.5s",
            "-1s",
            "5us",
            "1d",
            "m5",
            "99999999999999999999s",
            "18446744073709551615h",
        ] {
            let e = bad.parse::<HumanDuration>().expect_err(bad).to_string();
            assert!(e.starts_with(&format!("invalid duration {bad:?}")), "{e}");
        }
    }

    #[test]
    fn lease_namespace_falls_back_to_the_agents_own() {
        let mut le = LeaderElectionConfig::default();
        assert_eq!(le.namespace_or(Some("guard-system")), "guard-system");
        assert_eq!(le.namespace_or(Some("")), FALLBACK_NAMESPACE);
        assert_eq!(le.namespace_or(None), FALLBACK_NAMESPACE);
        le.namespace = Some("platform".into());
        assert_eq!(le.namespace_or(Some("guard-system")), "platform");
    }

    #[test]
    fn risky_settings_are_warned_about() {
        let c = parse("unknownCgroupVerdict: exempt\nenvironments:\n  namespaceSelector: \"\"\n")
            .unwrap();
        let w = c.warnings();
        assert_eq!(w.len(), 2);
        assert!(w[0].contains("fail-open"));
        assert!(w[1].contains("every namespace is an environment"));
    }

    /// The file's exemptions reach the policy core unchanged, and the policy core applies
    /// them (one pod per rule kind).
    #[test]
    fn policy_config_carries_every_policy_key() {
        let config = parse(
            r#"
environments:
  namespaceSelector: "tier=tenant"
exemptions:
  namespaces: [kube-system]
  namespaceSelectors: ["platform=true"]
  podSelectors:
    - selector: app=aws-node
    - namespace: storage
      selector: role=csi
nonEnvironmentVerdict: guard
"#,
        )
        .unwrap();
        let cfg = config.policy_config(Some("uid-agent".into()));
        assert_eq!(cfg.environment_selector.to_string(), "tier=tenant");
        assert_eq!(
            cfg.exempt_namespaces.iter().collect::<Vec<_>>(),
            ["kube-system"]
        );
        assert_eq!(
            cfg.exempt_namespace_selectors[0].to_string(),
            "platform=true"
        );
        assert_eq!(
            cfg.exempt_pod_selectors,
            vec![
                PodExemption {
                    namespace: None,
                    selector: "app=aws-node".parse().unwrap(),
                },
                PodExemption {
                    namespace: Some("storage".into()),
                    selector: "role=csi".parse().unwrap(),
                },
            ]
        );
        assert_eq!(cfg.non_environment_verdict, Verdict::Guard);
        assert_eq!(cfg.own_pod_uid.as_deref(), Some("uid-agent"));
        // An empty downward-API value is no UID at all.
        assert_eq!(config.policy_config(Some(String::new())).own_pod_uid, None);
        assert_eq!(config.policy_config(None).own_pod_uid, None);
    }

    #[test]
    fn dead_exemptions_are_reported_with_their_key() {
        assert_eq!(
            Config::default().shadowed_exemptions(),
            Vec::<String>::new()
        );
        assert_eq!(
            parse(EXAMPLE).unwrap().shadowed_exemptions(),
            Vec::<String>::new()
        );
        let config = parse(
            r#"
environments:
  namespaceSelector: "team"
exemptions:
  namespaces: [kube-system]
  namespaceSelectors: ["team=platform", "platform=true"]
  podSelectors:
    - selector: app=aws-node
"#,
        )
        .unwrap();
        assert_eq!(
            config.shadowed_exemptions(),
            vec![
                "exemptions.namespaceSelectors: exemption \"team=platform\" never applies: every namespace it matches is an environment (environments.namespaceSelector \"team\"), where no exemption applies"
            ]
        );
        // Every namespace an environment: every exemption is dead, each named once.
        let everything = parse(
            r#"
environments:
  namespaceSelector: ""
exemptions:
  namespaces: [kube-system]
  podSelectors:
    - namespace: storage
      selector: role=csi
"#,
        )
        .unwrap()
        .shadowed_exemptions();
        assert_eq!(everything.len(), 2, "{everything:?}");
        assert!(everything[0].starts_with("exemptions.namespaces: exemption \"kube-system\""));
        assert!(everything[1]
            .starts_with("exemptions.podSelectors: exemption \"role=csi in namespace storage\""));
    }
}
