//! Where the kubelet puts a pod's cgroup, and what a directory under the pods' root is.
//!
//! This module owns the *naming*: the pods' root (`kubepods.slice`, `kubepods`, or a kind-style
//! `kubelet.slice/kubelet-kubepods.slice`), the QoS directories below it, each pod's directory
//! (from its UID and QoS class) and the container runtime's directories inside a pod. Naming is
//! pure; only [`detect_pods_root`] and [`scan_pods`] read the filesystem. Filesystem facts
//! (the cgroup2 mount, ids, levels) come from [`crate::cgroups`].
//!
//! # The kubelet's naming
//! The kubelet builds an abstract name, a list of components, then converts it for its cgroup
//! driver (`pkg/kubelet/cm/cgroup_manager_linux.go`,
//! <https://github.com/kubernetes/kubernetes/blob/master/pkg/kubelet/cm/cgroup_manager_linux.go>):
//! - the root is `--cgroup-root` plus `kubepods` (`defaultNodeAllocatableCgroupName`,
//!   `node_container_manager_linux.go`); the QoS level adds `burstable` or `besteffort`
//!   (guaranteed pods sit directly in the root, `qos_container_manager_linux.go`); the pod adds
//!   `"pod" + pod.UID` (`PodCgroupNamePrefix`, `pod_container_manager_linux.go`);
//! - `cgroupfs` driver: `ToCgroupfs()` is `"/" + path.Join(components...)`, e.g.
//!   `/kubepods/burstable/pod1234-abcd`;
//! - `systemd` driver: `ToSystemd()` escapes each component with
//!   `escapeSystemdCgroupName(part) = strings.Replace(part, "-", "_", -1)` ("systemd treats - as
//!   a step in the hierarchy"), joins them with `-`, adds `.slice` and expands the slice into
//!   its parents (`cgroupsystemd.ExpandSlice`). Quoting the kubelet: *"the name {"kubepods",
//!   "burstable", "pod1234-abcd-5678-efgh"} becomes
//!   "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd_5678_efgh.slice"*.
//!   `NewCgroupName` refuses `_` in components, so the escaping is reversible.
//!
//! With `--cgroup-root=/kubelet` (kind) the components start with `kubelet`, so every systemd
//! name starts with `kubelet-kubepods` instead of `kubepods`: [`pod_cgroup_dir`] takes the
//! prefix from the root directory's own name, which covers both.
//!
//! # Container runtimes
//! Inside a pod directory each container (the pause/sandbox container included) gets its own
//! directory, named by the runtime: containerd `cri-containerd-<id>.scope`, CRI-O
//! `crio-<id>.scope` plus `crio-conmon-<id>.scope` for its monitor process, Docker through
//! cri-dockerd `docker-<id>.scope` (systemd driver); with the cgroupfs driver containerd and
//! Docker use the bare 64-hex id, CRI-O `crio-<id>` / `crio-conmon-<id>`.
//!
//! # Static pods
//! A static pod's cgroup is named after the kubelet's internal UID (its config hash), not the
//! UID of its mirror pod in the API; the mirror pod carries that hash in the
//! [`MIRROR_POD_ANNOTATION`] annotation: see [`cgroup_pod_uid`].

use std::{
    collections::VecDeque,
    fmt, fs, io,
    os::unix::fs::DirEntryExt as _,
    path::{Path, PathBuf},
    str::FromStr,
};

use crate::cgroups::{self, CgroupDir, CgroupError};

/// How deep below the cgroup2 mount [`detect_pods_root`] looks (`/system.slice/x/y/kubepods`).
pub const MAX_ROOT_SEARCH_DEPTH: usize = 4;
/// Where the DaemonSet mounts the host's cgroup v2 hierarchy in the agent's container. The
/// container's own `/sys/fs/cgroup` is its private cgroup namespace (containerd and CRI-O on
/// cgroup v2), which shows only the agent's own cgroup and never the pods' root.
pub const HOST_CGROUP_MOUNT: &str = "/host/sys/fs/cgroup";
/// How many directories [`detect_pods_root`] visits at most.
pub const MAX_ROOT_SEARCH_DIRS: usize = 20_000;
/// How many directories one [`scan_pods`] lists at most (pods, QoS dirs and containers).
pub const MAX_SCAN_DIRS: usize = 200_000;
/// Annotation on a mirror pod whose value is the static pod's internal UID (config hash),
/// which is what the kubelet names the cgroup after (`kubetypes.ConfigMirrorAnnotationKey`).
pub const MIRROR_POD_ANNOTATION: &str = "kubernetes.io/config.mirror";

const SLICE: &str = ".slice";
const SCOPE: &str = ".scope";
const POD_PREFIX: &str = "pod";
const NODE_ALLOCATABLE: &str = "kubepods";

#[derive(Debug, thiserror::Error)]
pub enum PodCgroupError {
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error(
        "no kubelet pods root (kubepods, kubepods.slice or *-kubepods.slice) within {depth} levels \
         of {}; pass --cgroup-root (in a container: mount the host's /sys/fs/cgroup at {HOST_CGROUP_MOUNT})",
        alternatives(.mounts)
    )]
    NoPodsRoot { mounts: Vec<PathBuf>, depth: usize },
    #[error("more than one kubelet pods root under {mount} ({}); pass --cgroup-root", list(.candidates))]
    AmbiguousPodsRoot {
        mount: PathBuf,
        candidates: Vec<PathBuf>,
    },
    #[error("cannot list {path}: {source}")]
    List { path: PathBuf, source: io::Error },
}

