//! Installing the guard: fill the maps, then attach; adopt a running install; upgrade one.
//!
//! Invariants, in order of importance:
//! - Every check that can refuse a start (the attach root opens, the kernel accepts each
//!   program) runs before anything pinned is written, and a start over existing pins that
//!   fails later puts the maps back: a refused start leaves the pinned state as it was.
//! - The maps hold the verdicts and the blocked set *before* any program is attached, so
//!   the first packet a program sees is judged with the real policy.
//! - Nothing is ever half-attached: all new links are attached and pinned, or none is (and a
//!   fresh install that fails removes the maps it pinned).
//! - Never a moment unguarded: a restart with the same programs keeps the existing links
//!   untouched; an upgrade attaches the new programs (multi-attach, so any drop wins) before
//!   detaching the old ones.

use std::{collections::BTreeMap, fs::File, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{MapData, RingBuf},
    programs::{
        links::{CgroupAttachMode, FdLink, PinnedLink},
        CgroupSkb, CgroupSkbAttachType, CgroupSock, CgroupSockAddr, LsmCgroup,
    },
    Btf, Ebpf, EbpfLoader,
};
use datalab_guard_common::{
    cidr::Cidr,
    maps::{self as names, programs},
    GuardConfig, VerdictEntry,
};

use super::{
    maps::{meta_for, meta_root_path, GuardMaps},
    object::{object_hash, OBJECT},
    PinLayout,
};
use crate::{cgroups::CgroupDir, input::bad_input};

/// Everything the kernel must hold once installed.
pub struct InstallRequest {
    pub layout: PinLayout,
    /// The attach root: every process below it is judged.
    pub root: CgroupDir,
    /// Mode, default verdict, raw-socket switch and audit rate; the prefilter bitmaps and
    /// root level are filled in here.
    pub config: GuardConfig,
    pub blocked: Vec<Cidr>,
    pub policy: BTreeMap<u64, VerdictEntry>,
}

/// How the kernel state was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallOutcome {
    /// Nothing was pinned: maps created, programs attached.
    Fresh,
    /// The same programs were already attached: links kept, maps reconciled.
    Adopted,
    /// Other programs (another version) were attached: replaced without a gap.
    Upgraded { previous_hash: u64 },
}

/// A live install: the maps to keep reconciling and the ring buffer to read.
pub struct Installed {
    pub maps: GuardMaps,
    pub events: RingBuf<MapData>,
    pub outcome: InstallOutcome,
    /// Programs attached now (pin names).
    pub links: Vec<String>,
    // Keeps the loaded object (and its map fds) alive as long as the install is used.
    _ebpf: Ebpf,
}

/// The programs that refuse raw and packet sockets, attached only while the config denies
/// them (`deny_raw_sockets`); attached and detached together.
pub const SOCKET_PROGRAMS: [&str; 2] = [programs::SOCK_CREATE, programs::PACKET_SOCKET];

/// The programs an install attaches, in attach order.
pub fn wanted_programs(config: &GuardConfig) -> Vec<&'static str> {
    let mut wanted = vec![
        programs::CONNECT4,
        programs::CONNECT6,
        programs::SENDMSG4,
        programs::SENDMSG6,
        programs::EGRESS,
    ];
    if config.deny_raw_sockets != 0 {
        wanted.extend(SOCKET_PROGRAMS);
    }
    wanted
}

pub fn install(req: InstallRequest) -> anyhow::Result<Installed> {
    let layout = &req.layout;
    layout.create_dirs()?;
    let pinned_before = layout.exists();
    let previous = if pinned_before {
        Some(GuardMaps::from_pins(layout)?.meta()?)
    } else {
        None
    };
    if let Some(meta) = &previous {
        refuse_foreign_root(meta, &req.root)?;
    }

    let result = install_inner(&req, previous.map(|m| m.object_hash));
    if result.is_err() && !pinned_before {
        // A fresh install that failed leaves nothing behind.
        remove_all_pins(layout);
    }
    result
}

