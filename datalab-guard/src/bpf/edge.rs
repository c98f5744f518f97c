//! The pod-edge layer as the agent sees it: the `dg_edge` tc program on the ingress of the
//! host side of a guarded pod's interface (its veth peer), and the EDGE map that gives each
//! such interface its pod's verdict. It catches what never meets a socket hook (AF_PACKET,
//! AF_XDP, qdisc-bypassing sockets, forwarding inside the pod).
//!
//! Attach: tcx (Linux 6.6+) as the first program on the interface, its link pinned at
//! `<bpffs>/edge/<ifindex>`; where the kernel has no tcx, a clsact qdisc and a
//! direct-action filter, recorded by an empty directory `<bpffs>/edge/<ifindex>-tc-<prio>-<handle>`
//! (a netlink filter is no bpf_link and cannot be pinned; the filter itself keeps the
//! program attached). Either way enforcement survives the agent, and a restarted agent
//! adopts what it finds: the pinned link (or the filter) is switched to the agent's own
//! program in place (`bpf_link_update` / netlink replace), without a moment unattached.
//!
//! Invariant, as for the cgroup programs: the interface's EDGE entry is written before the
//! program is attached, so its first frame is judged with the pod's real verdict.

use std::{ffi::CString, io, path::PathBuf};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::{HashMap, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use datalab_guard_common::{
    maps::{self as names, programs},
    EdgeEntry,
};

use super::{object::OBJECT, PinLayout};

/// How an interface's program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A tcx bpf_link (Linux 6.6+), pinned.
    Tcx,
    /// A clsact qdisc filter (older kernels), recorded by a marker directory.
    Clsact { priority: u16, handle: u32 },
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tcx => "tcx",
            Backend::Clsact { .. } => "clsact",
        }
    }
}

/// Which backends an attach may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preference {
    /// tcx where the kernel has it, clsact otherwise.
    Auto,
    /// clsact even where tcx works (the `DATALAB_GUARD_EDGE_CLSACT=1` test knob: the fallback
    /// path must be testable on a kernel that has tcx).
    ClsactOnly,
}

impl Preference {
    /// [`Preference::ClsactOnly`] when `DATALAB_GUARD_EDGE_CLSACT=1`, else `Auto`.
    pub fn from_env() -> Preference {
        if std::env::var("DATALAB_GUARD_EDGE_CLSACT").as_deref() == Ok("1") {
            Preference::ClsactOnly
        } else {
            Preference::Auto
        }
    }
}

/// Why an interface could not be given the edge program. Never fatal in node mode: the
/// cgroup layer keeps enforcing; the caller logs and counts it.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// The interface does not exist (any more): it went while we attached.
    #[error("interface {0} is gone")]
    InterfaceGone(String),
    /// Neither tcx nor clsact could attach the program.
    #[error("cannot attach the edge program to {iface}: {detail}")]
    Attach { iface: String, detail: String },
    /// Pins or maps could not be read or written.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

impl EdgeError {
    /// Bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            EdgeError::InterfaceGone(_) => "interface_gone",
            EdgeError::Attach { .. } => "attach_failed",
            EdgeError::Other(_) => "other",
        }
    }
}

/// One interface the edge program is attached to, as recorded under `<bpffs>/edge/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedEdge {
    pub ifindex: u32,
    pub backend: Backend,
    /// The pin (tcx) or marker directory (clsact).
    pub path: PathBuf,
}

/// The directory holding the edge layer's pins and markers.
pub fn edge_dir(layout: &PinLayout) -> PathBuf {
    layout.root().join("edge")
}

/// What `<bpffs>/edge/` records, sorted by ifindex. Names it does not recognise are skipped.
pub fn attached(layout: &PinLayout) -> io::Result<Vec<AttachedEdge>> {
    let dir = edge_dir(layout);
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((ifindex, backend)) = parse_pin_name(&name) {
            out.push(AttachedEdge {
                ifindex,
                backend,
                path: entry.path(),
            });
        }
    }
    out.sort_by_key(|a| a.ifindex);
    Ok(out)
}

/// `<ifindex>` (tcx) or `<ifindex>-tc-<prio>-<handle>` (clsact). bpffs refuses dots.
fn pin_name(ifindex: u32, backend: Backend) -> String {
    match backend {
        Backend::Tcx => ifindex.to_string(),
        Backend::Clsact { priority, handle } => format!("{ifindex}-tc-{priority}-{handle}"),
    }
}