fn alternatives(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" or ")
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A pod's Kubernetes QoS class (`status.qosClass`), which decides its cgroup's parent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    pub const ALL: [QosClass; 3] = [
        QosClass::Guaranteed,
        QosClass::Burstable,
        QosClass::BestEffort,
    ];

    /// The Kubernetes spelling (`status.qosClass`).
    pub fn as_str(self) -> &'static str {
        match self {
            QosClass::Guaranteed => "Guaranteed",
            QosClass::Burstable => "Burstable",
            QosClass::BestEffort => "BestEffort",
        }
    }

    /// The kubelet's component for this class (`strings.ToLower(qosClass)`); guaranteed pods
    /// have none, they sit in the root.
    fn component(self) -> Option<&'static str> {
        match self {
            QosClass::Guaranteed => None,
            QosClass::Burstable => Some("burstable"),
            QosClass::BestEffort => Some("besteffort"),
        }
    }

    fn from_component(component: &str) -> Option<Self> {
        match component {
            "burstable" => Some(QosClass::Burstable),
            "besteffort" => Some(QosClass::BestEffort),
            _ => None,
        }
    }
}

impl fmt::Display for QosClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown QoS class {0:?} (expected Guaranteed, Burstable or BestEffort)")]
pub struct UnknownQosClass(pub String);

impl FromStr for QosClass {
    type Err = UnknownQosClass;

    /// Parses `status.qosClass` exactly as the API spells it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QosClass::ALL
            .into_iter()
            .find(|q| q.as_str() == s)
            .ok_or_else(|| UnknownQosClass(s.to_owned()))
    }
}

/// The kubelet's `--cgroup-driver`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

impl CgroupDriver {
    /// The driver that names a pods root like `name`: `*.slice` is systemd, `kubepods` is
    /// cgroupfs; anything else is not a kubelet root name.
    pub fn from_root_name(name: &str) -> Option<Self> {
        if is_systemd_root_name(name) {
            Some(CgroupDriver::Systemd)
        } else if name == NODE_ALLOCATABLE {
            Some(CgroupDriver::Cgroupfs)
        } else {
            None
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CgroupDriver::Systemd => "systemd",
            CgroupDriver::Cgroupfs => "cgroupfs",
        }
    }
}

impl fmt::Display for CgroupDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CgroupDriver {
    type Err = String;

    /// Parses the kubelet's spelling (`systemd`, `cgroupfs`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "systemd" => Ok(CgroupDriver::Systemd),
            "cgroupfs" => Ok(CgroupDriver::Cgroupfs),
            other => Err(format!(
                "unknown cgroup driver {other:?} (expected systemd or cgroupfs)"
            )),
        }
    }
}

/// The driver of a pods root, from its directory name (see [`CgroupDriver::from_root_name`]).
pub fn detect_driver(root: &Path) -> Option<CgroupDriver> {
    CgroupDriver::from_root_name(root.file_name()?.to_str()?)
}

/// The container runtime that named a container's cgroup directory or status id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Runtime {
    Containerd,
    CriO,
    Docker,
    /// A bare id (cgroupfs driver: containerd and Docker look the same) or an unknown scheme.
    Unknown,
}

/// What a directory inside a pod's cgroup holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ContainerDirKind {
    /// A container (including the pod's sandbox/pause container).
    Container,
    /// The runtime's per-container monitor (CRI-O's conmon), not workload code.
    RuntimeMonitor,
}

/// A container directory name taken apart by [`parse_container_dir_name`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerDirName {
    pub runtime: Runtime,
    /// The runtime's container id (64 lowercase hex digits).
    pub id: String,
    pub kind: ContainerDirKind,
}

/// `kubepods.slice` or `<anything>-kubepods.slice`.
fn is_systemd_root_name(name: &str) -> bool {
    name.strip_suffix(SLICE)
        .is_some_and(|stem| stem == NODE_ALLOCATABLE || stem.ends_with("-kubepods"))
}

fn is_pods_root_name(name: &str) -> bool {
    name == NODE_ALLOCATABLE || is_systemd_root_name(name)
}

/// Finds the kubelet's pods root under the cgroup2 mount: a directory named `kubepods`
/// (cgroupfs), `kubepods.slice` or `*-kubepods.slice` (systemd), directly under the mount or
/// nested (kind's `kubelet.slice/kubelet-kubepods.slice`, `/kubelet/kubepods`, a kubelet in
/// `system.slice/...`). Breadth first, at most [`MAX_ROOT_SEARCH_DEPTH`] levels and
/// [`MAX_ROOT_SEARCH_DIRS`] directories; a match is not searched further. Zero or several
/// matches are an error: the operator then names the root with `--cgroup-root`.
pub fn detect_pods_root(cgroup2_mount: &Path) -> Result<PathBuf, PodCgroupError> {
    let mut candidates = Vec::new();
    let mut visited = 0usize;
    let mut queue = VecDeque::from([(cgroup2_mount.to_path_buf(), 0usize)]);
    'walk: while let Some((dir, depth)) = queue.pop_front() {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            // The mount itself must be readable; below it, cgroups come and go.
            Err(source) if depth == 0 => {
                return Err(PodCgroupError::List { path: dir, source });
            }
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            visited += 1;
            if visited > MAX_ROOT_SEARCH_DIRS {
                tracing::warn!(
                    mount = %cgroup2_mount.display(),
                    limit = MAX_ROOT_SEARCH_DIRS,
                    "pods root search stopped at its directory limit"
                );
                break 'walk;
            }
            let path = entry.path();
            if entry.file_name().to_str().is_some_and(is_pods_root_name) {
                candidates.push(path);
            } else if depth + 1 < MAX_ROOT_SEARCH_DEPTH {
                queue.push_back((path, depth + 1));
            }
        }
    }
    candidates.sort();
    match candidates.len() {
        0 => Err(PodCgroupError::NoPodsRoot {
            mounts: vec![cgroup2_mount.to_path_buf()],
            depth: MAX_ROOT_SEARCH_DEPTH,
        }),
        1 => Ok(candidates.remove(0)),
        _ => Err(PodCgroupError::AmbiguousPodsRoot {
            mount: cgroup2_mount.to_path_buf(),
            candidates,
        }),
    }
}