fn install_inner(req: &InstallRequest, previous_hash: Option<u64>) -> anyhow::Result<Installed> {
    let layout = &req.layout;
    let hash = object_hash();
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(layout.maps_dir())
        .load(OBJECT)
        .context("cannot load the eBPF object")?;
    let mut maps = GuardMaps::from_ebpf(&mut ebpf)?;
    let events = ebpf
        .take_map(names::EVENTS)
        .ok_or_else(|| anyhow!("map {} missing", names::EVENTS))?;
    let events = RingBuf::try_from(events).context(names::EVENTS)?;

    // 1. Everything that can refuse the start, before anything pinned is written: the
    // attach root opens and the kernel accepts every program to attach (a kernel that
    // refuses the BPF LSM program refuses it here). A refused start leaves pins, links and
    // maps exactly as it found them.
    let mut config = req.config;
    config.root_level = req.root.level;
    let wanted = wanted_programs(&config);
    let same_programs = previous_hash == Some(hash);
    let to_attach: Vec<&str> = wanted
        .iter()
        .copied()
        .filter(|p| !(same_programs && layout.link(p).exists()))
        .collect();
    let cgroup = File::open(&req.root.path)
        .with_context(|| format!("cannot open cgroup {}", req.root.path.display()))?;
    for program in &to_attach {
        load_program(&mut ebpf, program)?;
    }

    // 2. State. What the pins held is kept, to be put back should a later step fail.
    let prior = match previous_hash {
        Some(_) => Some(PriorState::read(&maps)?),
        None => None,
    };
    let fresh = previous_hash.is_none();
    let written = write_state_and_attach(req, &mut maps, &mut ebpf, &cgroup, &to_attach, fresh);
    if let Err(e) = written {
        if let Some(prior) = prior {
            if let Err(undo) = prior.restore(&mut maps) {
                tracing::error!(error = %undo, "cannot restore the pinned maps after a failed start");
            }
        }
        return Err(e);
    }

    // 4. Old links go only after the new ones are pinned.
    for program in &to_attach {
        let next = layout.next_link(program);
        if next.exists() {
            detach_pinned(&layout.link(program))?;
            std::fs::rename(&next, layout.link(program))
                .with_context(|| format!("cannot move {} into place", next.display()))?;
        }
    }
    for name in layout.pinned_links()? {
        if !wanted.contains(&name.as_str()) {
            detach_pinned(&layout.link(&name))?;
        }
    }
    // Maps only the old programs used: gone with them (the kernel frees a map when its last
    // pin and program reference go).
    for name in names::RETIRED {
        let _ = std::fs::remove_file(layout.map(name));
    }
    let root_path = req.root.path.display().to_string();
    maps.write_meta(&meta_for(hash, req.root.id, &root_path, true))?;

    let outcome = match previous_hash {
        None => InstallOutcome::Fresh,
        Some(h) if h == hash => InstallOutcome::Adopted,
        Some(previous_hash) => InstallOutcome::Upgraded { previous_hash },
    };
    Ok(Installed {
        maps,
        events,
        outcome,
        links: wanted.iter().map(|s| s.to_string()).collect(),
        _ebpf: ebpf,
    })
}

/// Steps 2 and 3 of an install: the maps get the wanted state, then the (already loaded)
/// programs are attached and their links pinned, all or none.
fn write_state_and_attach(
    req: &InstallRequest,
    maps: &mut GuardMaps,
    ebpf: &mut Ebpf,
    cgroup: &File,
    to_attach: &[&str],
    fresh: bool,
) -> anyhow::Result<()> {
    let mut config = req.config;
    config.root_level = req.root.level;
    maps.reconcile_blocked(&req.blocked)?;
    maps.write_config(config, &req.blocked)?;
    maps.reconcile_verdicts(&req.policy)?;
    if fresh {
        let root_path = req.root.path.display().to_string();
        maps.write_meta(&meta_for(object_hash(), req.root.id, &root_path, false))?;
    }
    // 3. Links.
    let mut fresh_links = Vec::new();
    for program in to_attach {
        let link = attach_loaded(ebpf, program, cgroup)
            .with_context(|| format!("cannot attach {program} to {}", req.root.path.display()))?;
        fresh_links.push((*program, link));
    }
    // Every new link is attached (dropping them now would detach all): pin them.
    pin_all(&req.layout, fresh_links)
}

