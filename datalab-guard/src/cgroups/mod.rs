//! cgroup v2 filesystem facts: where the unified hierarchy is mounted, what a cgroup
//! directory's id (inode) and level (depth) are, and where this process lives. Below it,
//! [`pod`] knows how the kubelet names pod and container cgroups, and [`watch`] follows
//! them appearing and going.
//!
//! The mount is never assumed: a Kubernetes node usually has pure v2 at `/sys/fs/cgroup`,
//! a hybrid host has it at `/sys/fs/cgroup/unified`, so it is read from
//! `/proc/self/mountinfo`.
//!
//! Levels are counted from the hierarchy root, which is what `bpf_skb_ancestor_cgroup_id`
//! and `bpf_get_current_ancestor_cgroup_id` index by. That holds when the agent runs in the
//! host's cgroup namespace (a private cgroup namespace shows paths relative to its own root,
//! and every level here would then be short by that root's depth).

pub mod pod;
pub mod watch;

use std::{
    collections::{HashMap, HashSet, VecDeque},
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, fs::DirEntryExt, fs::MetadataExt},
    path::{Component, Path, PathBuf},
};

/// `f_type` of a cgroup v2 filesystem (linux/magic.h).
pub const CGROUP2_SUPER_MAGIC: u64 = 0x6367_7270;
/// `f_type` of a cgroup v1 hierarchy, named in errors because hybrid hosts have both.
pub const CGROUP_SUPER_MAGIC: u64 = 0x0027_e0eb;

const MOUNTINFO: &str = "/proc/self/mountinfo";
const PROC_CGROUP: &str = "/proc/self/cgroup";

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("cgroup v2 is not mounted (no cgroup2 entry in /proc/self/mountinfo)")]
    NotMounted,
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cgroup directory {path} does not exist")]
    Missing { path: PathBuf },
    #[error("cgroup directory {path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path} is not a cgroup v2 directory (it is on {fs})")]
    NotCgroup2 { path: PathBuf, fs: String },
    #[error("{path} is on cgroup v2 but under no cgroup2 mount listed in /proc/self/mountinfo")]
    OutsideMount { path: PathBuf },
    #[error("no cgroup v2 entry (\"0::\") in /proc/self/cgroup")]
    NoUnifiedEntry,
}

/// One line of `/proc/self/mountinfo`, the fields this crate needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// Where it is mounted (octal escapes decoded).
    pub mount_point: PathBuf,
    /// The directory of the filesystem that is mounted there (`/` for a whole hierarchy).
    pub root: PathBuf,
    /// Filesystem type: `cgroup2`, `cgroup`, `bpf`, ...
    pub fstype: String,
}

/// Parses mountinfo text (proc(5)): `id parent maj:min root mount_point options
/// [optional fields...] - fstype source super_options`. Malformed lines are skipped.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let root = fields.nth(3)?;
            let mount_point = fields.next()?;
            // The optional fields end at a lone "-".
            let mut after_dash = fields.skip_while(|f| *f != "-").skip(1);
            let fstype = after_dash.next()?;
            Some(MountEntry {
                mount_point: PathBuf::from(unescape_octal(mount_point)),
                root: PathBuf::from(unescape_octal(root)),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}

/// Undoes the kernel's `\ooo` escaping of space, tab, newline and backslash in paths.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = u32::from(bytes[i + 1] - b'0') * 64
                + u32::from(bytes[i + 2] - b'0') * 8
                + u32::from(bytes[i + 3] - b'0');
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup2 mounts in mountinfo text, whole-hierarchy mounts (root `/`) first.
pub fn cgroup2_mounts(text: &str) -> Vec<MountEntry> {
    let mut mounts: Vec<MountEntry> = parse_mountinfo(text)
        .into_iter()
        .filter(|m| m.fstype == "cgroup2")
        .collect();
    // Stable: among equals, mountinfo order (the first mount) wins.
    mounts.sort_by_key(|m| m.root != Path::new("/"));
    mounts
}

/// Where the cgroup v2 hierarchy is mounted, from mountinfo text: the first cgroup2 mount
/// of the whole hierarchy, else the first cgroup2 mount of any subtree.
pub fn parse_cgroup2_mount(text: &str) -> Option<PathBuf> {
    cgroup2_mounts(text)
        .into_iter()
        .next()
        .map(|m| m.mount_point)
}

fn read(path: &str) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })
}

