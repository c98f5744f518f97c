//! Running `dg-probe` (one network attempt per process) and reading its JSON result.
//!
//! A separate process per attempt is deliberate: it is placed in the cgroup and namespace
//! before exec (see [`crate::process`]), so each attempt has exactly the identity a tenant's
//! process would have, and a hanging attempt cannot stall the test beyond its own timeout.

use std::path::Path;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{bins, process::run_in};

/// What `dg-probe` reported for one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    /// The probe kind (`tcp`, `http`, `udp-sendto`, ...).
    pub kind: String,
    /// Whether the attempt worked (meaning depends on the kind; see `dg-probe --help`).
    pub ok: bool,
    /// The errno of the failure, if any (`110` = ETIMEDOUT for timeouts, `1` = EPERM).
    pub errno: Option<i32>,
    /// Human-readable failure, if any.
    pub error: Option<String>,
    /// Wall time of the attempt.
    pub elapsed_ms: f64,
    /// The JSON line as printed.
    pub raw: String,
}

impl ProbeResult {
    /// Parses the single JSON line `dg-probe` prints.
    pub fn parse(line: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(line.trim())
            .with_context(|| format!("dg-probe printed non-JSON: {line:?}"))?;
        let field = |name: &str| {
            v.get(name)
                .ok_or_else(|| anyhow!("dg-probe output lacks {name:?}: {line}"))
        };
        let errno = match field("errno")? {
            serde_json::Value::Null => None,
            n => Some(
                n.as_i64()
                    .and_then(|n| i32::try_from(n).ok())
                    .ok_or_else(|| anyhow!("bad errno in {line}"))?,
            ),
        };
        Ok(Self {
            kind: field("kind")?
                .as_str()
                .ok_or_else(|| anyhow!("bad kind in {line}"))?
                .to_string(),
            ok: field("ok")?
                .as_bool()
                .ok_or_else(|| anyhow!("bad ok in {line}"))?,
            errno,
            error: field("error")?.as_str().map(str::to_string),
            elapsed_ms: field("elapsed_ms")?
                .as_f64()
                .ok_or_else(|| anyhow!("bad elapsed_ms in {line}"))?,
            raw: line.trim().to_string(),
        })
    }

    /// True if the attempt failed with EPERM (what the guard's connect/sendmsg hooks return).
    pub fn is_eperm(&self) -> bool {
        self.errno == Some(libc::EPERM)
    }

    /// True if the attempt timed out (what a dropped packet without a syscall hook looks like).
    pub fn is_timeout(&self) -> bool {
        self.errno == Some(libc::ETIMEDOUT)
    }
}

/// Runs `dg-probe KIND ADDR PORT [--timeout-ms N]` inside `cgroup` and, if given, the network
/// namespace `netns`, and returns its result. Fails if the probe could not run or printed
/// something other than one JSON line (a probe *attempt* failing is a normal result).
pub fn probe_in(
    cgroup: &Path,
    netns: Option<&str>,
    kind: &str,
    addr: &str,
    port: u16,
    timeout_ms: Option<u64>,
) -> Result<ProbeResult> {
    let bin = bins::probe_bin()?;
    let mut argv = vec![
        bin.into_os_string(),
        kind.into(),
        addr.into(),
        port.to_string().into(),
    ];
    if let Some(t) = timeout_ms {
        argv.push("--timeout-ms".into());
        argv.push(t.to_string().into());
    }
    let out = run_in(cgroup, netns, &argv)?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "dg-probe {kind} {addr} {port} exited with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            stdout
        );
    }
    let lines: Vec<&str> = stdout.lines().filter(|l| !l.trim().is_empty()).collect();
    match lines.as_slice() {
        [line] => ProbeResult::parse(line),
        _ => bail!(
            "dg-probe {kind} {addr} {port} printed {} lines, expected 1: {stdout:?}",
            lines.len()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_success_and_failure_lines() {
        let ok = ProbeResult::parse(
            r#"{"kind":"http","ok":true,"errno":null,"error":null,"elapsed_ms":1.5}"#,
        )
        .unwrap();
        assert!(ok.ok && ok.errno.is_none() && ok.error.is_none());
        assert_eq!(ok.kind, "http");
        let fail = ProbeResult::parse(
            r#"{"kind":"tcp","ok":false,"errno":1,"error":"Operation not permitted","elapsed_ms":0.2}"#,
        )
        .unwrap();
        assert!(!fail.ok && fail.is_eperm() && !fail.is_timeout());
        assert_eq!(fail.error.as_deref(), Some("Operation not permitted"));
    }

    #[test]
    fn rejects_incomplete_lines() {
        assert!(ProbeResult::parse(r#"{"kind":"tcp","ok":true}"#).is_err());
        assert!(ProbeResult::parse("ok").is_err());
    }
}