/// The pinned maps' contents before an install over existing pins wrote them.
struct PriorState {
    config: GuardConfig,
    blocked: Vec<Cidr>,
    verdicts: BTreeMap<u64, VerdictEntry>,
}

impl PriorState {
    fn read(maps: &GuardMaps) -> anyhow::Result<PriorState> {
        Ok(PriorState {
            config: maps.config()?,
            blocked: maps.blocked()?,
            verdicts: maps.verdicts()?,
        })
    }

    /// Blocked set first (additions before removals), then the config with its old
    /// prefilter, then the verdicts.
    fn restore(&self, maps: &mut GuardMaps) -> anyhow::Result<()> {
        maps.reconcile_blocked(&self.blocked)?;
        maps.config_set(self.config)?;
        maps.reconcile_verdicts(&self.verdicts)?;
        Ok(())
    }
}

/// Attaches `names` (those not pinned yet) to an installed root and pins their links, all or
/// none: an attach or pin that fails drops the links made so far, which detaches them. The
/// maps are the pinned ones (the loader reuses pins), so the programs see the live state.
pub fn attach_pinned(layout: &PinLayout, root: &CgroupDir, names: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|p| !layout.link(p).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(layout.maps_dir())
        .load(OBJECT)
        .context("cannot load the eBPF object")?;
    let cgroup = File::open(&root.path)
        .with_context(|| format!("cannot open cgroup {}", root.path.display()))?;
    let mut links = Vec::new();
    for program in missing {
        let link = attach(&mut ebpf, program, &cgroup)
            .with_context(|| format!("cannot attach {program} to {}", root.path.display()))?;
        links.push((program, link));
    }
    pin_all(layout, links)
}

/// Detaches the pinned links of `names` (those pinned).
pub fn detach_pinned_links(layout: &PinLayout, names: &[&str]) -> anyhow::Result<()> {
    for program in names {
        detach_pinned(&layout.link(program))?;
    }
    Ok(())
}

/// One bpffs directory serves one attach root; a second root needs its own `--bpffs`.
fn refuse_foreign_root(
    meta: &datalab_guard_common::InstallMeta,
    root: &CgroupDir,
) -> anyhow::Result<()> {
    if meta.complete == 0 || meta.root_cgroup_id == root.id {
        return Ok(());
    }
    let recorded = meta_root_path(meta);
    let recorded_alive = std::fs::metadata(&recorded)
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == meta.root_cgroup_id);
    if recorded_alive {
        return Err(bad_input(format!(
            "the pins under this --bpffs directory already guard {recorded}; run `datalab-guard uninstall` first or use another --bpffs"
        )));
    }
    // The recorded root is gone (its links died with it): take the directory over.
    Ok(())
}

/// Loads program `name` of `ebpf` and attaches it to `cgroup` as a bpf_link.
pub(crate) fn attach(ebpf: &mut Ebpf, name: &str, cgroup: &File) -> anyhow::Result<FdLink> {
    load_program(ebpf, name)?;
    attach_loaded(ebpf, name, cgroup)
}

/// Loads program `name` into the kernel (the verifier, or the kernel's LSM policy, may
/// refuse it) without attaching it: nothing anyone else sees changes.
fn load_program(ebpf: &mut Ebpf, name: &str) -> anyhow::Result<()> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    if name == programs::EGRESS {
        let prog: &mut CgroupSkb = program.try_into()?;
        prog.load()?;
    } else if name == programs::PACKET_SOCKET {
        let prog: &mut LsmCgroup = program.try_into()?;
        let btf = Btf::from_sys_fs()
            .context("AF_PACKET denial needs kernel BTF (/sys/kernel/btf/vmlinux)")?;
        // Only --deny-raw-sockets asks for this program, so a refusal is the operator's
        // request meeting a kernel that cannot honour it: bad input (exit 2).
        prog.load("socket_post_create", &btf).map_err(|e| {
            bad_input(format!(
                "--deny-raw-sockets: the kernel refused the BPF LSM program that refuses AF_PACKET sockets ({e}); it needs the BPF LSM: `bpf` in the lsm= boot parameter, and a kernel policy that allows LSM programs"
            ))
        })?;
    } else if name == programs::SOCK_CREATE {
        let prog: &mut CgroupSock = program.try_into()?;
        prog.load()?;
    } else {
        let prog: &mut CgroupSockAddr = program.try_into()?;
        prog.load()?;
    }
    Ok(())
}