/// Where the cgroup v2 hierarchy is mounted on this machine.
pub fn cgroup2_mount() -> Result<PathBuf, CgroupError> {
    parse_cgroup2_mount(&read(MOUNTINFO)?).ok_or(CgroupError::NotMounted)
}

/// A validated cgroup v2 directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupDir {
    /// Canonical path.
    pub path: PathBuf,
    /// The kernel's cgroup id, which on cgroup v2 is the directory's inode number.
    pub id: u64,
    /// Depth below the hierarchy root (the root itself is level 0).
    pub level: u32,
}

/// Checks that `path` is an existing cgroup v2 directory and returns its id and level.
/// Each error is one line naming the path.
pub fn validate_cgroup_dir(path: &Path) -> Result<CgroupDir, CgroupError> {
    let meta = match fs::metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(CgroupError::Missing { path: path.into() })
        }
        Err(source) => {
            return Err(CgroupError::Read {
                path: path.into(),
                source,
            })
        }
    };
    if !meta.is_dir() {
        return Err(CgroupError::NotADirectory { path: path.into() });
    }
    let canonical = fs::canonicalize(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    let fs_type = statfs_type(&canonical).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })?;
    if fs_type != CGROUP2_SUPER_MAGIC {
        return Err(CgroupError::NotCgroup2 {
            path: path.into(),
            fs: describe_fs(fs_type),
        });
    }
    let mounts = cgroup2_mounts(&read(MOUNTINFO)?);
    let level = level_below(&canonical, &mounts)
        .ok_or_else(|| CgroupError::OutsideMount { path: path.into() })?;
    Ok(CgroupDir {
        path: canonical,
        id: meta.ino(),
        level,
    })
}

/// Depth of `path` in the hierarchy: components below the deepest cgroup2 mount holding
/// it, plus the depth of that mount's root within the hierarchy.
fn level_below(path: &Path, mounts: &[MountEntry]) -> Option<u32> {
    let mount = mounts
        .iter()
        .filter(|m| path.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.components().count())?;
    let below = path
        .strip_prefix(&mount.mount_point)
        .ok()?
        .components()
        .count();
    let root_depth = mount
        .root
        .components()
        .filter(|c| matches!(c, Component::Normal(_)))
        .count();
    u32::try_from(below + root_depth).ok()
}

fn statfs_type(path: &Path) -> io::Result<u64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: libc::statfs is plain integers, for which all-zero bytes are a valid value.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs only writes into the zeroed struct we own; the path is NUL-terminated.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // f_type's width and signedness differ between architectures; magics fit in 32 bits.
    Ok(buf.f_type as u64 & 0xffff_ffff)
}

fn describe_fs(fs_type: u64) -> String {
    match fs_type {
        CGROUP_SUPER_MAGIC => "a cgroup v1 hierarchy".to_owned(),
        0x0102_1994 => "tmpfs".to_owned(),
        0x6265_6572 => "sysfs".to_owned(),
        other => format!("a filesystem of type {other:#x}"),
    }
}

/// Is `child` strictly below `parent` in the hierarchy?
pub fn is_within(child: &CgroupDir, parent: &CgroupDir) -> bool {
    // Path::starts_with compares whole components, so /a/bc is not within /a/b.
    child.path != parent.path && child.path.starts_with(&parent.path)
}

/// Finds the directory under `root` (inclusive) whose cgroup id is `id`, visiting at most
/// `max_entries` directories breadth first. Unreadable or vanishing directories (cgroups
/// are removed concurrently) are skipped.
pub fn find_by_id(root: &Path, id: u64, max_entries: usize) -> Option<PathBuf> {
    paths_by_id(root, &HashSet::from([id]), max_entries).remove(&id)
}