fn parse_pin_name(name: &str) -> Option<(u32, Backend)> {
    let mut parts = name.split('-');
    let ifindex: u32 = parts.next()?.parse().ok()?;
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (None, ..) => Some((ifindex, Backend::Tcx)),
        (Some("tc"), Some(prio), Some(handle), None) => Some((
            ifindex,
            Backend::Clsact {
                priority: prio.parse().ok()?,
                handle: handle.parse().ok()?,
            },
        )),
        _ => None,
    }
}

/// The index of interface `name` in the agent's network namespace.
pub fn ifindex_of(name: &str) -> Option<u32> {
    let c = CString::new(name).ok()?;
    // SAFETY: c is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (index != 0).then_some(index)
}

/// The name of interface `ifindex` in the agent's network namespace.
pub fn ifname_of(ifindex: u32) -> Option<String> {
    let mut buf: [libc::c_char; libc::IF_NAMESIZE] = [0; libc::IF_NAMESIZE];
    // SAFETY: buf has the IF_NAMESIZE bytes if_indextoname may write.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Checks that `name` is an Ethernet interface of this network namespace (the program
/// parses Ethernet headers; loopback or an IP-only tunnel device would be misread).
pub fn check_edge_iface(name: &str) -> Result<u32, String> {
    if name.is_empty() || name.len() >= libc::IF_NAMESIZE {
        return Err(format!("{name:?} is not a valid interface name"));
    }
    let ifindex = ifindex_of(name)
        .ok_or_else(|| format!("no interface {name:?} in this network namespace"))?;
    match link_type(name) {
        Ok(libc::ARPHRD_ETHER) => Ok(ifindex),
        Ok(other) => Err(format!(
            "{name} is not an Ethernet interface (link type {other}); the edge layer needs the host side of a veth"
        )),
        Err(e) => Err(format!("cannot read the link type of {name}: {e}")),
    }
}

/// The ARPHRD_* link type of interface `name` (SIOCGIFHWADDR).
fn link_type(name: &str) -> io::Result<u16> {
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: a valid socket fd and a valid ifreq with a NUL-terminated name (checked length).
    let rc = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SIOCGIFHWADDR,
            &mut req,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFHWADDR filled in ifru_hwaddr.
    Ok(unsafe { req.ifr_ifru.ifru_hwaddr.sa_family })
}

/// The loaded edge program and the EDGE map, attaching to and detaching from interfaces.
/// Needs an installed layout (the maps are the pinned ones).
pub struct EdgeLayer {
    layout: PinLayout,
    preference: Preference,
    edge_map: HashMap<MapData, u32, EdgeEntry>,
    // The loaded object: the program attached from here, and the maps its fds refer to.
    ebpf: Ebpf,
}

impl EdgeLayer {
    pub fn new(layout: &PinLayout, preference: Preference) -> anyhow::Result<EdgeLayer> {
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.maps_dir())
            .load(OBJECT)
            .context("cannot load the eBPF object")?;
        let map = ebpf
            .take_map(names::EDGE)
            .ok_or_else(|| anyhow!("map {} missing", names::EDGE))?;
        let edge_map = HashMap::try_from(map).context(names::EDGE)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(programs::EDGE)
            .ok_or_else(|| anyhow!("program {} missing from the object", programs::EDGE))?
            .try_into()?;
        prog.load()
            .with_context(|| format!("the kernel refused {}", programs::EDGE))?;
        std::fs::create_dir_all(edge_dir(layout))
            .with_context(|| format!("cannot create {}", edge_dir(layout).display()))?;
        Ok(EdgeLayer {
            layout: layout.clone(),
            preference,
            edge_map,
            ebpf,
        })
    }

    fn program(&mut self) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(programs::EDGE)
            .ok_or_else(|| anyhow!("program {} missing", programs::EDGE))?
            .try_into()?)
    }

    /// Gives interface `iface` the edge program with `entry` as its verdict: writes the
    /// entry, then adopts what is attached there already (switching it to this program in
    /// place) or attaches afresh. Returns the backend in use.
    pub fn attach(&mut self, iface: &str, entry: EdgeEntry) -> Result<Backend, EdgeError> {
        let ifindex = ifindex_of(iface).ok_or_else(|| EdgeError::InterfaceGone(iface.into()))?;
        self.edge_map
            .insert(ifindex, entry, 0)
            .with_context(|| format!("cannot write the {} entry of {iface}", names::EDGE))?;
        let existing: Vec<AttachedEdge> = attached(&self.layout)
            .map_err(anyhow::Error::from)?
            .into_iter()
            .filter(|a| a.ifindex == ifindex)
            .collect();
        for old in &existing {
            match self.adopt(iface, old) {
                Ok(()) => return Ok(old.backend),
                Err(e) => {
                    // A link whose interface went (ifindex reused) or a filter someone removed:
                    // forget it and attach afresh below.
                    tracing::debug!(iface, error = %e, path = %old.path.display(), "stale edge pin replaced");
                    remove_record(old);
                }
            }
        }
        let result = self.attach_fresh(iface, ifindex);
        if result.is_err() && ifindex_of(iface) != Some(ifindex) {
            let _ = self.edge_map.remove(&ifindex);
            return Err(EdgeError::InterfaceGone(iface.into()));
        }
        result
    }

    fn adopt(&mut self, iface: &str, old: &AttachedEdge) -> anyhow::Result<()> {
        let link = match old.backend {
            Backend::Tcx => {
                let pinned = PinnedLink::from_pin(&old.path)?;
                SchedClassifierLink::try_from(FdLink::from(pinned))?
            }
            Backend::Clsact { priority, handle } => SchedClassifierLink::attached(
                iface,
                TcAttachType::Ingress,
                priority,
                TcHandle::from(handle),
                None,
            )?,
        };
        let prog = self.program()?;
        let id = prog.attach_to_link(link)?;
        let link = prog.take_link(id)?;
        keep_attached(link, old.backend);
        Ok(())
    }

    fn attach_fresh(&mut self, iface: &str, ifindex: u32) -> Result<Backend, EdgeError> {
        let tcx_error = if self.preference == Preference::Auto {
            match self.attach_tcx(iface, ifindex) {
                Ok(()) => return Ok(Backend::Tcx),
                Err(e) => format!("tcx: {e:#}; "),
            }
        } else {
            String::new()
        };
        self.attach_clsact(iface, ifindex)
            .map_err(|e| EdgeError::Attach {
                iface: iface.into(),
                detail: format!("{tcx_error}clsact: {e:#}"),
            })
    }

    fn attach_tcx(&mut self, iface: &str, ifindex: u32) -> anyhow::Result<()> {
        let prog = self.program()?;
        // First on the interface: a CNI program later in the chain may redirect the frame,
        // which would skip whatever comes after it.
        let id = prog.attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::TcxOrder(LinkOrder::first()),
        )?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        let path = edge_dir(&self.layout).join(pin_name(ifindex, Backend::Tcx));
        // On a pin failure the link is dropped, which detaches it: nothing half-done.
        link.pin(&path)
            .with_context(|| format!("cannot pin {}", path.display()))?;
        Ok(())
    }

    fn attach_clsact(&mut self, iface: &str, ifindex: u32) -> anyhow::Result<Backend> {
        match tc::qdisc_add_clsact(iface) {
            Ok(()) => {}
            Err(tc::TcError::NetlinkError(e)) if is_exists(&e) => {}
            Err(e) => return Err(e.into()),
        }
        let prog = self.program()?;
        let id = prog.attach_with_options(
            iface,
            TcAttachType::Ingress,
            TcAttachOptions::Netlink(NlOptions::default()),
        )?;
        let link = prog.take_link(id)?;
        let backend = Backend::Clsact {
            priority: link.priority()?,
            handle: u32::from(link.handle()?),
        };
        let path = edge_dir(&self.layout).join(pin_name(ifindex, backend));
        if let Err(e) = std::fs::create_dir(&path) {
            // Dropping the link detaches the filter again.
            drop(link);
            return Err(anyhow::Error::new(e).context(format!("cannot record {}", path.display())));
        }
        keep_attached(link, backend);
        Ok(backend)
    }

    /// Detaches the edge program from `ifindex` (if attached) and removes its entry.
    pub fn detach(&mut self, ifindex: u32) -> anyhow::Result<()> {
        detach_records(&self.layout, ifindex)?;
        match self.edge_map.remove(&ifindex) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(anyhow::Error::new(e).context("cannot remove an edge entry")),
        }
    }

    /// Forgets records (and entries) of interfaces that no longer exist in this namespace:
    /// their links died with them (pods deleted while no agent ran). Returns how many.
    pub fn prune_dead(&mut self) -> usize {
        let Ok(records) = attached(&self.layout) else {
            return 0;
        };
        let mut pruned = 0;
        for record in records {
            if ifname_of(record.ifindex).is_none() {
                remove_record(&record);
                let _ = self.edge_map.remove(&record.ifindex);
                pruned += 1;
            }
        }
        pruned
    }

    /// The EDGE map's entries (ifindex → entry).
    pub fn entries(&self) -> anyhow::Result<Vec<(u32, EdgeEntry)>> {
        let mut out = Vec::new();
        for item in self.edge_map.iter() {
            out.push(item?);
        }
        Ok(out)
    }
}

