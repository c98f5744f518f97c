//! Parsing `/proc/self/mountinfo`, to find the cgroup2 mount and to tell whether bpffs is
//! mounted, instead of hard-coding `/sys/fs/cgroup` (our machines run cgroup v2 in hybrid
//! mode at `/sys/fs/cgroup/unified`; Kubernetes nodes usually run pure v2 at `/sys/fs/cgroup`).
//!
//! Line format (proc(5)): `id parent major:minor root mount_point options [optional...] -
//! fstype source super_options`. The number of optional fields varies, so the filesystem
//! type is found after the `-` separator, not at a fixed column.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};

/// One mount from mountinfo (only the fields the kit needs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Root of the mount within its filesystem (`/` unless a bind mount of a subtree).
    pub root: String,
    /// Where it is mounted, with octal escapes (`\040` etc.) decoded.
    pub mount_point: PathBuf,
    /// Filesystem type, e.g. `cgroup2`, `bpf`.
    pub fstype: String,
    /// Mount source, e.g. `cgroup2`, `bpf`, `/dev/sda1`.
    pub source: String,
}

/// Parses mountinfo text. Malformed lines are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split(' ').collect();
    if fields.len() < 10 {
        return None;
    }
    let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    let fstype = fields.get(sep + 1)?;
    let source = fields.get(sep + 2)?;
    Some(Mount {
        root: unescape(fields[3]),
        mount_point: PathBuf::from(unescape(fields[4])),
        fstype: (*fstype).to_string(),
        source: unescape(source),
    })
}

/// Decodes the `\ooo` octal escapes the kernel uses for space, tab, newline and backslash.
fn unescape(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let oct = &bytes[i + 1..i + 4];
            if oct.iter().all(|b| (b'0'..=b'7').contains(b)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads and parses `/proc/self/mountinfo`.
pub fn read() -> Result<Vec<Mount>> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    Ok(parse(&text))
}

/// The cgroup2 mount point in `mounts`: the first `cgroup2` mount of the hierarchy's root.
pub fn find_cgroup2(mounts: &[Mount]) -> Option<&Path> {
    mounts
        .iter()
        .filter(|m| m.fstype == "cgroup2")
        .find(|m| m.root == "/")
        .or_else(|| mounts.iter().find(|m| m.fstype == "cgroup2"))
        .map(|m| m.mount_point.as_path())
}

/// The cgroup2 mount point of this machine, from `/proc/self/mountinfo`.
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = read()?;
    match find_cgroup2(&mounts) {
        Some(p) => Ok(p.to_path_buf()),
        None => {
            bail!("no cgroup2 filesystem in /proc/self/mountinfo: datalab-guard needs cgroup v2")
        }
    }
}

/// True if a filesystem of type `fstype` is mounted exactly at `path` in `mounts`.
pub fn is_mounted(mounts: &[Mount], path: &Path, fstype: &str) -> bool {
    mounts
        .iter()
        .any(|m| m.mount_point == path && m.fstype == fstype)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
27 22 0:25 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
28 27 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
29 27 0:27 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";

    #[test]
    fn finds_cgroup2_in_hybrid_mode() {
        let mounts = parse(HYBRID);
        assert_eq!(mounts.len(), 5);
        assert_eq!(
            find_cgroup2(&mounts),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn finds_cgroup2_in_pure_mode_without_optional_fields() {
        let text =
            "35 24 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(&parse(text)),
            Some(Path::new("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn handles_several_optional_fields() {
        let text = "35 24 0:30 / /sys/fs/bpf rw,relatime shared:1 master:2 propagate_from:3 - bpf bpf rw,mode=700\n";
        let mounts = parse(text);
        assert_eq!(mounts[0].fstype, "bpf");
        assert_eq!(mounts[0].source, "bpf");
        assert!(is_mounted(&mounts, Path::new("/sys/fs/bpf"), "bpf"));
        assert!(!is_mounted(&mounts, Path::new("/sys/fs/bpf"), "tmpfs"));
        assert!(!is_mounted(&mounts, Path::new("/sys/fs"), "bpf"));
    }

    #[test]
    fn prefers_root_of_hierarchy_over_bind_mount() {
        let text = "\
50 24 0:30 /kubepods /mnt/sub rw - cgroup2 cgroup2 rw
51 24 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            find_cgroup2(&parse(text)),
            Some(Path::new("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn decodes_octal_escapes() {
        let text = "60 24 0:40 / /mnt/with\\040space rw - tmpfs a\\134b rw\n";
        let m = &parse(text)[0];
        assert_eq!(m.mount_point, Path::new("/mnt/with space"));
        assert_eq!(m.source, "a\\b");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("\\999"), "\\999");
    }

    #[test]
    fn skips_malformed_lines_and_reports_missing_cgroup2() {
        assert!(parse("garbage\n\n1 2 3\n").is_empty());
        assert_eq!(
            find_cgroup2(&parse("1 2 0:1 / / rw - ext4 /dev/sda rw\n")),
            None
        );
    }

    #[test]
    fn reads_this_machine() {
        // Every Linux machine has a root mount; this only checks the real file parses.
        let mounts = read().unwrap();
        assert!(
            mounts.iter().any(|m| m.mount_point == Path::new("/")),
            "{mounts:?}"
        );
    }
}