/// The directories under `root` (inclusive) of the cgroup ids in `ids`, in one breadth-first
/// walk that stops once all are found or `max_entries` directories were visited. Ids not
/// found are absent from the result.
pub fn paths_by_id(root: &Path, ids: &HashSet<u64>, max_entries: usize) -> HashMap<u64, PathBuf> {
    let mut found = HashMap::new();
    if max_entries == 0 || ids.is_empty() {
        return found;
    }
    let Ok(meta) = fs::metadata(root) else {
        return found;
    };
    if ids.contains(&meta.ino()) {
        found.insert(meta.ino(), root.to_path_buf());
    }
    let mut visited = 1usize;
    let mut queue = VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        if found.len() == ids.len() {
            break;
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // file_type() and ino() come from readdir itself: no stat per entry.
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if visited >= max_entries {
                return found;
            }
            visited += 1;
            if ids.contains(&entry.ino()) {
                found.insert(entry.ino(), entry.path());
            }
            queue.push_back(entry.path());
        }
    }
    found
}

/// The cgroup v2 path of this process relative to the hierarchy root, from
/// `/proc/self/cgroup` text (the `0::/path` line; hybrid hosts list v1 lines beside it).
pub fn parse_proc_cgroup(text: &str) -> Option<&str> {
    text.lines().find_map(|line| line.strip_prefix("0::"))
}

