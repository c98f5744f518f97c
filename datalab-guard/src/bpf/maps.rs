//! Typed access to the pinned maps, used by the installer (to fill them), the agent (to
//! reconcile and read counters) and `status` (read only, straight from the pins).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Context as _};
use aya::maps::{lpm_trie::Key, Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use datalab_guard_common::{
    cidr::{prefilter, Cidr},
    counters::{slot_labels, Stat, SLOTS_PER_CLASS, STAT_ENTRIES},
    maps as names, Action, Family, GuardConfig, Hook, InstallMeta, VerdictEntry,
};

use super::PinLayout;

/// The maps the agent writes and reads (the ring buffer is handled by `audit`).
pub struct GuardMaps {
    policy: HashMap<MapData, u64, VerdictEntry>,
    blocked_v4: LpmTrie<MapData, [u8; 4], u32>,
    blocked_v6: LpmTrie<MapData, [u8; 16], u32>,
    config: Array<MapData, GuardConfig>,
    counters: PerCpuArray<MapData, u64>,
    stats: PerCpuArray<MapData, u64>,
    meta: Array<MapData, InstallMeta>,
    /// What VERDICTS holds as far as this process knows, and since when. The agent is the
    /// map's only writer, so a reconcile diffs against this rather than reading every entry
    /// back (two syscalls each: 20 000 for a node of 10 000 pods, while new pods' entries
    /// wait). `None` until first read and after a failed write; read again from the kernel
    /// after [`KNOWN_VERDICTS_MAX_AGE`], so an entry changed from outside is mended.
    known_verdicts: Option<(BTreeMap<u64, VerdictEntry>, Instant)>,
}

/// How long [`GuardMaps`] trusts its own record of VERDICTS before reading the kernel's.
pub const KNOWN_VERDICTS_MAX_AGE: Duration = Duration::from_secs(60);

/// One in-kernel counter, summed over CPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterValue {
    pub class: u32,
    pub action: Action,
    pub family: Family,
    pub hook: Hook,
    pub value: u64,
}

