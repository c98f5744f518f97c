//! Node mode's pod-edge layer: for every guarded pod, find its network namespace (a process
//! of its cgroup: `/proc/<pid>/ns/net`, which needs `hostPID`; else the runtime's named
//! namespace whose addresses hold the pod's IP, as the CNI probe does), find the host side
//! of its interface (the pod's veth `IFLA_LINK` is the peer's ifindex, confirmed by the
//! peer's own `IFLA_LINK` pointing back), and attach the edge program there; detach when
//! the pod goes or stops being guarded.
//!
//! Never fatal: a pod whose namespace cannot be found or entered, whose interface has no
//! host-side peer (hostNetwork, ipvlan, macvlan, SR-IOV, netkit) or disappears while
//! attaching is logged once, counted (`edge_failures_total{reason}`) and reported as not
//! covered (`edge_pods{state}`); the cgroup layer keeps enforcing. A failed pod is retried
//! after 1 s, the delay doubling up to [`RETRY_EVERY`] ([`retry_delay`]), on a wake of its
//! own ([`NodeEdge::next_retry`], [`NodeEdge::retry_due`]), not only on the next reconcile:
//! a new pod's namespace usually does not exist yet when the agent first sees the pod (the
//! kubelet makes the pod's cgroup before the sandbox, and CNI runs after that), and its raw
//! paths stay open until the edge program is on its interface.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    net::IpAddr,
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use datalab_guard_common::{EdgeEntry, Verdict};

use crate::{
    bpf::{
        edge::{self, EdgeLayer, Preference},
        PinLayout,
    },
    k8s::convert::NodePod,
    metrics::EdgeSample,
    probe::netns::{netns_addresses, netns_of_cgroup, on_netns_thread},
};

/// The longest wait before a pod that could not be covered is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(30);
/// The first wait; each failed attempt doubles it, up to [`RETRY_EVERY`].
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// A pod whose namespace is not found is warned about only after this many attempts (about
/// 15 s): before that it is normally a pod whose sandbox is still being made.
const NETNS_UNKNOWN_WARN_AFTER: u32 = 4;

/// How long to wait after the `attempts`-th failed attempt in a row (counted from 1).
fn retry_delay(attempts: u32) -> Duration {
    FIRST_RETRY
        .saturating_mul(1 << attempts.saturating_sub(1).min(5))
        .min(RETRY_EVERY)
}

/// What the edge layer needs to know of one guarded pod.
#[derive(Clone, Debug)]
pub struct GuardedPod {
    pub uid: String,
    pub cgroup_id: u64,
    pub class: u32,
    /// The pod's cgroup directory, once the kubelet made it.
    pub dir: Option<PathBuf>,
    pub ip: Option<IpAddr>,
    pub host_network: bool,
}

/// The guarded pods of one reconcile with what the edge layer needs of each.
pub fn guarded_pods(
    desired: &super::index::Desired,
    index: &super::index::PodIndex,
    view: &crate::k8s::ClusterView,
) -> Vec<GuardedPod> {
    // The stored records, by uid: no copy of every pod's strings per reconcile.
    let records = view.node_pods();
    let by_uid: HashMap<&str, &NodePod> = records
        .iter()
        .map(|p| (p.info.uid.as_str(), &**p))
        .collect();
    desired
        .rows
        .iter()
        .filter(|r| r.verdict == Verdict::Guard)
        .filter_map(|r| {
            let cgroup_id = r.cgroup_id?;
            let entry = desired.verdicts.get(&cgroup_id)?;
            (Verdict::from_raw(entry.verdict) == Verdict::Guard).then(|| GuardedPod {
                uid: r.uid.clone(),
                cgroup_id,
                class: entry.class,
                dir: index.dir_of_pod(&r.uid).map(|d| d.path.clone()),
                ip: by_uid.get(r.uid.as_str()).and_then(|p| p.ip),
                host_network: by_uid
                    .get(r.uid.as_str())
                    .is_some_and(|p| p.info.host_network),
            })
        })
        .collect()
}