/// [`detect_pods_root`] over several views of the hierarchy, in order (the host's mount in
/// the agent's container first, then its own): the first that holds exactly one pods root
/// wins. Several roots in one view is an error at once (the operator must choose); none in
/// every view is [`PodCgroupError::NoPodsRoot`] naming them all.
///
/// The layouts this finds (each a unit test): systemd `kubepods.slice` (EKS, GKE, AKS and
/// most kubeadm nodes), cgroupfs `kubepods` (k3s and RKE2 without systemd, this project's
/// CRI lab), kind's `kubelet.slice/kubelet-kubepods.slice` (`--cgroup-root=/kubelet`), and a
/// kubelet nested in a container's cgroup (k3d: `…/docker-<id>.scope/kubepods`).
pub fn detect_pods_root_in(mounts: &[PathBuf]) -> Result<PathBuf, PodCgroupError> {
    let mut searched = Vec::new();
    for mount in mounts {
        match detect_pods_root(mount) {
            Ok(root) => return Ok(root),
            Err(PodCgroupError::NoPodsRoot { .. }) => searched.push(mount.clone()),
            Err(other) => return Err(other),
        }
    }
    Err(PodCgroupError::NoPodsRoot {
        mounts: searched,
        depth: MAX_ROOT_SEARCH_DEPTH,
    })
}

/// The systemd name prefix of a root: its slice name without `.slice` (`kubepods`,
/// `kubelet-kubepods`).
fn systemd_prefix(root: &Path) -> String {
    let name = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match name.strip_suffix(SLICE) {
        Some(stem) => stem.to_owned(),
        None => name,
    }
}

/// The directory holding pods of class `qos`: the root itself for guaranteed pods, else
/// `<prefix>-burstable.slice` / `burstable` (and besteffort likewise) inside it.
pub fn qos_cgroup_dir(root: &Path, driver: CgroupDriver, qos: QosClass) -> PathBuf {
    match (qos.component(), driver) {
        (None, _) => root.to_path_buf(),
        (Some(c), CgroupDriver::Cgroupfs) => root.join(c),
        (Some(c), CgroupDriver::Systemd) => {
            root.join(format!("{}-{c}{SLICE}", systemd_prefix(root)))
        }
    }
}

/// Is `name` (a directory directly in `root`) the burstable or besteffort directory?
pub fn parse_qos_dir_name(root: &Path, driver: CgroupDriver, name: &str) -> Option<QosClass> {
    [QosClass::Burstable, QosClass::BestEffort]
        .into_iter()
        .find(|q| qos_cgroup_dir(root, driver, *q).file_name() == Some(name.as_ref()))
}

/// The kubelet's escaping of one component for systemd: `-` separates slice levels, so it
/// becomes `_`.
pub fn escape_systemd_component(part: &str) -> String {
    part.replace('-', "_")
}

/// Could `uid` be a pod UID as the kubelet names cgroups after it? API UIDs are lowercase
/// UUIDs and static pods' are 32-hex config hashes; this accepts any 1–128 ASCII letters,
/// digits and `-` (the kubelet forbids `_` and `/`, which the naming could not reverse).
pub fn is_valid_uid(uid: &str) -> bool {
    !uid.is_empty()
        && uid.len() <= 128
        && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// The cgroup directory the kubelet creates for the pod `uid` of class `qos` under `root`:
/// - systemd: `<prefix>-pod<uid_>.slice` (guaranteed) or
///   `<prefix>-burstable.slice/<prefix>-burstable-pod<uid_>.slice` (besteffort likewise),
///   where `<prefix>` is the root's slice name without `.slice` and `uid_` has `-` → `_`;
/// - cgroupfs: `pod<uid>`, `burstable/pod<uid>`, `besteffort/pod<uid>`.
///
/// `uid` should satisfy [`is_valid_uid`]; other strings give a path the kubelet never makes.
pub fn pod_cgroup_dir(root: &Path, driver: CgroupDriver, qos: QosClass, uid: &str) -> PathBuf {
    let parent = qos_cgroup_dir(root, driver, qos);
    match driver {
        CgroupDriver::Cgroupfs => parent.join(format!("{POD_PREFIX}{uid}")),
        CgroupDriver::Systemd => {
            let mut name = systemd_prefix(root);
            if let Some(c) = qos.component() {
                name.push('-');
                name.push_str(c);
            }
            name.push('-');
            name.push_str(POD_PREFIX);
            name.push_str(&escape_systemd_component(uid));
            name.push_str(SLICE);
            parent.join(name)
        }
    }
}

/// Takes a pod directory's name apart, for either driver:
/// - systemd `…kubepods[-burstable|-besteffort]-pod<uid_>.slice` gives the class (guaranteed
///   when there is no QoS component) and the UID with `_` → `-`;
/// - cgroupfs `pod<uid>` gives `None` for the class (it is the parent directory's) and the UID.
///
/// Anything else (QoS directories, container scopes, other slices) is `None`.
pub fn parse_pod_dir_name(name: &str) -> Option<(Option<QosClass>, String)> {
    if let Some(stem) = name.strip_suffix(SLICE) {
        // Components: [..., "kubepods", ("burstable"|"besteffort")?, "pod<uid_>"].
        let mut parts = stem.rsplit('-');
        let escaped_uid = parts.next()?.strip_prefix(POD_PREFIX)?;
        if escaped_uid.contains('-') || !is_valid_uid(&escaped_uid.replace('_', "-")) {
            return None;
        }
        let uid = escaped_uid.replace('_', "-");
        let qos = match parts.next()? {
            NODE_ALLOCATABLE => QosClass::Guaranteed,
            other => {
                let qos = QosClass::from_component(other)?;
                if parts.next()? != NODE_ALLOCATABLE {
                    return None;
                }
                qos
            }
        };
        return Some((Some(qos), uid));
    }
    let uid = name.strip_prefix(POD_PREFIX)?;
    is_valid_uid(uid).then(|| (None, uid.to_owned()))
}

/// A container id as runtimes write it: 64 lowercase hex digits.
fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Takes a container directory's name (a directory inside a pod's cgroup) apart:
/// `cri-containerd-<id>.scope`, `crio-<id>[.scope]`, `crio-conmon-<id>[.scope]` (the monitor,
/// [`ContainerDirKind::RuntimeMonitor`]), `docker-<id>.scope`, or a bare id (cgroupfs driver,
/// [`Runtime::Unknown`]). Anything else is `None`.
pub fn parse_container_dir_name(name: &str) -> Option<ContainerDirName> {
    use ContainerDirKind::{Container, RuntimeMonitor};
    if is_container_id(name) {
        return Some(ContainerDirName {
            runtime: Runtime::Unknown,
            id: name.to_owned(),
            kind: Container,
        });
    }
    let scoped = name.strip_suffix(SCOPE);
    let stem = scoped.unwrap_or(name);
    // Most specific first: "crio-conmon-" also starts with "crio-".
    let patterns: [(&str, Runtime, ContainerDirKind, bool); 4] = [
        ("cri-containerd-", Runtime::Containerd, Container, true),
        ("crio-conmon-", Runtime::CriO, RuntimeMonitor, false),
        ("crio-", Runtime::CriO, Container, false),
        ("docker-", Runtime::Docker, Container, true),
    ];
    patterns
        .into_iter()
        .find_map(|(prefix, runtime, kind, needs_scope)| {
            let id = stem.strip_prefix(prefix)?;
            (is_container_id(id) && (scoped.is_some() || !needs_scope)).then(|| ContainerDirName {
                runtime,
                id: id.to_owned(),
                kind,
            })
        })
}