/// The cgroup v2 directory of this process.
pub fn current_cgroup() -> Result<PathBuf, CgroupError> {
    let mount = cgroup2_mount()?;
    let text = read(PROC_CGROUP)?;
    let relative = parse_proc_cgroup(&text).ok_or(CgroupError::NoUnifiedEntry)?;
    Ok(mount.join(relative.trim_start_matches('/')))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
26 24 0:24 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
28 26 0:26 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
31 26 0:29 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
";

    const PURE_V2: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
25 22 0:23 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
29 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
33 25 0:30 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:6 - bpf bpf rw,mode=700
";

    #[test]
    fn finds_the_hybrid_mount() {
        assert_eq!(
            parse_cgroup2_mount(HYBRID),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_the_pure_v2_mount() {
        assert_eq!(
            parse_cgroup2_mount(PURE_V2),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn no_cgroup2_line_means_not_mounted() {
        let v1_only: String = HYBRID
            .lines()
            .filter(|l| !l.contains("cgroup2"))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_eq!(parse_cgroup2_mount(&v1_only), None);
        assert_eq!(parse_cgroup2_mount(""), None);
        assert_eq!(
            CgroupError::NotMounted.to_string(),
            "cgroup v2 is not mounted (no cgroup2 entry in /proc/self/mountinfo)"
        );
    }

    #[test]
    fn whole_hierarchy_mount_wins_over_an_earlier_subtree_bind() {
        let text = "\
40 1 0:26 /kubepods.slice /host/kubepods rw - cgroup2 cgroup2 rw
41 1 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            parse_cgroup2_mount(text),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn mountinfo_fields_are_unescaped_and_optional_fields_skipped() {
        let text = r"50 1 0:40 /a\040b /mnt/with\040space\134x rw shared:3 master:1 - tmpfs tmpfs rw
garbage line
";
        let mounts = parse_mountinfo(text);
        assert_eq!(mounts.len(), 1);
        assert_eq!(mounts[0].mount_point, PathBuf::from(r"/mnt/with space\x"));
        assert_eq!(mounts[0].root, PathBuf::from("/a b"));
        assert_eq!(mounts[0].fstype, "tmpfs");
    }

    #[test]
    fn levels_count_from_the_hierarchy_root() {
        let mounts = cgroup2_mounts(PURE_V2);
        let at = |p: &str| level_below(Path::new(p), &mounts);
        assert_eq!(at("/sys/fs/cgroup"), Some(0));
        assert_eq!(at("/sys/fs/cgroup/kubepods.slice"), Some(1));
        assert_eq!(
            at("/sys/fs/cgroup/kubepods.slice/kubepods-besteffort.slice/pod1"),
            Some(3)
        );
        assert_eq!(at("/tmp"), None);
        // A bind of a subtree: its root's depth counts.
        let bind = cgroup2_mounts("40 1 0:26 /kubepods.slice /host rw - cgroup2 cgroup2 rw\n");
        assert_eq!(level_below(Path::new("/host/pod1"), &bind), Some(2));
    }

    #[test]
    fn proc_cgroup_unified_line() {
        let hybrid = "12:memory:/user.slice\n1:name=systemd:/user.slice/session-1.scope\n0::/user.slice/session-1.scope\n";
        assert_eq!(
            parse_proc_cgroup(hybrid),
            Some("/user.slice/session-1.scope")
        );
        assert_eq!(parse_proc_cgroup("0::/\n"), Some("/"));
        assert_eq!(parse_proc_cgroup("12:memory:/x\n"), None);
    }

    #[test]
    fn is_within_is_strict_and_component_wise() {
        let dir = |p: &str, level| CgroupDir {
            path: PathBuf::from(p),
            id: 1,
            level,
        };
        let parent = dir("/sys/fs/cgroup/a/b", 2);
        assert!(is_within(&dir("/sys/fs/cgroup/a/b/c", 3), &parent));
        assert!(!is_within(&dir("/sys/fs/cgroup/a/b", 2), &parent));
        assert!(!is_within(&dir("/sys/fs/cgroup/a/bc", 2), &parent));
        assert!(!is_within(&dir("/sys/fs/cgroup/a", 1), &parent));
    }

    /// The machine's real cgroup2 mount, or None (with a note) where there is none.
    fn live_mount() -> Option<PathBuf> {
        match cgroup2_mount() {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("SKIPPED: {e}");
                None
            }
        }
    }

    #[test]
    fn validates_the_real_mount_and_current_cgroup() {
        let Some(mount) = live_mount() else { return };
        let root = validate_cgroup_dir(&mount).unwrap();
        assert_eq!(root.level, 0);
        assert_eq!(root.path, fs::canonicalize(&mount).unwrap());
        let current = current_cgroup().unwrap();
        let dir = validate_cgroup_dir(&current).unwrap();
        assert_eq!(
            dir.level as usize,
            current.strip_prefix(&mount).unwrap().components().count()
        );
        if dir.level > 0 {
            assert!(is_within(&dir, &root));
        }
        assert_eq!(find_by_id(&mount, dir.id, 1_000_000), Some(current));
        assert_eq!(find_by_id(&mount, root.id, 1), Some(mount.clone()));
    }

    #[test]
    fn find_by_id_is_bounded() {
        let Some(mount) = live_mount() else { return };
        // An id that cannot exist: the walk must stop after the bound, not scan everything.
        assert_eq!(find_by_id(&mount, u64::MAX, 3), None);
        assert_eq!(find_by_id(&mount, u64::MAX, 0), None);
    }

    #[test]
    fn errors_name_the_path() {
        let missing = validate_cgroup_dir(Path::new("/nonexistent/cgroup")).unwrap_err();
        assert_eq!(
            missing.to_string(),
            "cgroup directory /nonexistent/cgroup does not exist"
        );

        let tmp = validate_cgroup_dir(Path::new("/tmp")).unwrap_err();
        assert!(matches!(tmp, CgroupError::NotCgroup2 { .. }), "{tmp}");
        assert!(
            tmp.to_string()
                .starts_with("/tmp is not a cgroup v2 directory (it is on "),
            "{tmp}"
        );

        if let Some(mount) = live_mount() {
            let file = mount.join("cgroup.procs");
            let err = validate_cgroup_dir(&file).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("cgroup directory {} is not a directory", file.display())
            );
        }
        // A v1 hierarchy on hybrid hosts.
        let v1 = parse_mountinfo(&fs::read_to_string(MOUNTINFO).unwrap())
            .into_iter()
            .find(|m| m.fstype == "cgroup");
        if let Some(v1) = v1 {
            let err = validate_cgroup_dir(&v1.mount_point).unwrap_err();
            assert!(
                err.to_string()
                    .ends_with("(it is on a cgroup v1 hierarchy)"),
                "{err}"
            );
        }
    }
}