/// Lets `link` outlive this process: a tcx link is pinned (closing our fd keeps it); a
/// netlink filter would be deleted by the wrapper's drop, so the wrapper is forgotten.
fn keep_attached(link: SchedClassifierLink, backend: Backend) {
    match backend {
        Backend::Tcx => {
            if let Ok(fd) = FdLink::try_from(link) {
                drop(fd);
            }
        }
        Backend::Clsact { .. } => std::mem::forget(link),
    }
}

fn is_exists(e: &aya::sys::NetlinkError) -> bool {
    e.raw_os_error() == Some(libc::EEXIST)
}

/// Detaches whatever `<bpffs>/edge/` records for `ifindex`.
fn detach_records(layout: &PinLayout, ifindex: u32) -> anyhow::Result<()> {
    for record in attached(layout)?
        .into_iter()
        .filter(|a| a.ifindex == ifindex)
    {
        detach_record(&record)?;
    }
    Ok(())
}

fn detach_record(record: &AttachedEdge) -> anyhow::Result<()> {
    match record.backend {
        Backend::Tcx => {
            if let Ok(link) = PinnedLink::from_pin(&record.path) {
                // Unpinned and dropped: the last reference goes and the program detaches.
                link.unpin()
                    .with_context(|| format!("cannot unpin {}", record.path.display()))?;
            } else {
                remove_record(record);
            }
        }
        Backend::Clsact { .. } => {
            // By program name, not by priority and handle: run from another network namespace
            // (where the ifindex names some other interface) this must not delete a stranger's
            // filter. Every `dg_edge` filter is ours; none left is no error.
            if let Some(iface) = ifname_of(record.ifindex) {
                match tc::qdisc_detach_program(&iface, TcAttachType::Ingress, programs::EDGE) {
                    Ok(()) => {}
                    Err(tc::TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => {
                        return Err(anyhow::Error::new(e)
                            .context(format!("cannot remove the edge filter of {iface}")))
                    }
                }
            }
            remove_record(record);
        }
    }
    Ok(())
}

fn remove_record(record: &AttachedEdge) {
    let _ = match record.backend {
        Backend::Tcx => std::fs::remove_file(&record.path),
        Backend::Clsact { .. } => std::fs::remove_dir(&record.path),
    };
}

/// Detaches every recorded edge attachment and removes `<bpffs>/edge/` (for `uninstall`).
/// Returns what was removed.
pub fn remove_all(layout: &PinLayout) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    if let Ok(records) = attached(layout) {
        for record in records {
            if detach_record(&record).is_ok() {
                removed.push(record.path);
            }
        }
    }
    let dir = edge_dir(layout);
    if std::fs::remove_dir(&dir).is_ok() {
        removed.push(dir);
    }
    removed
}

/// The tcx programs on `iface`'s ingress (ids), for `status` and the tests.
pub fn tcx_program_ids(iface: &str) -> Result<Vec<u32>, ProgramError> {
    let (_, progs) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)?;
    Ok(progs.iter().map(|p| p.id()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_names_round_trip_and_strangers_are_skipped() {
        for backend in [
            Backend::Tcx,
            Backend::Clsact {
                priority: 49152,
                handle: 0x1_0001,
            },
        ] {
            assert_eq!(parse_pin_name(&pin_name(17, backend)), Some((17, backend)));
        }
        for stranger in [
            "",
            "x",
            "17-",
            "17-tc",
            "17-tc-1",
            "17-tc-1-2-3",
            "-1",
            "17-xx-1-2",
        ] {
            assert_eq!(parse_pin_name(stranger), None, "{stranger:?}");
        }
    }

    #[test]
    fn loopback_resolves_both_ways() {
        let lo = ifindex_of("lo").expect("every namespace has lo");
        assert_eq!(ifname_of(lo).as_deref(), Some("lo"));
        assert_eq!(ifindex_of("no-such-if-x"), None);
        assert_eq!(ifindex_of("bad\0name"), None);
    }
}