/// What a reconcile changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl GuardMaps {
    /// Takes the maps out of a freshly loaded object.
    pub fn from_ebpf(ebpf: &mut aya::Ebpf) -> anyhow::Result<GuardMaps> {
        let mut take = |name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the object"))
        };
        GuardMaps::from_parts(
            take(names::VERDICTS)?,
            take(names::BLOCKED_V4)?,
            take(names::BLOCKED_V6)?,
            take(names::CONFIG)?,
            take(names::COUNTERS)?,
            take(names::STATS)?,
            take(names::META)?,
        )
    }

    /// Opens the pinned maps of an existing install.
    pub fn from_pins(layout: &PinLayout) -> anyhow::Result<GuardMaps> {
        let open = |name: &str| -> anyhow::Result<Map> {
            let path = layout.map(name);
            let data = MapData::from_pin(&path)
                .with_context(|| format!("cannot open pinned map {}", path.display()))?;
            Map::from_map_data(data)
                .with_context(|| format!("unexpected map type at {}", path.display()))
        };
        GuardMaps::from_parts(
            open(names::VERDICTS)?,
            open(names::BLOCKED_V4)?,
            open(names::BLOCKED_V6)?,
            open(names::CONFIG)?,
            open(names::COUNTERS)?,
            open(names::STATS)?,
            open(names::META)?,
        )
    }

    fn from_parts(
        policy: Map,
        v4: Map,
        v6: Map,
        config: Map,
        counters: Map,
        stats: Map,
        meta: Map,
    ) -> anyhow::Result<GuardMaps> {
        Ok(GuardMaps {
            policy: HashMap::try_from(policy).context(names::VERDICTS)?,
            blocked_v4: LpmTrie::try_from(v4).context(names::BLOCKED_V4)?,
            blocked_v6: LpmTrie::try_from(v6).context(names::BLOCKED_V6)?,
            config: Array::try_from(config).context(names::CONFIG)?,
            counters: PerCpuArray::try_from(counters).context(names::COUNTERS)?,
            stats: PerCpuArray::try_from(stats).context(names::STATS)?,
            meta: Array::try_from(meta).context(names::META)?,
            known_verdicts: None,
        })
    }

    pub fn config(&self) -> anyhow::Result<GuardConfig> {
        Ok(self.config.get(&0, 0)?)
    }

    /// Writes the config with prefilter bitmaps computed from `blocked`. Call after the
    /// tries hold every CIDR in `blocked`, so the prefilter never hides a trie entry.
    pub fn write_config(
        &mut self,
        mut config: GuardConfig,
        blocked: &[Cidr],
    ) -> anyhow::Result<()> {
        let (v4, v6) = prefilter(blocked.iter());
        config.v4_first_octet = v4;
        config.v6_first_octet = v6;
        self.config.set(0, config, 0)?;
        Ok(())
    }

    /// Writes the config as is (bitmaps included).
    pub fn config_set(&mut self, config: GuardConfig) -> anyhow::Result<()> {
        self.config.set(0, config, 0)?;
        Ok(())
    }

    /// The blocked CIDRs in the tries.
    pub fn blocked(&self) -> anyhow::Result<Vec<Cidr>> {
        let mut out = Vec::new();
        for key in self.blocked_v4.keys() {
            let key = key?;
            out.extend(Cidr::v4(key.data(), key.prefix_len() as u8));
        }
        for key in self.blocked_v6.keys() {
            let key = key?;
            out.extend(Cidr::v6(key.data(), key.prefix_len() as u8));
        }
        out.sort();
        Ok(out)
    }

    /// Makes the tries hold exactly `desired`: additions first, removals last, so a
    /// destination that stays blocked is never unblocked in between.
    pub fn reconcile_blocked(&mut self, desired: &[Cidr]) -> anyhow::Result<Changes> {
        let current: BTreeSet<Cidr> = self.blocked()?.into_iter().collect();
        let wanted: BTreeSet<Cidr> = desired.iter().copied().collect();
        let mut changes = Changes::default();
        for (rule, cidr) in wanted.iter().enumerate() {
            if current.contains(cidr) {
                continue;
            }
            match *cidr {
                Cidr::V4 { addr, prefix } => {
                    self.blocked_v4
                        .insert(&Key::new(prefix.into(), addr), rule as u32, 0)?;
                }
                Cidr::V6 { addr, prefix } => {
                    self.blocked_v6
                        .insert(&Key::new(prefix.into(), addr), rule as u32, 0)?;
                }
            }
            changes.added += 1;
        }
        for cidr in current.difference(&wanted) {
            match *cidr {
                Cidr::V4 { addr, prefix } => {
                    self.blocked_v4.remove(&Key::new(prefix.into(), addr))?;
                }
                Cidr::V6 { addr, prefix } => {
                    self.blocked_v6.remove(&Key::new(prefix.into(), addr))?;
                }
            }
            changes.removed += 1;
        }
        Ok(changes)
    }

    /// The VERDICTS entries (cgroup id -> entry).
    pub fn verdicts(&self) -> anyhow::Result<BTreeMap<u64, VerdictEntry>> {
        let mut out = BTreeMap::new();
        for item in self.policy.iter() {
            let (id, entry) = item?;
            out.insert(id, entry);
        }
        Ok(out)
    }

    /// How many entries VERDICTS holds (from the agent's own record while it is fresh).
    pub fn verdict_count(&self) -> anyhow::Result<usize> {
        match &self.known_verdicts {
            Some((known, at)) if at.elapsed() < KNOWN_VERDICTS_MAX_AGE => Ok(known.len()),
            _ => Ok(self.verdicts()?.len()),
        }
    }

    /// Makes VERDICTS hold exactly `desired`: new and changed entries first, stale ones last.
    pub fn reconcile_verdicts(
        &mut self,
        desired: &BTreeMap<u64, VerdictEntry>,
    ) -> anyhow::Result<Changes> {
        let (current, read_at) = match self.known_verdicts.take() {
            Some((known, at)) if at.elapsed() < KNOWN_VERDICTS_MAX_AGE => (known, at),
            _ => (self.verdicts()?, Instant::now()),
        };
        // The record is put back only if every write below succeeds (`?` leaves it `None`).
        let mut changes = Changes::default();
        for (id, entry) in desired {
            match current.get(id) {
                Some(existing) if existing == entry => {}
                Some(_) => {
                    self.policy.insert(id, entry, 0)?;
                    changes.updated += 1;
                }
                None => {
                    self.policy.insert(id, entry, 0)?;
                    changes.added += 1;
                }
            }
        }
        for id in current.keys().filter(|id| !desired.contains_key(id)) {
            match self.policy.remove(id) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
            changes.removed += 1;
        }
        self.known_verdicts = Some((desired.clone(), read_at));
        Ok(changes)
    }

    /// One VERDICTS entry, if present.
    pub fn policy_get(&self, cgroup_id: u64) -> anyhow::Result<Option<VerdictEntry>> {
        match self.policy.get(&cgroup_id, 0) {
            Ok(entry) => Ok(Some(entry)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Sets or replaces one VERDICTS entry.
    pub fn set_verdict(&mut self, cgroup_id: u64, entry: VerdictEntry) -> anyhow::Result<()> {
        let result = self.policy.insert(cgroup_id, entry, 0);
        match (&result, self.known_verdicts.as_mut()) {
            (Ok(()), Some((known, _))) => {
                known.insert(cgroup_id, entry);
            }
            (Ok(()), None) => {}
            (Err(_), _) => self.known_verdicts = None,
        }
        Ok(result?)
    }

    /// Removes one VERDICTS entry (absent is fine).
    pub fn remove_policy(&mut self, cgroup_id: u64) -> anyhow::Result<()> {
        match self.policy.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {
                if let Some((known, _)) = self.known_verdicts.as_mut() {
                    known.remove(&cgroup_id);
                }
                Ok(())
            }
            Err(e) => {
                self.known_verdicts = None;
                Err(e.into())
            }
        }
    }

    /// Non-zero counters of the given classes, summed over CPUs.
    pub fn counters(
        &self,
        classes: impl IntoIterator<Item = u32>,
    ) -> anyhow::Result<Vec<CounterValue>> {
        let mut out = Vec::new();
        for class in classes {
            for slot in 0..SLOTS_PER_CLASS {
                let index = class * SLOTS_PER_CLASS + slot;
                let per_cpu = self.counters.get(&index, 0)?;
                let value: u64 = per_cpu.iter().sum();
                if value == 0 {
                    continue;
                }
                if let Some((action, family, hook)) = slot_labels(slot) {
                    out.push(CounterValue {
                        class,
                        action,
                        family,
                        hook,
                        value,
                    });
                }
            }
        }
        Ok(out)
    }

    /// One statistic, summed over CPUs.
    pub fn stat(&self, stat: Stat) -> anyhow::Result<u64> {
        debug_assert!((stat as u32) < STAT_ENTRIES);
        Ok(self.stats.get(&(stat as u32), 0)?.iter().sum())
    }

    pub fn meta(&self) -> anyhow::Result<InstallMeta> {
        Ok(self.meta.get(&0, 0)?)
    }

    pub fn write_meta(&mut self, meta: &InstallMeta) -> anyhow::Result<()> {
        Ok(self.meta.set(0, meta, 0)?)
    }
}

/// Builds an [`InstallMeta`] for a root path.
pub fn meta_for(
    object_hash: u64,
    root_cgroup_id: u64,
    root_path: &str,
    complete: bool,
) -> InstallMeta {
    let mut path = [0u8; 256];
    let bytes = root_path.as_bytes();
    let len = bytes.len().min(path.len());
    path[..len].copy_from_slice(&bytes[..len]);
    InstallMeta {
        object_hash,
        root_cgroup_id,
        attached_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        root_path_len: len as u32,
        complete: u32::from(complete),
        root_path: path,
    }
}

/// The root path recorded in META.
pub fn meta_root_path(meta: &InstallMeta) -> String {
    let len = (meta.root_path_len as usize).min(meta.root_path.len());
    String::from_utf8_lossy(&meta.root_path[..len]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bpf::testrun::{PrivateBpffs, TestRunner};

    fn entry(verdict: u32) -> VerdictEntry {
        VerdictEntry { verdict, class: 0 }
    }

    /// The reconcile diffs against its own record of VERDICTS; the kernel's map still ends
    /// up exactly as desired, and an entry removed from outside is put back once the record
    /// has aged out.
    #[test]
    fn reconciles_from_its_record_and_mends_outside_changes_after_it_ages() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root (loads eBPF programs)");
            return;
        }
        let bpffs = PrivateBpffs::mount("dg-maps-test").unwrap();
        let dir = bpffs.path().join("runner");
        let _runner = TestRunner::new(&dir).unwrap();
        let layout = PinLayout::new(&dir);
        let mut agent = GuardMaps::from_pins(&layout).unwrap();
        let mut outsider = GuardMaps::from_pins(&layout).unwrap();

        let first = BTreeMap::from([(1, entry(0)), (2, entry(1)), (3, entry(0))]);
        agent.reconcile_verdicts(&first).unwrap();
        assert_eq!(outsider.verdicts().unwrap(), first);

        // Added, updated, removed, plus one entry written on the event path.
        let second = BTreeMap::from([(1, entry(1)), (3, entry(0)), (4, entry(0))]);
        agent.set_verdict(5, entry(1)).unwrap();
        let changes = agent.reconcile_verdicts(&second).unwrap();
        assert_eq!(
            changes,
            Changes {
                added: 1,
                updated: 1,
                removed: 2
            }
        );
        assert_eq!(outsider.verdicts().unwrap(), second);
        assert_eq!(agent.verdict_count().unwrap(), 3);

        // Removed from outside: the fresh record does not see it…
        outsider.remove_policy(3).unwrap();
        agent.reconcile_verdicts(&second).unwrap();
        assert!(!outsider.verdicts().unwrap().contains_key(&3));
        // …the aged one is read again from the kernel, and the entry comes back.
        let aged = (agent.known_verdicts.as_ref())
            .and_then(|(_, at)| at.checked_sub(KNOWN_VERDICTS_MAX_AGE));
        match (aged, agent.known_verdicts.as_mut()) {
            (Some(aged), Some((_, at))) => *at = aged,
            // Booted less than a minute ago: no Instant that old exists; forget instead.
            _ => agent.known_verdicts = None,
        }
        let changes = agent.reconcile_verdicts(&second).unwrap();
        assert_eq!(changes.added, 1);
        assert_eq!(outsider.verdicts().unwrap(), second);
    }
}