/// Why a guarded pod is not covered (bounded metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Uncovered {
    /// Shares the node's network namespace: there is no pod edge.
    HostNetwork,
    /// No process found and no named namespace holds its IP (yet).
    NetnsUnknown,
    /// The namespace could not be entered or read.
    NetnsUnreadable,
    /// No interface with a peer in the node's namespace (ipvlan, macvlan, SR-IOV, netkit).
    NoVethPeer,
    /// The interface went while attaching.
    InterfaceGone,
    /// The kernel refused both tcx and clsact, or the pins could not be written.
    AttachFailed,
}

impl Uncovered {
    pub const ALL: [Uncovered; 6] = [
        Uncovered::HostNetwork,
        Uncovered::NetnsUnknown,
        Uncovered::NetnsUnreadable,
        Uncovered::NoVethPeer,
        Uncovered::InterfaceGone,
        Uncovered::AttachFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Uncovered::HostNetwork => "host_network",
            Uncovered::NetnsUnknown => "netns_unknown",
            Uncovered::NetnsUnreadable => "netns_unreadable",
            Uncovered::NoVethPeer => "no_veth_peer",
            Uncovered::InterfaceGone => "interface_gone",
            Uncovered::AttachFailed => "attach_failed",
        }
    }
}

enum PodState {
    Attached {
        ifindex: u32,
        entry: EdgeEntry,
    },
    Failed {
        reason: Uncovered,
        at: Instant,
        /// Failed attempts in a row.
        attempts: u32,
        /// What the attempt knew of the pod, for a retry between reconciles.
        pod: GuardedPod,
    },
}

impl PodState {
    /// When a failed pod is due for another attempt (`None`: attached, or never retried).
    fn retry_at(&self) -> Option<Instant> {
        match self {
            PodState::Failed {
                reason: Uncovered::HostNetwork,
                ..
            }
            | PodState::Attached { .. } => None,
            PodState::Failed { at, attempts, .. } => Some(*at + retry_delay(*attempts)),
        }
    }
}

/// The edge layer's per-pod state on this node.
pub struct NodeEdge {
    layout: PinLayout,
    netns_dir: PathBuf,
    layer: Option<EdgeLayer>,
    /// The layer itself could not be loaded (logged once); every pod is then uncovered.
    layer_error: bool,
    pods: HashMap<String, PodState>,
    failures: BTreeMap<Uncovered, u64>,
    /// Guarded pods holding CAP_NET_RAW that neither the BPF LSM nor the edge layer covers,
    /// as of the last count.
    net_raw: Option<NetRawCount>,
}

/// The pods exposed by CAP_NET_RAW. Judging a pod reads /proc, so each pod is judged when
/// it is first guarded and again after [`RETRY_EVERY`], every pod anew when the LSM changes.
struct NetRawCount {
    lsm: bool,
    /// Guarded pod uid → when it was judged and whether a process of it held CAP_NET_RAW.
    judged: HashMap<String, (Instant, bool)>,
    exposed: Vec<super::net_raw::Exposed>,
}

/// At most this many pods whose judgement aged past [`RETRY_EVERY`] are read from /proc
/// again per count: a node of 10 000 pods is not read all at once on the reconcile loop.
const NET_RAW_REJUDGE_PER_COUNT: usize = 256;

impl NodeEdge {
    pub fn new(layout: PinLayout, netns_dir: PathBuf) -> NodeEdge {
        NodeEdge {
            layout,
            netns_dir,
            layer: None,
            layer_error: false,
            pods: HashMap::new(),
            failures: BTreeMap::new(),
            net_raw: None,
        }
    }

    /// Brings the attachments in line with `guarded` (called after every reconcile).
    pub fn sync(&mut self, guarded: &[GuardedPod]) {
        let wanted: HashMap<&str, &GuardedPod> =
            guarded.iter().map(|p| (p.uid.as_str(), p)).collect();
        let gone: Vec<String> = self
            .pods
            .keys()
            .filter(|uid| !wanted.contains_key(uid.as_str()))
            .cloned()
            .collect();
        for uid in gone {
            if let Some(PodState::Attached { ifindex, .. }) = self.pods.remove(&uid) {
                self.detach(&uid, ifindex);
            }
        }
        if let Some(layer) = self.layer.as_mut() {
            let pruned = layer.prune_dead();
            if pruned > 0 {
                tracing::info!(pruned, "edge records of vanished interfaces removed");
            }
        }
        let mut named: Option<Vec<(PathBuf, Vec<IpAddr>)>> = None;
        for pod in guarded {
            let due = match self.pods.get(&pod.uid) {
                None => true,
                Some(PodState::Attached { entry, .. }) => {
                    entry.cgroup_id != pod.cgroup_id || entry.class != pod.class
                }
                Some(failed @ PodState::Failed { pod: known, .. }) => {
                    // What the pod is known by changed (its IP arrived, say): try now.
                    known.ip != pod.ip
                        || known.dir != pod.dir
                        || failed.retry_at().is_some_and(|at| at <= Instant::now())
                }
            };
            if due {
                let state = self.cover(pod, &mut named);
                self.pods.insert(pod.uid.clone(), state);
            }
        }
    }