/// Splits a `status.containerStatuses[].containerID` (`containerd://<id>`, `cri-o://<id>`,
/// `docker://<id>`) into runtime and id. Other schemes give [`Runtime::Unknown`]; a string
/// without `://` or with an empty id is `None`.
pub fn container_id_from_status(status_id: &str) -> Option<(Runtime, &str)> {
    let (scheme, id) = status_id.split_once("://")?;
    if id.is_empty() {
        return None;
    }
    let runtime = match scheme {
        "containerd" => Runtime::Containerd,
        "cri-o" => Runtime::CriO,
        "docker" => Runtime::Docker,
        _ => Runtime::Unknown,
    };
    Some((runtime, id))
}

/// The UID the kubelet named a pod's cgroup after: the API UID, except for a mirror pod
/// (the API's view of a static pod), whose cgroup is named after the static pod's own UID,
/// the value of its [`MIRROR_POD_ANNOTATION`] annotation.
pub fn cgroup_pod_uid<'a>(api_uid: &'a str, mirror_annotation: Option<&'a str>) -> &'a str {
    mirror_annotation
        .filter(|hash| is_valid_uid(hash))
        .unwrap_or(api_uid)
}

/// A container directory found in a pod's cgroup by [`scan_pods`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredContainer {
    pub id: String,
    pub runtime: Runtime,
    pub kind: ContainerDirKind,
    pub dir: CgroupDir,
}

/// A pod directory found under the pods root by [`scan_pods`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiscoveredPod {
    /// The UID the directory is named after (see [`cgroup_pod_uid`] for static pods).
    pub uid: String,
    /// From where the directory sits (root, burstable or besteffort directory).
    pub qos: QosClass,
    pub dir: CgroupDir,
    /// Recognised container directories, sorted by path; unrecognised ones are left out.
    pub containers: Vec<DiscoveredContainer>,
}

