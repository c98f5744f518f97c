//! One datapath session, used by `local` and `node`: install (fresh, adopt or upgrade) and
//! say so once, keep the maps in line with what the agent wants, apply a reloaded config
//! (attaching or detaching the socket programs when `deny_raw_sockets` changes), and read
//! what the metrics report. Errors are plain errors: which of them are the operator's fault
//! (exit code 2) is decided by the command layer.

use std::{collections::BTreeMap, sync::Arc};

use aya::maps::{MapData, RingBuf};
use datalab_guard_common::{
    cidr::Cidr, counters::Stat, GuardConfig, Mode, TunnelConfig, Verdict, VerdictEntry,
};

use super::{
    install::{attach_pinned, detach_pinned_links, SOCKET_PROGRAMS},
    lsm, GuardMaps, InstallOutcome, InstallRequest, PinLayout,
};
use crate::{
    audit::ConsumerStats,
    blocklist,
    cgroups::CgroupDir,
    metrics::{CounterSample, Snapshot},
};

/// The in-kernel audit rate limit counts events per window of this length. One second, so
/// that `--audit-rate` and `audit.eventsPerSecond` mean what they say.
pub const AUDIT_WINDOW_MS: u32 = 1000;

/// What the kernel side is told besides the verdicts and the blocked set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DatapathSettings {
    pub mode: Mode,
    /// The verdict of cgroups with no entry in the verdict map.
    pub unknown_cgroup_verdict: Verdict,
    /// Refuse SOCK_RAW and AF_PACKET sockets to guarded cgroups (attaches two programs).
    pub deny_raw_sockets: bool,
    /// Audit events per guarded cgroup per second (further attempts are only counted).
    pub audit_events_per_second: u32,
    /// Tunnel ports and the refuse-all-tunnels switch, as the kernel holds them.
    pub tunnels: TunnelConfig,
}

impl DatapathSettings {
    /// The CONFIG map value (the installer fills in the root level and the prefilter).
    pub fn guard_config(&self) -> GuardConfig {
        let mut gc = GuardConfig::zeroed();
        gc.mode = self.mode as u32;
        gc.default_verdict = self.unknown_cgroup_verdict as u32;
        gc.deny_raw_sockets = u32::from(self.deny_raw_sockets);
        gc.events_per_window = self.audit_events_per_second;
        gc.window_ms = AUDIT_WINDOW_MS;
        gc.tunnels = self.tunnels;
        gc
    }
}

/// What a session starts from.
pub struct StartRequest {
    pub layout: PinLayout,
    /// The attach root: every process below it is judged.
    pub root: CgroupDir,
    pub settings: DatapathSettings,
    pub blocked: Vec<Cidr>,
    /// cgroup id → verdict entry, written before any program is attached.
    pub verdicts: BTreeMap<u64, VerdictEntry>,
}

/// A live install and what the agent last applied to it.
pub struct Session {
    layout: PinLayout,
    root: CgroupDir,
    maps: GuardMaps,
    settings: DatapathSettings,
    /// Counts of the audit consumer (malformed records), reported with the kernel's.
    audit_stats: Arc<ConsumerStats>,
}

impl Session {
    /// Installs (or adopts, or upgrades) and logs how. Returns the ring buffer of audit
    /// events, to be read with [`crate::audit::consume`] and [`Session::audit_stats`].
    pub fn start(req: StartRequest) -> anyhow::Result<(Session, RingBuf<MapData>)> {
        let entries = req.verdicts.len();
        let installed = super::install(InstallRequest {
            layout: req.layout.clone(),
            root: req.root.clone(),
            config: req.settings.guard_config(),
            blocked: req.blocked.clone(),
            policy: req.verdicts,
        })?;
        let outcome = match installed.outcome {
            InstallOutcome::Fresh => "attached".to_owned(),
            InstallOutcome::Adopted => "adopted existing pins".to_owned(),
            InstallOutcome::Upgraded { previous_hash } => {
                format!("upgraded programs {previous_hash:016x}")
            }
        };
        tracing::info!(
            root = %req.root.path.display(),
            bpffs = %req.layout.root().display(),
            mode = req.settings.mode.name(),
            blocked = %describe(&req.blocked),
            links = %installed.links.join(","),
            entries,
            "guard {outcome}"
        );
        let session = Session {
            layout: req.layout,
            root: req.root,
            maps: installed.maps,
            settings: req.settings,
            audit_stats: Arc::default(),
        };
        Ok((session, installed.events))
    }

    pub fn maps(&self) -> &GuardMaps {
        &self.maps
    }

    pub fn maps_mut(&mut self) -> &mut GuardMaps {
        &mut self.maps
    }

    pub fn root(&self) -> &CgroupDir {
        &self.root
    }

    pub fn settings(&self) -> DatapathSettings {
        self.settings
    }

    /// Shared with the audit consumer, which counts into it.
    pub fn audit_stats(&self) -> Arc<ConsumerStats> {
        Arc::clone(&self.audit_stats)
    }