    /// When the next failed pod is due for another attempt (`None`: none is).
    pub fn next_retry(&self) -> Option<Instant> {
        self.pods.values().filter_map(PodState::retry_at).min()
    }

    /// Tries again every failed pod that is due, with what the last reconcile knew of it.
    /// Returns whether anything was tried (the caller then republishes the sample).
    pub fn retry_due(&mut self) -> bool {
        let now = Instant::now();
        let due: Vec<GuardedPod> = self
            .pods
            .values()
            .filter(|state| state.retry_at().is_some_and(|at| at <= now))
            .filter_map(|state| match state {
                PodState::Failed { pod, .. } => Some(pod.clone()),
                PodState::Attached { .. } => None,
            })
            .collect();
        let mut named = None;
        for pod in &due {
            let state = self.cover(pod, &mut named);
            self.pods.insert(pod.uid.clone(), state);
        }
        !due.is_empty()
    }

    fn cover(
        &mut self,
        pod: &GuardedPod,
        named: &mut Option<Vec<(PathBuf, Vec<IpAddr>)>>,
    ) -> PodState {
        let attempts = match self.pods.get(&pod.uid) {
            Some(PodState::Failed { attempts, .. }) => *attempts,
            _ => 0,
        };
        match self.try_cover(pod, named) {
            Ok((ifindex, entry, backend)) => {
                tracing::info!(pod_uid = %pod.uid, ifindex, backend, attempts = attempts + 1, "edge layer attached");
                PodState::Attached { ifindex, entry }
            }
            Err((reason, detail)) => {
                *self.failures.entry(reason).or_default() += 1;
                let attempts = attempts + 1;
                // Once per pod: retries that fail again stay quiet. A namespace not found
                // yet is normal for a few seconds of a new pod's life.
                let warn_at = if reason == Uncovered::NetnsUnknown {
                    NETNS_UNKNOWN_WARN_AFTER
                } else {
                    1
                };
                if attempts == warn_at {
                    tracing::warn!(pod_uid = %pod.uid, reason = reason.as_str(), detail = %detail, attempts, "pod not covered by the edge layer; the cgroup layer keeps enforcing");
                }
                PodState::Failed {
                    reason,
                    at: Instant::now(),
                    attempts,
                    pod: pod.clone(),
                }
            }
        }
    }

    fn try_cover(
        &mut self,
        pod: &GuardedPod,
        named: &mut Option<Vec<(PathBuf, Vec<IpAddr>)>>,
    ) -> Result<(u32, EdgeEntry, &'static str), (Uncovered, String)> {
        if pod.host_network {
            return Err((Uncovered::HostNetwork, "hostNetwork pod".into()));
        }
        let netns = self.netns_of(pod, named).ok_or_else(|| {
            let dir = pod.dir.as_deref().map_or_else(
                || "no cgroup directory yet".to_owned(),
                |d| format!("no process in {}", d.display()),
            );
            let ip = pod.ip.map_or_else(
                || "no pod IP yet".to_owned(),
                |ip| format!("no namespace under {} holds {ip}", self.netns_dir.display()),
            );
            (Uncovered::NetnsUnknown, format!("{dir}; {ip}"))
        })?;
        let file = File::open(&netns).map_err(|e| {
            (
                Uncovered::NetnsUnreadable,
                format!("{}: {e}", netns.display()),
            )
        })?;
        if is_own_netns(&file) {
            return Err((Uncovered::HostNetwork, "shares the node's namespace".into()));
        }
        let ifindex = host_peer(file).map_err(|e| (e.0, e.1))?;
        let iface = edge::ifname_of(ifindex)
            .ok_or((Uncovered::InterfaceGone, format!("ifindex {ifindex}")))?;
        edge::check_edge_iface(&iface).map_err(|e| (Uncovered::NoVethPeer, e))?;
        let layer = self
            .layer()
            .ok_or((Uncovered::AttachFailed, "edge program not loaded".into()))?;
        let entry = EdgeEntry {
            verdict: Verdict::Guard as u32,
            class: pod.class,
            cgroup_id: pod.cgroup_id,
        };
        match layer.attach(&iface, entry) {
            Ok(backend) => Ok((ifindex, entry, backend.name())),
            Err(e @ edge::EdgeError::InterfaceGone(_)) => {
                Err((Uncovered::InterfaceGone, e.to_string()))
            }
            Err(e) => Err((Uncovered::AttachFailed, format!("{e:#}"))),
        }
    }

