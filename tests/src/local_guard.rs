//! A running `datalab-guard local`, as several tests need it: a fresh cgroup with a `tenant`
//! child (guarded) and an `exempt` child (`--exempt`), pins in a private bpffs directory,
//! metrics on a free loopback port, ready before [`LocalGuard::start`] returns. Fields drop
//! in order: the agent first, then its pins, then the cgroups.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Context as _, Result};

use crate::{free_loopback_addr, Agent, BpffsDir, TestCgroup};

pub struct LocalGuard {
    pub agent: Agent,
    pub metrics: SocketAddr,
    /// The guarded child cgroup.
    pub guarded: PathBuf,
    /// The exempt child cgroup.
    pub exempt: PathBuf,
    bpffs: BpffsDir,
    cgroup: TestCgroup,
}

impl LocalGuard {
    /// Starts the agent with `extra` arguments after the ones above.
    pub fn start(extra: &[&str]) -> Result<LocalGuard> {
        let cgroup = TestCgroup::new().context("cgroup")?;
        let guarded = cgroup.child("tenant").context("tenant cgroup")?;
        let exempt = cgroup.child("exempt").context("exempt cgroup")?;
        let bpffs = BpffsDir::new().context("bpffs dir")?;
        let metrics = free_loopback_addr()?;
        let mut args = vec![
            "local".to_owned(),
            "--cgroup".into(),
            cgroup.path().display().to_string(),
            "--exempt".into(),
            exempt.display().to_string(),
            "--bpffs".into(),
            bpffs.path().join("guard").display().to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
        ];
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        let mut agent = Agent::spawn(&args).context("spawn agent")?;
        agent
            .wait_ready(metrics, Duration::from_secs(20))
            .context("agent ready")?;
        Ok(LocalGuard {
            agent,
            metrics,
            guarded,
            exempt,
            bpffs,
            cgroup,
        })
    }

    /// The agent's pin directory (its `--bpffs`).
    pub fn pins(&self) -> PathBuf {
        self.bpffs.path().join("guard")
    }

    /// The attach root holding `tenant` and `exempt`.
    pub fn root(&self) -> &TestCgroup {
        &self.cgroup
    }
}