/// Directories directly in `parent`, as `(name, CgroupDir)`, sorted by name. The id comes from
/// readdir (on cgroup2 `d_ino` is the cgroup id, as [`cgroups::find_by_id`] relies on too) and
/// the level from the parent, so no directory costs a stat or a mountinfo read. Names that
/// are not UTF-8 are skipped (the kubelet and runtimes write ASCII); a vanished parent is
/// empty. Each directory spends one unit of `budget`.
fn child_dirs(parent: &CgroupDir, budget: &mut usize) -> io::Result<Vec<(String, CgroupDir)>> {
    let entries = match fs::read_dir(&parent.path) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if *budget == 0 {
            break;
        }
        *budget -= 1;
        let dir = CgroupDir {
            path: parent.path.join(&name),
            id: entry.ino(),
            level: parent.level + 1,
        };
        out.push((name, dir));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Lists the pods (and their containers) under the pods root `root`: pod directories directly
/// in the root (guaranteed) and in its burstable and besteffort directories, each checked to
/// be exactly the name the kubelet would give (so a foreign `kubepods-x-pod1.slice` or
/// a directory of another root prefix is not taken for a pod). At most [`MAX_SCAN_DIRS`]
/// directories are listed (a warning says when the limit cut the scan short). Pods and
/// containers are sorted by path. Directories that vanish during the scan are left out.
pub fn scan_pods(root: &Path, driver: CgroupDriver) -> Result<Vec<DiscoveredPod>, PodCgroupError> {
    let root_dir = cgroups::validate_cgroup_dir(root)?;
    let mut budget = MAX_SCAN_DIRS;
    let listed = |budget: &mut usize, dir: &CgroupDir| {
        child_dirs(dir, budget).unwrap_or_else(|e| {
            tracing::debug!(dir = %dir.path.display(), error = %e, "cannot list cgroup");
            Vec::new()
        })
    };
    let top = child_dirs(&root_dir, &mut budget).map_err(|source| PodCgroupError::List {
        path: root_dir.path.clone(),
        source,
    })?;
    let mut pods = Vec::new();
    let mut in_qos_dirs = Vec::new();
    for (name, dir) in top {
        if let Some(qos) = parse_qos_dir_name(&root_dir.path, driver, &name) {
            in_qos_dirs.push((qos, dir));
        } else {
            pods.extend(pod_from(
                &root_dir.path,
                driver,
                QosClass::Guaranteed,
                &name,
                dir,
            ));
        }
    }
    for (qos, qos_dir) in in_qos_dirs {
        for (name, dir) in listed(&mut budget, &qos_dir) {
            pods.extend(pod_from(&root_dir.path, driver, qos, &name, dir));
        }
    }
    for pod in &mut pods {
        pod.containers = listed(&mut budget, &pod.dir)
            .into_iter()
            .filter_map(|(name, dir)| {
                let parsed = parse_container_dir_name(&name)?;
                Some(DiscoveredContainer {
                    id: parsed.id,
                    runtime: parsed.runtime,
                    kind: parsed.kind,
                    dir,
                })
            })
            .collect();
    }
    if budget == 0 {
        tracing::warn!(
            root = %root_dir.path.display(),
            limit = MAX_SCAN_DIRS,
            "pod cgroup scan stopped at its directory limit; some pods are missing from it"
        );
    }
    pods.sort_by(|a, b| a.dir.path.cmp(&b.dir.path));
    Ok(pods)
}

/// The pod in directory `name` at the place of class `qos`, if the name is exactly what the
/// kubelet would give that pod there.
fn pod_from(
    root: &Path,
    driver: CgroupDriver,
    qos: QosClass,
    name: &str,
    dir: CgroupDir,
) -> Option<DiscoveredPod> {
    let (_, uid) = parse_pod_dir_name(name)?;
    let expected = pod_cgroup_dir(root, driver, qos, &uid);
    (expected.file_name() == Some(name.as_ref())).then(|| DiscoveredPod {
        uid,
        qos,
        dir,
        containers: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "1b4e28ba-2fa1-11d2-883f-0016d3cca427";
    const UID_: &str = "1b4e28ba_2fa1_11d2_883f_0016d3cca427";
    const CID: &str = "3f4a5b6c7d8e9f00112233445566778899aabbccddeeff00112233445566778a";

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn qos_class_parses_the_api_spelling_only() {
        assert_eq!("Guaranteed".parse(), Ok(QosClass::Guaranteed));
        assert_eq!("Burstable".parse(), Ok(QosClass::Burstable));
        assert_eq!("BestEffort".parse(), Ok(QosClass::BestEffort));
        for bad in ["", "besteffort", "Besteffort", "guaranteed ", "Unknown"] {
            assert!(bad.parse::<QosClass>().is_err(), "{bad:?}");
        }
        for q in QosClass::ALL {
            assert_eq!(q.to_string().parse(), Ok(q));
        }
        assert_eq!(
            "x".parse::<QosClass>().unwrap_err().to_string(),
            "unknown QoS class \"x\" (expected Guaranteed, Burstable or BestEffort)"
        );
    }

    #[test]
    fn driver_from_root_name_and_flag() {
        use CgroupDriver::*;
        assert_eq!(
            CgroupDriver::from_root_name("kubepods.slice"),
            Some(Systemd)
        );
        assert_eq!(
            CgroupDriver::from_root_name("kubelet-kubepods.slice"),
            Some(Systemd)
        );
        assert_eq!(CgroupDriver::from_root_name("kubepods"), Some(Cgroupfs));
        for other in [
            "kubepods-burstable.slice",
            "system.slice",
            "kubelet",
            "xkubepods.slice",
            "kubepods.scope",
            ".slice",
        ] {
            assert_eq!(CgroupDriver::from_root_name(other), None, "{other}");
        }
        assert_eq!(
            detect_driver(&p("/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice")),
            Some(Systemd)
        );
        assert_eq!(
            detect_driver(&p("/sys/fs/cgroup/kubelet/kubepods")),
            Some(Cgroupfs)
        );
        assert_eq!(detect_driver(&p("/")), None);
        assert_eq!("systemd".parse(), Ok(Systemd));
        assert_eq!("cgroupfs".parse(), Ok(Cgroupfs));
        assert!("Systemd".parse::<CgroupDriver>().is_err());
    }

    #[test]
    fn systemd_names_match_the_kubelet() {
        let root = p("/sys/fs/cgroup/kubepods.slice");
        let d = CgroupDriver::Systemd;
        // The kubelet's own example, ToSystemd() of {"kubepods","burstable","pod1234-abcd-5678-efgh"}.
        assert_eq!(
            pod_cgroup_dir(&root, d, QosClass::Burstable, "1234-abcd-5678-efgh"),
            p("/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234_abcd_5678_efgh.slice")
        );
        assert_eq!(
            pod_cgroup_dir(&root, d, QosClass::Guaranteed, UID),
            p(&format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-pod{UID_}.slice"
            ))
        );
        assert_eq!(
            pod_cgroup_dir(&root, d, QosClass::BestEffort, UID),
            p(&format!(
                "/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
            ))
        );
        assert_eq!(qos_cgroup_dir(&root, d, QosClass::Guaranteed), root);
    }

    #[test]
    fn kind_prefix_comes_from_the_root_name() {
        // kind: --cgroup-root=/kubelet, systemd driver.
        let root = p("/sys/fs/cgroup/kubelet.slice/kubelet-kubepods.slice");
        let d = CgroupDriver::Systemd;
        assert_eq!(
            pod_cgroup_dir(&root, d, QosClass::Burstable, UID),
            root.join("kubelet-kubepods-burstable.slice")
                .join(format!("kubelet-kubepods-burstable-pod{UID_}.slice"))
        );
        assert_eq!(
            pod_cgroup_dir(&root, d, QosClass::Guaranteed, UID),
            root.join(format!("kubelet-kubepods-pod{UID_}.slice"))
        );
        assert_eq!(
            pod_cgroup_dir(&root, d, QosClass::BestEffort, UID),
            root.join("kubelet-kubepods-besteffort.slice")
                .join(format!("kubelet-kubepods-besteffort-pod{UID_}.slice"))
        );
    }

    #[test]
    fn cgroupfs_names_match_the_kubelet() {
        let root = p("/sys/fs/cgroup/kubepods");
        let d = CgroupDriver::Cgroupfs;
        assert_eq!(
            pod_cgroup_dir(&root, d, QosClass::Guaranteed, UID),
            root.join(format!("pod{UID}"))
        );
        assert_eq!(
            pod_cgroup_dir(&root, d, QosClass::Burstable, UID),
            root.join(format!("burstable/pod{UID}"))
        );
        assert_eq!(
            pod_cgroup_dir(&root, d, QosClass::BestEffort, UID),
            root.join(format!("besteffort/pod{UID}"))
        );
        // Nested root (kind with cgroupfs): nothing changes below it.
        let nested = p("/sys/fs/cgroup/kubelet/kubepods");
        assert_eq!(
            pod_cgroup_dir(&nested, d, QosClass::BestEffort, UID),
            p(&format!(
                "/sys/fs/cgroup/kubelet/kubepods/besteffort/pod{UID}"
            ))
        );
    }

    #[test]
    fn qos_dir_names() {
        let sd = p("/x/kubelet-kubepods.slice");
        assert_eq!(
            parse_qos_dir_name(
                &sd,
                CgroupDriver::Systemd,
                "kubelet-kubepods-burstable.slice"
            ),
            Some(QosClass::Burstable)
        );
        assert_eq!(
            parse_qos_dir_name(
                &sd,
                CgroupDriver::Systemd,
                "kubelet-kubepods-besteffort.slice"
            ),
            Some(QosClass::BestEffort)
        );
        // Another root's prefix is not ours.
        assert_eq!(
            parse_qos_dir_name(&sd, CgroupDriver::Systemd, "kubepods-burstable.slice"),
            None
        );
        let fs = p("/x/kubepods");
        assert_eq!(
            parse_qos_dir_name(&fs, CgroupDriver::Cgroupfs, "burstable"),
            Some(QosClass::Burstable)
        );
        assert_eq!(
            parse_qos_dir_name(&fs, CgroupDriver::Cgroupfs, "besteffort"),
            Some(QosClass::BestEffort)
        );
        assert_eq!(
            parse_qos_dir_name(&fs, CgroupDriver::Cgroupfs, "guaranteed"),
            None
        );
        assert_eq!(
            parse_qos_dir_name(&fs, CgroupDriver::Cgroupfs, &format!("pod{UID}")),
            None
        );
    }

    #[test]
    fn uid_escaping_is_dashes_to_underscores() {
        assert_eq!(escape_systemd_component(UID), UID_);
        assert_eq!(escape_systemd_component("no-dash-left"), "no_dash_left");
        // A static pod's UID (config hash) has no dashes and is unchanged.
        assert_eq!(
            escape_systemd_component("6d9e3f3c1a0b4c4d8e7f6a5b4c3d2e1f"),
            "6d9e3f3c1a0b4c4d8e7f6a5b4c3d2e1f"
        );
    }

    #[test]
    fn parses_pod_dir_names_of_both_drivers() {
        use QosClass::*;
        let uid = UID.to_owned();
        assert_eq!(
            parse_pod_dir_name(&format!("kubepods-pod{UID_}.slice")),
            Some((Some(Guaranteed), uid.clone()))
        );
        assert_eq!(
            parse_pod_dir_name(&format!("kubepods-burstable-pod{UID_}.slice")),
            Some((Some(Burstable), uid.clone()))
        );
        assert_eq!(
            parse_pod_dir_name(&format!("kubepods-besteffort-pod{UID_}.slice")),
            Some((Some(BestEffort), uid.clone()))
        );
        assert_eq!(
            parse_pod_dir_name(&format!("kubelet-kubepods-besteffort-pod{UID_}.slice")),
            Some((Some(BestEffort), uid.clone()))
        );
        assert_eq!(
            parse_pod_dir_name(&format!("kubelet-kubepods-pod{UID_}.slice")),
            Some((Some(Guaranteed), uid.clone()))
        );
        assert_eq!(parse_pod_dir_name(&format!("pod{UID}")), Some((None, uid)));
        assert_eq!(
            parse_pod_dir_name("pod6d9e3f3c1a0b4c4d8e7f6a5b4c3d2e1f"),
            Some((None, "6d9e3f3c1a0b4c4d8e7f6a5b4c3d2e1f".to_owned()))
        );
    }

    #[test]
    fn rejects_what_is_not_a_pod_dir() {
        for name in [
            "kubepods.slice",
            "kubepods-burstable.slice",
            "kubepods-besteffort.slice",
            "burstable",
            "besteffort",
            "pod",
            "pod.slice",
            "kubepods-pod.slice",
            "pod123.slice",                      // no kubepods component
            "kubepods-guaranteed-pod123.slice",  // not a QoS component
            "kubepods-burstable-pod12-34.slice", // '-' inside the escaped uid is a level
            "kubepods-burstable-pod12_34.scope",
            "x-burstable-pod123.slice", // QoS not under kubepods
            "system.slice",
            "pod12_34", // cgroupfs names are not escaped
            "pod12/34",
            "pod12.34",
            &format!("cri-containerd-{CID}.scope"),
            CID,
        ] {
            assert_eq!(parse_pod_dir_name(name), None, "{name}");
        }
    }

    /// A small deterministic generator, enough to vary UIDs without a dependency.
    fn uids(n: usize) -> Vec<String> {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet = b"0123456789abcdef-ABCXYZxyz";
        (0..n)
            .map(|i| match i % 3 {
                // UUID shape.
                0 => {
                    let h = format!("{:016x}{:016x}", next(), next());
                    format!(
                        "{}-{}-{}-{}-{}",
                        &h[..8],
                        &h[8..12],
                        &h[12..16],
                        &h[16..20],
                        &h[20..32]
                    )
                }
                // Config-hash shape.
                1 => format!("{:016x}{:016x}", next(), next()),
                // Anything the alphabet allows, 1..=40 characters.
                _ => {
                    let len = 1 + (next() % 40) as usize;
                    (0..len)
                        .map(|_| alphabet[(next() % alphabet.len() as u64) as usize] as char)
                        .collect()
                }
            })
            .collect()
    }

    #[test]
    fn pod_dir_names_round_trip() {
        let roots = [
            (p("/sys/fs/cgroup/kubepods.slice"), CgroupDriver::Systemd),
            (
                p("/c/kubelet.slice/kubelet-kubepods.slice"),
                CgroupDriver::Systemd,
            ),
            (
                p("/c/system.slice/x.service/my_root-kubepods.slice"),
                CgroupDriver::Systemd,
            ),
            (p("/sys/fs/cgroup/kubepods"), CgroupDriver::Cgroupfs),
            (p("/c/kubelet/kubepods"), CgroupDriver::Cgroupfs),
        ];
        for uid in uids(300) {
            assert!(is_valid_uid(&uid), "{uid}");
            for (root, driver) in &roots {
                for qos in QosClass::ALL {
                    let dir = pod_cgroup_dir(root, *driver, qos, &uid);
                    let name = dir.file_name().unwrap().to_str().unwrap();
                    let expected_qos = (*driver == CgroupDriver::Systemd).then_some(qos);
                    assert_eq!(
                        parse_pod_dir_name(name),
                        Some((expected_qos, uid.clone())),
                        "{}",
                        dir.display()
                    );
                    // The parent is the QoS directory, which parses as such (or is the root).
                    let parent = dir.parent().unwrap();
                    assert_eq!(parent, qos_cgroup_dir(root, *driver, qos));
                    if qos != QosClass::Guaranteed {
                        let parent_name = parent.file_name().unwrap().to_str().unwrap();
                        assert_eq!(parse_qos_dir_name(root, *driver, parent_name), Some(qos));
                        assert_eq!(parent.parent().unwrap(), root);
                    }
                    // And the discovery check accepts exactly this name at this place.
                    let fake = CgroupDir {
                        path: dir.clone(),
                        id: 1,
                        level: 3,
                    };
                    let pod = pod_from(root, *driver, qos, name, fake).expect("accepted");
                    assert_eq!((pod.uid.as_str(), pod.qos), (uid.as_str(), qos));
                }
            }
        }
    }

    #[test]
    fn discovery_rejects_names_in_the_wrong_place() {
        let root = p("/c/kubepods.slice");
        let dir = CgroupDir {
            path: p("/c/x"),
            id: 1,
            level: 2,
        };
        let burstable_name = format!("kubepods-burstable-pod{UID_}.slice");
        // A burstable name directly in the root is not a guaranteed pod.
        assert!(pod_from(
            &root,
            CgroupDriver::Systemd,
            QosClass::Guaranteed,
            &burstable_name,
            dir.clone()
        )
        .is_none());
        // Another root's prefix.
        let kind = p("/c/kubelet-kubepods.slice");
        assert!(pod_from(
            &kind,
            CgroupDriver::Systemd,
            QosClass::Burstable,
            &burstable_name,
            dir.clone()
        )
        .is_none());
        // A systemd name under a cgroupfs root.
        assert!(pod_from(
            &p("/c/kubepods"),
            CgroupDriver::Cgroupfs,
            QosClass::Burstable,
            &burstable_name,
            dir
        )
        .is_none());
    }

    #[test]
    fn parses_container_dir_names() {
        use ContainerDirKind::*;
        let c = |runtime, kind| {
            Some(ContainerDirName {
                runtime,
                id: CID.to_owned(),
                kind,
            })
        };
        assert_eq!(
            parse_container_dir_name(&format!("cri-containerd-{CID}.scope")),
            c(Runtime::Containerd, Container)
        );
        assert_eq!(
            parse_container_dir_name(&format!("crio-{CID}.scope")),
            c(Runtime::CriO, Container)
        );
        assert_eq!(
            parse_container_dir_name(&format!("crio-conmon-{CID}.scope")),
            c(Runtime::CriO, RuntimeMonitor)
        );
        assert_eq!(
            parse_container_dir_name(&format!("crio-{CID}")),
            c(Runtime::CriO, Container)
        );
        assert_eq!(
            parse_container_dir_name(&format!("crio-conmon-{CID}")),
            c(Runtime::CriO, RuntimeMonitor)
        );
        assert_eq!(
            parse_container_dir_name(&format!("docker-{CID}.scope")),
            c(Runtime::Docker, Container)
        );
        assert_eq!(
            parse_container_dir_name(CID),
            c(Runtime::Unknown, Container)
        );
        for bad in [
            format!("cri-containerd-{CID}"), // containerd's systemd name always has .scope
            format!("docker-{CID}"),
            format!("cri-containerd-{}.scope", &CID[..63]),
            format!("crio-{}.scope", CID.to_uppercase()),
            format!("{CID}0"),
            format!("{CID}.scope"),
            format!("libpod-{CID}.scope"),
            format!("kubepods-pod{UID_}.slice"),
            "container".to_owned(),
            String::new(),
        ] {
            assert_eq!(parse_container_dir_name(&bad), None, "{bad}");
        }
    }

    #[test]
    fn container_ids_from_pod_status() {
        assert_eq!(
            container_id_from_status(&format!("containerd://{CID}")),
            Some((Runtime::Containerd, CID))
        );
        assert_eq!(
            container_id_from_status(&format!("cri-o://{CID}")),
            Some((Runtime::CriO, CID))
        );
        assert_eq!(
            container_id_from_status(&format!("docker://{CID}")),
            Some((Runtime::Docker, CID))
        );
        assert_eq!(
            container_id_from_status("kata://abc"),
            Some((Runtime::Unknown, "abc"))
        );
        assert_eq!(container_id_from_status("containerd://"), None);
        assert_eq!(container_id_from_status(CID), None);
        assert_eq!(container_id_from_status(""), None);
        // The status id and the directory name agree on the id.
        let status = format!("containerd://{CID}");
        let (_, id) = container_id_from_status(&status).unwrap();
        assert_eq!(
            parse_container_dir_name(&format!("cri-containerd-{id}.scope"))
                .unwrap()
                .id,
            id
        );
    }

    #[test]
    fn mirror_pods_use_the_static_pods_uid() {
        assert_eq!(cgroup_pod_uid(UID, None), UID);
        assert_eq!(
            cgroup_pod_uid(UID, Some("6d9e3f3c1a0b4c4d8e7f6a5b4c3d2e1f")),
            "6d9e3f3c1a0b4c4d8e7f6a5b4c3d2e1f"
        );
        // A malformed annotation does not send us to a directory the kubelet never makes.
        assert_eq!(cgroup_pod_uid(UID, Some("")), UID);
        assert_eq!(cgroup_pod_uid(UID, Some("a/b")), UID);
    }

    #[test]
    fn uid_validity() {
        assert!(is_valid_uid(UID));
        assert!(is_valid_uid("6d9e3f3c1a0b4c4d8e7f6a5b4c3d2e1f"));
        for bad in ["", "a_b", "a/b", "a.b", "a b", &"a".repeat(129)] {
            assert!(!is_valid_uid(bad), "{bad:?}");
        }
    }

    #[test]
    fn root_detection_errors_name_the_fix() {
        let none = PodCgroupError::NoPodsRoot {
            mounts: vec![p("/host/sys/fs/cgroup"), p("/sys/fs/cgroup")],
            depth: 4,
        };
        assert_eq!(
            none.to_string(),
            "no kubelet pods root (kubepods, kubepods.slice or *-kubepods.slice) within 4 levels of /host/sys/fs/cgroup or /sys/fs/cgroup; pass --cgroup-root (in a container: mount the host's /sys/fs/cgroup at /host/sys/fs/cgroup)"
        );
        let many = PodCgroupError::AmbiguousPodsRoot {
            mount: p("/m"),
            candidates: vec![p("/m/kubepods"), p("/m/kubepods.slice")],
        };
        assert_eq!(
            many.to_string(),
            "more than one kubelet pods root under /m (/m/kubepods, /m/kubepods.slice); pass --cgroup-root"
        );
    }

    #[test]
    fn root_names() {
        for yes in [
            "kubepods",
            "kubepods.slice",
            "kubelet-kubepods.slice",
            "a-b-kubepods.slice",
        ] {
            assert!(is_pods_root_name(yes), "{yes}");
        }
        for no in [
            "kubepods-burstable.slice",
            "kubepods-besteffort.slice",
            "burstable",
            "kubepodsx",
            "xkubepods.slice",
            "kubepods.scope",
        ] {
            assert!(!is_pods_root_name(no), "{no}");
        }
    }

    /// A fake hierarchy under a fresh temporary directory: `dirs` relative to it.
    fn fake_tree(name: &str, dirs: &[&str]) -> PathBuf {
        let base = std::env::temp_dir().join(format!("dg-pods-root-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        for d in dirs {
            fs::create_dir_all(base.join(d)).unwrap();
        }
        fs::create_dir_all(&base).unwrap();
        base
    }

    /// Each platform's layout, seen through the host's mount in the agent's container,
    /// with the container's own cgroup namespace (no pods root) as the second view.
    #[test]
    fn pods_root_is_found_on_the_host_mount_for_every_layout() {
        let own = fake_tree("own", &["init.scope"]);
        for (platform, dirs, root) in [
            (
                "systemd (EKS, GKE, AKS)",
                &[
                    "system.slice/containerd.service",
                    "kubepods.slice/kubepods-burstable.slice",
                ][..],
                "kubepods.slice",
            ),
            (
                "cgroupfs (k3s, RKE2)",
                &["kubepods/burstable", "k3s", "init.scope"],
                "kubepods",
            ),
            (
                "kind",
                &[
                    "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice",
                    "system.slice",
                ],
                "kubelet.slice/kubelet-kubepods.slice",
            ),
            (
                "k3d (kubelet nested in a container's cgroup)",
                &["system.slice/docker-0123abcd.scope/kubepods/besteffort"],
                "system.slice/docker-0123abcd.scope/kubepods",
            ),
        ] {
            let host = fake_tree(&platform[..4], dirs);
            assert_eq!(
                detect_pods_root_in(&[host.clone(), own.clone()]).unwrap(),
                host.join(root),
                "{platform}"
            );
            fs::remove_dir_all(host).unwrap();
        }
        // Without the host's mount, the container's own view has no pods root: the error
        // names every view searched and the fix.
        let err = detect_pods_root_in(std::slice::from_ref(&own))
            .unwrap_err()
            .to_string();
        assert!(err.contains(&own.display().to_string()), "{err}");
        assert!(err.contains("/host/sys/fs/cgroup"), "{err}");
        fs::remove_dir_all(own).unwrap();
    }

    #[test]
    fn a_later_view_is_used_only_when_the_earlier_has_no_pods_root() {
        let empty = fake_tree("empty", &["init.scope"]);
        let host = fake_tree("host", &["kubepods.slice"]);
        let other = fake_tree("other", &["kubepods"]);
        assert_eq!(
            detect_pods_root_in(&[empty.clone(), host.clone()]).unwrap(),
            host.join("kubepods.slice")
        );
        assert_eq!(
            detect_pods_root_in(&[host.clone(), other.clone()]).unwrap(),
            host.join("kubepods.slice"),
            "the first view that has one wins"
        );
        let both = fake_tree("both", &["kubepods", "kubepods.slice"]);
        assert!(matches!(
            detect_pods_root_in(&[both.clone(), host.clone()]),
            Err(PodCgroupError::AmbiguousPodsRoot { .. })
        ));
        for d in [empty, host, other, both] {
            fs::remove_dir_all(d).unwrap();
        }
    }
}