    fn netns_of(
        &self,
        pod: &GuardedPod,
        named: &mut Option<Vec<(PathBuf, Vec<IpAddr>)>>,
    ) -> Option<PathBuf> {
        if let Some(path) = pod.dir.as_deref().and_then(netns_of_cgroup) {
            return Some(path);
        }
        let ip = pod.ip?;
        let list =
            named.get_or_insert_with(|| netns_addresses(&self.netns_dir).unwrap_or_default());
        list.iter()
            .find(|(_, addrs)| addrs.contains(&ip))
            .map(|(path, _)| path.clone())
    }

    fn layer(&mut self) -> Option<&mut EdgeLayer> {
        if self.layer.is_none() && !self.layer_error {
            match EdgeLayer::new(&self.layout, Preference::from_env()) {
                Ok(layer) => self.layer = Some(layer),
                Err(e) => {
                    self.layer_error = true;
                    tracing::error!(error = %format!("{e:#}"), "cannot load the edge program; pods are covered by the cgroup layer only");
                }
            }
        }
        self.layer.as_mut()
    }

    fn detach(&mut self, uid: &str, ifindex: u32) {
        if let Some(layer) = self.layer.as_mut() {
            match layer.detach(ifindex) {
                Ok(()) => tracing::info!(pod_uid = %uid, ifindex, "edge layer detached"),
                Err(e) => {
                    tracing::warn!(pod_uid = %uid, ifindex, error = %format!("{e:#}"), "cannot detach the edge layer");
                }
            }
        }
    }

    /// Recounts the guarded pods whose processes hold CAP_NET_RAW while no layer closes
    /// raw paths for them: none when the BPF LSM program runs (`lsm`), else those the edge
    /// layer does not cover. A new guarded pod is judged at once; a judged one again after
    /// [`RETRY_EVERY`] (at most [`NET_RAW_REJUDGE_PER_COUNT`] per call); all anew when the LSM
    /// changes. The edge coverage is read on every call.
    pub fn count_net_raw(&mut self, guarded: &[GuardedPod], lsm: bool) {
        let count = self.net_raw.get_or_insert_with(|| NetRawCount {
            lsm,
            judged: HashMap::new(),
            exposed: Vec::new(),
        });
        if count.lsm != lsm {
            // The BPF LSM closes raw paths for every pod (or stopped doing so): judge anew.
            count.lsm = lsm;
            count.judged.clear();
        }
        let live: std::collections::HashSet<&str> =
            guarded.iter().map(|p| p.uid.as_str()).collect();
        count.judged.retain(|uid, _| live.contains(uid.as_str()));
        count.exposed.clear();
        if lsm {
            return;
        }
        // New pods are judged at once, aged judgements a bounded number at a time.
        let mut rejudged = 0;
        for p in guarded {
            let due = match count.judged.get(&p.uid) {
                None => true,
                Some((at, _)) if at.elapsed() >= RETRY_EVERY => {
                    rejudged += 1;
                    rejudged <= NET_RAW_REJUDGE_PER_COUNT
                }
                Some(_) => false,
            };
            if due {
                let holds = p.dir.as_deref().and_then(super::net_raw::holds_net_raw);
                count
                    .judged
                    .insert(p.uid.clone(), (Instant::now(), holds.unwrap_or(false)));
            }
            if count.judged.get(&p.uid).is_some_and(|(_, holds)| *holds) {
                let edge = match self.pods.get(&p.uid) {
                    Some(PodState::Attached { .. }) => continue,
                    Some(PodState::Failed { reason, .. }) => reason.as_str(),
                    None => "pending",
                };
                count.exposed.push(super::net_raw::Exposed {
                    uid: p.uid.clone(),
                    edge,
                });
            }
        }
    }