/// Attaches program `name` of `ebpf`, loaded by [`load_program`], to `cgroup` as a bpf_link.
fn attach_loaded(ebpf: &mut Ebpf, name: &str, cgroup: &File) -> anyhow::Result<FdLink> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the object"))?;
    // bpf_link attachments to cgroups are always multi-attach; the kernel rejects any
    // attach flag on BPF_LINK_CREATE, so "Single" (no flag) is the correct value here.
    let mode = CgroupAttachMode::Single;
    let link: FdLink = if name == programs::EGRESS {
        let prog: &mut CgroupSkb = program.try_into()?;
        let id = prog.attach(cgroup, CgroupSkbAttachType::Egress, mode)?;
        prog.take_link(id)?.try_into()?
    } else if name == programs::PACKET_SOCKET {
        let prog: &mut LsmCgroup = program.try_into()?;
        let id = prog.attach(cgroup)?;
        prog.take_link(id)?.into()
    } else if name == programs::SOCK_CREATE {
        let prog: &mut CgroupSock = program.try_into()?;
        let id = prog.attach(cgroup, mode)?;
        prog.take_link(id)?.try_into()?
    } else {
        let prog: &mut CgroupSockAddr = program.try_into()?;
        let id = prog.attach(cgroup, mode)?;
        prog.take_link(id)?.try_into()?
    };
    Ok(link)
}

/// Pins every link, at `<name>` or, when an old link is pinned there, at `<name>-next`.
/// On failure unpins what this call pinned; the links then detach when dropped.
fn pin_all(layout: &PinLayout, links: Vec<(&str, FdLink)>) -> anyhow::Result<()> {
    let mut pinned: Vec<PinnedLink> = Vec::new();
    for (program, link) in links {
        let target = if layout.link(program).exists() {
            layout.next_link(program)
        } else {
            layout.link(program)
        };
        if target.exists() {
            // A leftover `-next` from an interrupted upgrade.
            detach_pinned(&target)?;
        }
        match link.pin(&target) {
            Ok(p) => pinned.push(p),
            Err(e) => {
                for p in pinned {
                    let _ = p.unpin();
                }
                return Err(
                    anyhow::Error::new(e).context(format!("cannot pin link {}", target.display()))
                );
            }
        }
    }
    Ok(())
}

/// Removes a pinned link; the last reference goes and the program detaches.
fn detach_pinned(path: &std::path::Path) -> anyhow::Result<()> {
    match PinnedLink::from_pin(path) {
        Ok(link) => {
            link.unpin()
                .with_context(|| format!("cannot unpin {}", path.display()))?;
        }
        Err(_) if path.exists() => {
            // Not a link (stray file): remove it so the directory is ours again.
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
        Err(_) => {}
    }
    Ok(())
}

/// Removes every pin and directory of a layout: links first (detaching), then maps.
/// Returns what was removed. Used by `uninstall` and to undo a failed fresh install.
pub fn remove_all_pins(layout: &PinLayout) -> Vec<PathBuf> {
    // The pod-edge layer's links and filters first (they use the maps too).
    let mut removed = super::edge::remove_all(layout);
    if let Ok(names) = layout.pinned_links() {
        for name in names {
            let path = layout.link(&name);
            if detach_pinned(&path).is_ok() {
                removed.push(path);
            }
        }
    }
    for name in names::ALL.into_iter().chain(names::RETIRED) {
        let path = layout.map(name);
        if std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    for dir in [
        layout.links_dir(),
        layout.maps_dir(),
        layout.root().to_path_buf(),
    ] {
        let _ = std::fs::remove_dir(dir);
    }
    removed
}