    /// Applies a reloaded config: blocked set, mode, default verdict, audit rate, and the
    /// socket programs when `deny_raw_sockets` changes. Turning them on needs the BPF LSM:
    /// when it is missing (or the kernel refuses the program) nothing changes and the
    /// error says why; the previous settings stay in force. Links are all-or-none.
    pub fn reload(&mut self, settings: DatapathSettings, blocked: &[Cidr]) -> anyhow::Result<()> {
        let enabling = settings.deny_raw_sockets && !self.settings.deny_raw_sockets;
        let disabling = !settings.deny_raw_sockets && self.settings.deny_raw_sockets;
        if enabling {
            lsm::require_bpf_lsm().map_err(anyhow::Error::msg)?;
            // Attached before the config turns them on: until then they let sockets through.
            attach_pinned(&self.layout, &self.root, &SOCKET_PROGRAMS)?;
            tracing::info!(
                links = %SOCKET_PROGRAMS.join(","),
                "socket programs attached (denyRawSockets on)"
            );
        }
        if let Err(e) = self.write(settings, blocked) {
            if enabling {
                // Keep links and config in agreement: the config still says off.
                if let Err(undo) = detach_pinned_links(&self.layout, &SOCKET_PROGRAMS) {
                    tracing::error!(error = %undo, "cannot detach the socket programs again");
                }
            }
            return Err(e);
        }
        self.settings = settings;
        if disabling {
            // The config already tells them to let sockets through; now they go.
            detach_pinned_links(&self.layout, &SOCKET_PROGRAMS)?;
            tracing::info!("socket programs detached (denyRawSockets off)");
        }
        Ok(())
    }

    fn write(&mut self, settings: DatapathSettings, blocked: &[Cidr]) -> anyhow::Result<()> {
        let mut gc = settings.guard_config();
        gc.root_level = self.root.level;
        self.maps.reconcile_blocked(blocked)?;
        self.maps.write_config(gc, blocked)
    }

    /// The kernel's counters (class 0 plus `classes`, named by namespace), statistics and
    /// map sizes, and the audit consumer's counts. Pod gauges and namespace states are the
    /// caller's to add.
    pub fn snapshot(&self, classes: &BTreeMap<u32, String>) -> anyhow::Result<Snapshot> {
        let class_ids = std::iter::once(0).chain(classes.keys().copied());
        let counters = self
            .maps
            .counters(class_ids)?
            .into_iter()
            .map(|c| CounterSample {
                action: c.action,
                family: c.family,
                hook: c.hook,
                namespace: classes.get(&c.class).cloned().unwrap_or_default(),
                value: c.value,
            })
            .collect();
        let mut snapshot = Snapshot {
            counters,
            events_lost: self.maps.stat(Stat::EventsLost)?,
            events_suppressed: self.maps.stat(Stat::EventsSuppressed)?,
            verdict_entries: self.maps.verdict_count()? as u64,
            ..empty_snapshot()
        };
        add_consumer_stats(&mut snapshot, &self.audit_stats);
        Ok(snapshot)
    }
}

/// What the metrics report before anything is installed.
pub fn empty_snapshot() -> Snapshot {
    Snapshot {
        verdict_capacity: u64::from(datalab_guard_common::maps::VERDICTS_MAX_ENTRIES),
        ..Snapshot::default()
    }
}

fn add_consumer_stats(snapshot: &mut Snapshot, stats: &ConsumerStats) {
    snapshot.events_malformed = stats.malformed.load(std::sync::atomic::Ordering::Relaxed);
}

fn describe(blocked: &[Cidr]) -> String {
    blocked
        .iter()
        .map(blocklist::describe)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;

    #[test]
    fn guard_config_follows_the_settings() {
        let settings = DatapathSettings {
            mode: Mode::Audit,
            unknown_cgroup_verdict: Verdict::Exempt,
            deny_raw_sockets: true,
            audit_events_per_second: 7,
            tunnels: TunnelConfig {
                deny_all: 1,
                ..TunnelConfig::defaults()
            },
        };
        let gc = settings.guard_config();
        assert_eq!(gc.tunnels.deny_all, 1);
        assert_eq!(
            gc.tunnels.udp_kind(4789),
            Some(datalab_guard_common::UdpTunnel::Vxlan)
        );
        assert_eq!(Mode::from_raw(gc.mode), Mode::Audit);
        assert_eq!(Verdict::from_raw(gc.default_verdict), Verdict::Exempt);
        assert_eq!(gc.deny_raw_sockets, 1);
        assert_eq!(gc.events_per_window, 7);
        assert_eq!(gc.window_ms, AUDIT_WINDOW_MS);
    }

    #[test]
    fn the_snapshot_reports_malformed_audit_records() {
        let stats = ConsumerStats::default();
        stats.malformed.fetch_add(3, Ordering::Relaxed);
        let mut snapshot = empty_snapshot();
        add_consumer_stats(&mut snapshot, &stats);
        assert_eq!(snapshot.events_malformed, 3);
        let text = crate::metrics::encode(&crate::metrics::registry(Arc::new(move || {
            Ok(snapshot.clone())
        })))
        .unwrap();
        assert!(
            text.contains("datalab_guard_audit_events_dropped_total{reason=\"malformed\"} 3"),
            "{text}"
        );
    }
}
