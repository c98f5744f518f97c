//! The `runtime` section of the node config: which CRI socket to ask and how long to wait.
//!
//! ```yaml
//! runtime:
//!   socket: auto      # or none, or an absolute path such as /run/k3s/containerd/containerd.sock
//!   timeout: 2s       # bound on every CRI call
//! ```
//! Kept here, beside the client it configures, so that `crate::config::Config` only embeds
//! it (`pub runtime: crate::cri::RuntimeConfig`); unknown keys are an error, as everywhere.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::config::HumanDuration;

/// Sockets `socket: auto` tries, in order: containerd (EKS, GKE, AKS, kind), CRI-O
/// (OpenShift), k3s/RKE2's embedded containerd, cri-dockerd. A DaemonSet mounts the one its
/// platform uses at the same path (read-only).
pub const KNOWN_SOCKETS: &[&str] = &[
    "/run/containerd/containerd.sock",
    "/var/run/crio/crio.sock",
    "/run/k3s/containerd/containerd.sock",
    "/var/run/cri-dockerd.sock",
];

/// Default bound on every CRI call. Runtimes answer in milliseconds; a hung one must cost
/// the agent little, since until it answers a new pod simply stays guarded.
pub const DEFAULT_CALL_TIMEOUT: HumanDuration = HumanDuration::from_secs(2);
/// Longest `timeout` accepted: longer would only hide a hung runtime.
const MAX_CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct RuntimeConfig {
    /// The runtime's CRI socket; see [`RuntimeSocket`].
    pub socket: RuntimeSocket,
    /// Bound on every CRI call (connect included).
    pub timeout: HumanDuration,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            socket: RuntimeSocket::Auto,
            timeout: DEFAULT_CALL_TIMEOUT,
        }
    }
}

impl RuntimeConfig {
    /// The rules serde cannot express, as `(key, message)` like `Config::validate`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let t = self.timeout.as_std();
        if t.is_zero() || t > MAX_CALL_TIMEOUT {
            return Err((
                "runtime.timeout",
                format!(
                    "{} must be greater than 0 and at most {}s",
                    self.timeout,
                    MAX_CALL_TIMEOUT.as_secs()
                ),
            ));
        }
        Ok(())
    }
}

/// `socket: auto | none | <absolute path>`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum RuntimeSocket {
    /// The first of [`KNOWN_SOCKETS`] that exists when the agent starts.
    Auto,
    /// No runtime lookups: pods are classified from the API server (and the cache) only.
    Disabled,
    Path(PathBuf),
}

impl RuntimeSocket {
    /// The socket to connect to: the configured path, for `auto` the first known socket
    /// that `exists` says is there, `None` when disabled or when no known socket exists.
    pub fn resolve(&self, exists: impl Fn(&Path) -> bool) -> Option<PathBuf> {
        match self {
            RuntimeSocket::Auto => KNOWN_SOCKETS
                .iter()
                .map(Path::new)
                .find(|p| exists(p))
                .map(Path::to_path_buf),
            RuntimeSocket::Disabled => None,
            RuntimeSocket::Path(p) => Some(p.clone()),
        }
    }
}

impl TryFrom<String> for RuntimeSocket {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        match text.as_str() {
            "auto" => Ok(RuntimeSocket::Auto),
            "none" => Ok(RuntimeSocket::Disabled),
            _ if Path::new(&text).is_absolute() => Ok(RuntimeSocket::Path(text.into())),
            _ => Err(format!(
                "runtime socket {text:?} must be \"auto\", \"none\" or an absolute path \
                 (e.g. /run/containerd/containerd.sock)"
            )),
        }
    }
}

impl From<RuntimeSocket> for String {
    fn from(s: RuntimeSocket) -> String {
        s.to_string()
    }
}

impl fmt::Display for RuntimeSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeSocket::Auto => f.write_str("auto"),
            RuntimeSocket::Disabled => f.write_str("none"),
            RuntimeSocket::Path(p) => write!(f, "{}", p.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<RuntimeConfig, String> {
        let c: RuntimeConfig = serde_yaml_ng::from_str(yaml).map_err(|e| e.to_string())?;
        c.validate().map_err(|(k, m)| format!("{k}: {m}"))?;
        Ok(c)
    }

    #[test]
    fn defaults_and_values_parse() {
        assert_eq!(parse("{}").unwrap(), RuntimeConfig::default());
        let c = parse("socket: /var/run/crio/crio.sock\ntimeout: 500ms").unwrap();
        assert_eq!(
            c.socket,
            RuntimeSocket::Path("/var/run/crio/crio.sock".into())
        );
        assert_eq!(c.timeout, HumanDuration::from_millis(500));
        assert_eq!(
            parse("socket: none").unwrap().socket,
            RuntimeSocket::Disabled
        );
    }

    #[test]
    fn bad_values_and_unknown_keys_are_errors() {
        assert!(parse("socket: containerd.sock")
            .unwrap_err()
            .contains("must be \"auto\", \"none\" or an absolute path"));
        assert!(parse("sockets: auto")
            .unwrap_err()
            .contains("unknown field"));
        assert!(parse("timeout: 0s")
            .unwrap_err()
            .starts_with("runtime.timeout"));
        assert!(parse("timeout: 1m")
            .unwrap_err()
            .starts_with("runtime.timeout"));
    }

    #[test]
    fn round_trips_through_yaml() {
        for c in [
            RuntimeConfig::default(),
            RuntimeConfig {
                socket: RuntimeSocket::Path("/run/k3s/containerd/containerd.sock".into()),
                timeout: HumanDuration::from_millis(750),
            },
        ] {
            let text = serde_yaml_ng::to_string(&c).unwrap();
            assert_eq!(parse(&text).unwrap(), c, "{text}");
        }
    }

    #[test]
    fn auto_picks_the_first_existing_known_socket() {
        let only_crio = |p: &Path| p == Path::new("/var/run/crio/crio.sock");
        assert_eq!(
            RuntimeSocket::Auto.resolve(only_crio),
            Some(PathBuf::from("/var/run/crio/crio.sock"))
        );
        assert_eq!(
            RuntimeSocket::Auto.resolve(|_| true),
            Some(PathBuf::from(KNOWN_SOCKETS[0]))
        );
        assert_eq!(RuntimeSocket::Auto.resolve(|_| false), None);
        assert_eq!(RuntimeSocket::Disabled.resolve(|_| true), None);
        let explicit = RuntimeSocket::Path("/x.sock".into());
        assert_eq!(explicit.resolve(|_| false), Some(PathBuf::from("/x.sock")));
    }
}