    /// The pods of the last CAP_NET_RAW count (`None` before the first).
    pub fn net_raw_exposed(&self) -> Option<&[super::net_raw::Exposed]> {
        self.net_raw.as_ref().map(|c| c.exposed.as_slice())
    }

    /// Pods covered and not, and failures so far, for the metrics.
    pub fn sample(&self) -> EdgeSample {
        let mut uncovered: BTreeMap<&'static str, u64> =
            Uncovered::ALL.iter().map(|r| (r.as_str(), 0)).collect();
        let mut attached = 0;
        for state in self.pods.values() {
            match state {
                PodState::Attached { .. } => attached += 1,
                PodState::Failed { reason, .. } => {
                    *uncovered.entry(reason.as_str()).or_default() += 1;
                }
            }
        }
        EdgeSample {
            net_raw_uncovered: self.net_raw.as_ref().map(|c| c.exposed.len() as u64),
            attached,
            uncovered: uncovered.into_iter().collect(),
            failures: Uncovered::ALL
                .iter()
                .map(|r| (r.as_str(), self.failures.get(r).copied().unwrap_or(0)))
                .collect(),
        }
    }
}

fn is_own_netns(file: &File) -> bool {
    let own = std::fs::metadata("/proc/thread-self/ns/net");
    match (file.metadata(), own) {
        (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
        _ => false,
    }
}

/// The ifindex, in the agent's namespace, of the host side of the pod's interface: the
/// pod's Ethernet interface whose peer lives in another namespace (`IFLA_LINK_NETNSID`),
/// confirmed by the host interface of that index linking back to it.
fn host_peer(netns: File) -> Result<u32, (Uncovered, String)> {
    let pod_links = on_netns_thread("dg-edge-peer", move |thread| {
        thread.enter(&netns)?;
        netlink::links()
    })
    .and_then(|r| r)
    .map_err(|e| (Uncovered::NetnsUnreadable, e.to_string()))?;
    let host_links = netlink::links().map_err(|e| (Uncovered::NetnsUnreadable, e.to_string()))?;
    let mut candidates: Vec<&netlink::Link> = pod_links
        .iter()
        .filter(|l| l.ether && l.peer_in_other_netns && l.link.is_some())
        .collect();
    // eth0 first, as every CNI names the pod's interface.
    candidates.sort_by_key(|l| l.name != "eth0");
    for pod_if in candidates {
        let Some(peer) = pod_if.link else { continue };
        let links_back = host_links
            .iter()
            .any(|h| h.index == peer && h.link == Some(pod_if.index) && h.peer_in_other_netns);
        if links_back {
            return Ok(peer);
        }
    }
    Err((
        Uncovered::NoVethPeer,
        "no interface with a peer in the node's namespace".into(),
    ))
}

/// A minimal rtnetlink link dump: index, name, type, `IFLA_LINK` and whether the link's
/// peer is in another namespace. Asked over a socket made in the calling thread's namespace.
pub(crate) mod netlink {
    use std::{io, os::fd::AsRawFd as _};

    const IFLA_IFNAME: u16 = 3;
    const IFLA_LINK: u16 = 5;
    const IFLA_LINK_NETNSID: u16 = 37;
    const NLMSG_HDRLEN: usize = 16;
    const IFINFOMSG_LEN: usize = 16;
    /// Dump replies read before giving up (each up to 64 KiB): bounds memory and time.
    const MAX_REPLIES: usize = 256;

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub struct Link {
        pub index: u32,
        pub name: String,
        pub ether: bool,
        pub link: Option<u32>,
        pub peer_in_other_netns: bool,
    }

    pub fn links() -> io::Result<Vec<Link>> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh socket we own.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let mut req = [0u8; NLMSG_HDRLEN + IFINFOMSG_LEN];
        req[0..4].copy_from_slice(&((NLMSG_HDRLEN + IFINFOMSG_LEN) as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&libc::RTM_GETLINK.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        req[6..8].copy_from_slice(&flags.to_ne_bytes());
        req[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // SAFETY: valid fd and buffer.
        if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        for _ in 0..MAX_REPLIES {
            // SAFETY: valid fd and buffer.
            let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if parse(&buf[..n as usize], &mut out)? {
                return Ok(out);
            }
        }
        Err(io::Error::other("netlink link dump did not end"))
    }

    /// Parses one reply datagram into `out`; `true` at the end of the dump.
    pub fn parse(mut data: &[u8], out: &mut Vec<Link>) -> io::Result<bool> {
        while data.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
            let ty = u16::from_ne_bytes(data[4..6].try_into().expect("2 bytes"));
            if len < NLMSG_HDRLEN || len > data.len() {
                return Err(io::Error::other("malformed netlink message"));
            }
            match i32::from(ty) {
                libc::NLMSG_DONE => return Ok(true),
                libc::NLMSG_ERROR => {
                    let errno = data
                        .get(NLMSG_HDRLEN..NLMSG_HDRLEN + 4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().expect("4 bytes")));
                    return Err(io::Error::from_raw_os_error(-errno));
                }
                _ if ty == libc::RTM_NEWLINK => {
                    if let Some(link) = parse_link(&data[NLMSG_HDRLEN..len]) {
                        out.push(link);
                    }
                }
                _ => {}
            }
            let step = (len + 3) & !3;
            data = data.get(step..).unwrap_or(&[]);
        }
        Ok(false)
    }

    fn parse_link(body: &[u8]) -> Option<Link> {
        let ifi = body.get(..IFINFOMSG_LEN)?;
        let ty = u16::from_ne_bytes([ifi[2], ifi[3]]);
        let index = i32::from_ne_bytes([ifi[4], ifi[5], ifi[6], ifi[7]]);
        let mut link = Link {
            index: u32::try_from(index).ok()?,
            name: String::new(),
            ether: ty == libc::ARPHRD_ETHER,
            link: None,
            peer_in_other_netns: false,
        };
        let mut attrs = &body[IFINFOMSG_LEN..];
        while attrs.len() >= 4 {
            let alen = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
            let aty = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
            if alen < 4 || alen > attrs.len() {
                break;
            }
            let value = &attrs[4..alen];
            match aty {
                IFLA_IFNAME => {
                    let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
                    link.name = String::from_utf8_lossy(&value[..end]).into_owned();
                }
                IFLA_LINK if value.len() >= 4 => {
                    let peer = u32::from_ne_bytes([value[0], value[1], value[2], value[3]]);
                    // The kernel sends IFLA_LINK only when it differs from the link itself; a
                    // peer in another namespace may well have the same number.
                    link.link = (peer != 0).then_some(peer);
                }
                IFLA_LINK_NETNSID => link.peer_in_other_netns = true,
                _ => {}
            }
            attrs = attrs.get((alen + 3) & !3..).unwrap_or(&[]);
        }
        Some(link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_own_namespace_lists_loopback_without_a_peer() {
        let links = netlink::links().unwrap();
        let lo = links.iter().find(|l| l.name == "lo").expect("lo listed");
        assert!(!lo.ether && lo.link.is_none() && !lo.peer_in_other_netns);
    }

    #[test]
    fn truncated_and_malformed_replies_are_errors_or_ignored() {
        let mut out = Vec::new();
        // A header claiming more bytes than there are.
        let mut msg = vec![0u8; 16];
        msg[0..4].copy_from_slice(&64u32.to_ne_bytes());
        assert!(netlink::parse(&msg, &mut out).is_err());
        // A link message with a cut ifinfomsg is skipped.
        let mut msg = vec![0u8; 20];
        msg[0..4].copy_from_slice(&20u32.to_ne_bytes());
        msg[4..6].copy_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        assert!(!netlink::parse(&msg, &mut out).unwrap());
        assert!(out.is_empty());
    }

    /// This test process's own cgroup directory and whether a process in it holds
    /// CAP_NET_RAW (as root, this one does): the pod the bookkeeping below is about.
    fn own_cgroup() -> Option<(PathBuf, bool)> {
        let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        let dir = crate::cgroups::cgroup2_mount()
            .ok()?
            .join(rel.trim_start_matches('/'));
        let holds = super::super::net_raw::holds_net_raw(&dir) == Some(true);
        Some((dir, holds))
    }

    #[test]
    fn net_raw_exposure_names_uncovered_pods_and_recounts_when_its_inputs_change() {
        let Some((dir, holds)) = own_cgroup() else {
            return;
        };
        // A hostNetwork pod is never attached (nothing is loaded for it): uncovered.
        let pod = |uid: &str| GuardedPod {
            uid: uid.into(),
            cgroup_id: 1,
            class: 0,
            dir: Some(dir.clone()),
            ip: None,
            host_network: true,
        };
        let mut edge = NodeEdge::new(
            PinLayout::new(std::path::Path::new("/nonexistent-dg-pins")),
            "/nonexistent-netns".into(),
        );
        assert_eq!(edge.net_raw_exposed(), None, "not counted yet");
        let one = vec![pod("a")];
        edge.sync(&one);
        edge.count_net_raw(&one, false);
        let exposed: Vec<_> = edge.net_raw_exposed().unwrap().to_vec();
        if holds {
            let want = super::super::net_raw::Exposed {
                uid: "a".into(),
                edge: "host_network",
            };
            assert_eq!(exposed, [want]);
        } else {
            assert!(exposed.is_empty());
        }
        assert_eq!(edge.sample().net_raw_uncovered, Some(exposed.len() as u64));
        // A new guarded pod is judged at once, not after the recount interval.
        let two = vec![pod("a"), pod("b")];
        edge.sync(&two);
        edge.count_net_raw(&two, false);
        let n = if holds { 2 } else { 0 };
        assert_eq!(edge.net_raw_exposed().unwrap().len(), n);
        // The BPF LSM turned on closes raw paths for every pod: recounted at once.
        edge.count_net_raw(&two, true);
        assert_eq!(edge.net_raw_exposed(), Some(&[][..]));
    }

    fn failures(edge: &NodeEdge, reason: &str) -> u64 {
        let sample = edge.sample();
        let found = sample.failures.iter().find(|(r, _)| *r == reason);
        found.map_or(0, |(_, n)| *n)
    }

    #[test]
    fn retries_start_after_a_second_and_back_off_to_the_cap() {
        let secs: Vec<u64> = (1..=8).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 30, 30, 30]);
        assert_eq!(retry_delay(u32::MAX), RETRY_EVERY);
    }

    #[test]
    fn a_pod_whose_namespace_is_unknown_is_retried_on_its_own_schedule() {
        let pod = GuardedPod {
            uid: "p".into(),
            cgroup_id: 1,
            class: 0,
            dir: None,
            ip: None,
            host_network: false,
        };
        let mut edge = NodeEdge::new(
            PinLayout::new(std::path::Path::new("/nonexistent-dg-pins")),
            "/nonexistent-netns".into(),
        );
        let before = Instant::now();
        edge.sync(std::slice::from_ref(&pod));
        let next = edge.next_retry().expect("a retry is scheduled");
        assert!(next >= before + FIRST_RETRY && next <= Instant::now() + FIRST_RETRY);
        assert!(!edge.retry_due(), "nothing is due before the delay");
        assert_eq!(failures(&edge, "netns_unknown"), 1);
        std::thread::sleep(FIRST_RETRY);
        assert!(edge.retry_due());
        assert_eq!(failures(&edge, "netns_unknown"), 2);
        // The second failure doubles the wait.
        let next = edge.next_retry().unwrap();
        assert!(next >= Instant::now() + FIRST_RETRY, "backed off");
        // A hostNetwork pod is never retried.
        let host = GuardedPod {
            uid: "h".into(),
            host_network: true,
            ..pod.clone()
        };
        let mut edge = NodeEdge::new(
            PinLayout::new(std::path::Path::new("/nonexistent-dg-pins")),
            "/nonexistent-netns".into(),
        );
        edge.sync(&[host]);
        assert_eq!(edge.next_retry(), None);
    }

    #[test]
    fn every_reason_has_a_distinct_label() {
        let mut labels: Vec<&str> = Uncovered::ALL.iter().map(|r| r.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Uncovered::ALL.len());
    }
}
