//! `datalab-guard check`: preflight of what loading the guard needs — kernel version, BTF,
//! cgroup v2, bpffs, capabilities — plus two informative settings (JIT, unprivileged BPF).
//!
//! Each check is a pure function of text read from /proc and /sys, so the verdicts are
//! unit-tested without the machine they describe; [`run`] only gathers that text.

use std::{
    fmt, fs,
    path::{Component, Path, PathBuf},
};

use super::Shared;
use crate::{
    bpf::lsm::{active_lsms, bpf_lsm_active, LSM_LIST},
    cgroups::{self, MountEntry},
};

/// Outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Pass,
    /// The guard cannot work as is.
    Fail,
    /// It works, with a caveat worth fixing.
    Warn,
    /// Worth knowing, not a problem for the guard.
    Info,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Pass => "PASS",
            Status::Fail => "FAIL",
            Status::Warn => "WARN",
            Status::Info => "INFO",
        }
    }
}

/// One line of the report: `PASS  kernel 6.18.44 (>= 5.8: cgroup bpf_link, ring buffer)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckLine {
    pub status: Status,
    pub message: String,
}

impl CheckLine {
    fn new(status: Status, message: impl Into<String>) -> Self {
        CheckLine {
            status,
            message: message.into(),
        }
    }
}

impl fmt::Display for CheckLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}  {}", self.status.label(), self.message)
    }
}

/// Oldest kernel with everything the guard uses: BPF ring buffer, CAP_BPF and
/// `bpf_ktime_get_boot_ns` (5.8), cgroup bpf_link (5.7).
pub const MIN_KERNEL: (u32, u32) = (5, 8);

const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";

/// Capability numbers (linux/capability.h).
pub const CAP_NET_ADMIN: u32 = 12;
pub const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_BPF: u32 = 39;

/// The command: prints every check; fails (exit 1) when one fails.
pub fn run(shared: &Shared) -> anyhow::Result<()> {
    if print(&checks(&shared.bpffs)) {
        Ok(())
    } else {
        Err(anyhow::anyhow!("preflight failed"))
    }
}

/// Runs every check; `bpffs` is the `--bpffs` directory (it may not exist yet).
pub fn checks(bpffs: &Path) -> Vec<CheckLine> {
    let read = |path: &str| fs::read_to_string(path).ok();
    let mountinfo = read("/proc/self/mountinfo").unwrap_or_default();
    let mounts = cgroups::parse_mountinfo(&mountinfo);
    let mut lines = vec![
        check_kernel(&kernel_release()),
        check_btf(Path::new(BTF_VMLINUX).exists()),
        check_cgroup2(&mounts),
        check_bpffs(&mounts, &absolute(bpffs)),
    ];
    lines.extend(check_caps(
        read("/proc/self/status").as_deref().and_then(parse_cap_eff),
    ));
    lines.push(check_jit(
        read("/proc/sys/net/core/bpf_jit_enable").as_deref(),
    ));
    lines.push(check_unprivileged_bpf(
        read("/proc/sys/kernel/unprivileged_bpf_disabled").as_deref(),
    ));
    lines.push(check_bpf_lsm(active_lsms().as_deref()));
    lines.push(check_raw_paths(&crate::bpf::PinLayout::new(bpffs)));
    lines
}

/// What closes the paths around the IP stack here now, from the pins under `--bpffs`:
/// the BPF LSM program, the pod-edge layer, or neither (a warning, not a failure: the
/// cgroup layer still guards everything that goes through a socket).
pub fn check_raw_paths(layout: &crate::bpf::PinLayout) -> CheckLine {
    if !layout.exists() {
        return CheckLine::new(
            Status::Info,
            "raw paths (AF_PACKET, AF_XDP): nothing installed under --bpffs yet",
        );
    }
    let deny = crate::bpf::GuardMaps::from_pins(layout)
        .and_then(|m| m.config())
        .is_ok_and(|c| c.deny_raw_sockets != 0);
    let raw = crate::bpf::raw_paths::RawPaths::read(layout, deny);
    let status = if raw.closed() {
        Status::Pass
    } else {
        Status::Warn
    };
    CheckLine::new(
        status,
        format!(
            "raw paths (AF_PACKET, AF_XDP) closed by: {}",
            raw.describe()
        ),
    )
}

/// The BPF LSM is what lets `--deny-raw-sockets` refuse AF_PACKET sockets.
pub fn check_bpf_lsm(lsms: Option<&str>) -> CheckLine {
    match bpf_lsm_active(lsms) {
        Some(true) => CheckLine::new(Status::Pass, "BPF LSM active (--deny-raw-sockets can refuse AF_PACKET and AF_XDP sockets)"),
        Some(false) => CheckLine::new(
            Status::Warn,
            format!(
                "BPF LSM not active (LSMs: {}); --deny-raw-sockets is unavailable: add `bpf` to the lsm= kernel parameter",
                lsms.unwrap_or("")
            ),
        ),
        None => CheckLine::new(Status::Info, format!("cannot read {LSM_LIST} (securityfs not mounted); BPF LSM state unknown")),
    }
}

/// Prints the lines on stdout; true when none failed.
pub fn print(lines: &[CheckLine]) -> bool {
    for line in lines {
        println!("{line}");
    }
    lines.iter().all(|l| l.status != Status::Fail)
}

/// `uname -r`.
fn kernel_release() -> String {
    // SAFETY: libc::utsname is byte arrays, for which all-zero bytes are a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname fills the zeroed struct we own; its fields are NUL-terminated arrays.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return String::new();
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// (major, minor, patch) from a release such as `6.18.44-cloud-amd64` or `5.15.0-91-generic`.
pub fn parse_kernel_release(release: &str) -> Option<(u32, u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    // The patch level may be missing ("6.18-rc1"): then it is 0.
    let patch = release
        .split('.')
        .nth(2)
        .and_then(|p| p.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    Some((major, minor, patch))
}

pub fn check_kernel(release: &str) -> CheckLine {
    let needs = "cgroup bpf_link, ring buffer";
    let (min_major, min_minor) = MIN_KERNEL;
    match parse_kernel_release(release) {
        Some((major, minor, _)) if (major, minor) >= MIN_KERNEL => CheckLine::new(
            Status::Pass,
            format!("kernel {release} (>= {min_major}.{min_minor}: {needs})"),
        ),
        Some(_) => CheckLine::new(
            Status::Fail,
            format!("kernel {release} is older than {min_major}.{min_minor} (needed: {needs})"),
        ),
        None => CheckLine::new(
            Status::Fail,
            format!("cannot read the kernel version from uname release {release:?}"),
        ),
    }
}

pub fn check_btf(present: bool) -> CheckLine {
    if present {
        CheckLine::new(Status::Pass, format!("kernel BTF at {BTF_VMLINUX}"))
    } else {
        CheckLine::new(
            Status::Fail,
            format!("no kernel BTF at {BTF_VMLINUX} (needs a kernel built with CONFIG_DEBUG_INFO_BTF=y)"),
        )
    }
}

pub fn check_cgroup2(mounts: &[MountEntry]) -> CheckLine {
    let Some(v2) = mounts
        .iter()
        .find(|m| m.fstype == "cgroup2" && m.root == Path::new("/"))
        .or_else(|| mounts.iter().find(|m| m.fstype == "cgroup2"))
    else {
        return CheckLine::new(Status::Fail, cgroups::CgroupError::NotMounted.to_string());
    };
    let hybrid = mounts.iter().any(|m| m.fstype == "cgroup");
    let note = if hybrid {
        " (hybrid: cgroup v1 controllers are mounted too)"
    } else {
        ""
    };
    CheckLine::new(
        Status::Pass,
        format!("cgroup v2 mounted at {}{note}", v2.mount_point.display()),
    )
}

/// The `--bpffs` directory must be on a bpf filesystem: the deepest mount holding it (it
/// need not exist yet) must be of type bpf. A later mount of the same point hides an
/// earlier one, so the last one listed wins.
pub fn check_bpffs(mounts: &[MountEntry], bpffs: &Path) -> CheckLine {
    let holder = mounts
        .iter()
        .filter(|m| bpffs.starts_with(&m.mount_point))
        .fold(None::<&MountEntry>, |best, m| match best {
            Some(b) if b.mount_point.components().count() > m.mount_point.components().count() => {
                Some(b)
            }
            _ => Some(m),
        });
    match holder {
        Some(m) if m.fstype == "bpf" => CheckLine::new(
            Status::Pass,
            format!(
                "bpffs mounted at {} (holds {})",
                m.mount_point.display(),
                bpffs.display()
            ),
        ),
        Some(m) => CheckLine::new(
            Status::Fail,
            format!(
                "{} is on {} mounted at {}, not on bpffs; use a --bpffs directory on a bpf \
                 filesystem (`mount -t bpf bpf /sys/fs/bpf`)",
                bpffs.display(),
                m.fstype,
                m.mount_point.display()
            ),
        ),
        None => CheckLine::new(Status::Fail, format!("no mount holds {}", bpffs.display())),
    }
}

/// Makes a path absolute and removes `.`/`..` lexically (the directory may not exist).
fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut out = PathBuf::from("/");
    for component in joined.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The effective capability set (`CapEff:` of /proc/self/status, hex).
pub fn parse_cap_eff(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

fn has(caps: u64, cap: u32) -> bool {
    caps & (1u64 << cap) != 0
}

/// One line per capability, saying what the guard uses it for. Since 5.8 CAP_SYS_ADMIN
/// also passes the kernel's CAP_BPF and CAP_NET_ADMIN checks for BPF, so it stands in for
/// either.
pub fn check_caps(cap_eff: Option<u64>) -> Vec<CheckLine> {
    let Some(caps) = cap_eff else {
        return vec![CheckLine::new(
            Status::Fail,
            "cannot read CapEff from /proc/self/status",
        )];
    };
    let sys_admin = has(caps, CAP_SYS_ADMIN);
    let line = |cap: u32, name: &str, purpose: &str| {
        if has(caps, cap) {
            CheckLine::new(Status::Pass, format!("{name}: {purpose}"))
        } else if sys_admin {
            CheckLine::new(
                Status::Pass,
                format!("{name} not held; CAP_SYS_ADMIN grants it: {purpose}"),
            )
        } else {
            CheckLine::new(Status::Fail, format!("{name} missing: needed to {purpose}"))
        }
    };
    let mut lines =
        vec![
        line(CAP_BPF, "CAP_BPF", "create the maps and load the programs with the full verifier"),
        line(
            CAP_NET_ADMIN,
            "CAP_NET_ADMIN",
            "load the cgroup connect, sendmsg and sock_create programs (networking program types)",
        ),
    ];
    let sys_admin_use =
        "mount bpffs and look up programs, maps and links by id (status, uninstall)";
    lines.push(if sys_admin {
        CheckLine::new(Status::Pass, format!("CAP_SYS_ADMIN: {sys_admin_use}"))
    } else {
        CheckLine::new(
            Status::Warn,
            format!(
                "CAP_SYS_ADMIN missing: cannot {sys_admin_use}; bpffs must be mounted beforehand"
            ),
        )
    });
    lines
}

/// `net.core.bpf_jit_enable`: 0 interprets (slower, never a failure); 1 and 2 (debug) JIT.
pub fn check_jit(value: Option<&str>) -> CheckLine {
    match value.map(str::trim) {
        Some("1") | Some("2") => CheckLine::new(Status::Pass, "BPF JIT enabled"),
        Some("0") => CheckLine::new(
            Status::Warn,
            "BPF JIT disabled: programs run in the interpreter (slower); set net.core.bpf_jit_enable=1",
        ),
        Some(other) => CheckLine::new(Status::Warn, format!("unexpected net.core.bpf_jit_enable value {other:?}")),
        None => CheckLine::new(Status::Warn, "cannot read /proc/sys/net/core/bpf_jit_enable"),
    }
}

/// `kernel.unprivileged_bpf_disabled`: informative, the guard runs privileged either way.
pub fn check_unprivileged_bpf(value: Option<&str>) -> CheckLine {
    match value.map(str::trim) {
        Some("0") => CheckLine::new(
            Status::Info,
            "unprivileged BPF enabled (kernel.unprivileged_bpf_disabled=0): any user can load \
             socket filter and cgroup_skb programs; 2 is the hardened default",
        ),
        Some(v @ ("1" | "2")) => CheckLine::new(
            Status::Info,
            format!("unprivileged BPF disabled (kernel.unprivileged_bpf_disabled={v})"),
        ),
        Some(other) => CheckLine::new(
            Status::Info,
            format!("kernel.unprivileged_bpf_disabled={other}"),
        ),
        None => CheckLine::new(
            Status::Info,
            "cannot read /proc/sys/kernel/unprivileged_bpf_disabled",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpf_lsm_is_read_from_the_lsm_list() {
        assert_eq!(
            bpf_lsm_active(Some("lockdown,capability,landlock,bpf")),
            Some(true)
        );
        assert_eq!(
            bpf_lsm_active(Some("lockdown,capability,apparmor")),
            Some(false)
        );
        assert_eq!(bpf_lsm_active(None), None);
        assert_eq!(
            check_bpf_lsm(Some("capability,apparmor")).status,
            Status::Warn
        );
        assert_eq!(check_bpf_lsm(Some("capability,bpf")).status, Status::Pass);
    }

    fn mounts(text: &str) -> Vec<MountEntry> {
        cgroups::parse_mountinfo(text)
    }

    const PURE_V2: &str = "\
22 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
25 22 0:23 / /sys rw,nosuid shared:2 - sysfs sysfs rw
29 25 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate
33 25 0:30 / /sys/fs/bpf rw,nosuid shared:6 - bpf bpf rw,mode=700
";

    const HYBRID_NO_BPFFS: &str = "\
30 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
24 30 0:22 / /sys rw,nosuid shared:7 - sysfs sysfs rw
26 24 0:24 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
27 26 0:25 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
28 26 0:26 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,xattr,name=systemd
";

    #[test]
    fn kernel_release_parsing() {
        assert_eq!(parse_kernel_release("6.18.44"), Some((6, 18, 44)));
        assert_eq!(
            parse_kernel_release("6.18.44-cloud-amd64"),
            Some((6, 18, 44))
        );
        assert_eq!(parse_kernel_release("5.15.0-91-generic"), Some((5, 15, 0)));
        assert_eq!(parse_kernel_release("6.18-rc1"), Some((6, 18, 0)));
        assert_eq!(parse_kernel_release("4.19.0"), Some((4, 19, 0)));
        assert_eq!(parse_kernel_release("garbage"), None);
        assert_eq!(parse_kernel_release(""), None);
    }

    #[test]
    fn kernel_lines() {
        assert_eq!(
            check_kernel("6.18.44").to_string(),
            "PASS  kernel 6.18.44 (>= 5.8: cgroup bpf_link, ring buffer)"
        );
        assert_eq!(check_kernel("5.8.0").status, Status::Pass);
        assert_eq!(
            check_kernel("5.4.0-150-generic").to_string(),
            "FAIL  kernel 5.4.0-150-generic is older than 5.8 (needed: cgroup bpf_link, ring buffer)"
        );
        assert_eq!(check_kernel("x").status, Status::Fail);
    }

    #[test]
    fn btf_lines() {
        assert_eq!(
            check_btf(true).to_string(),
            "PASS  kernel BTF at /sys/kernel/btf/vmlinux"
        );
        assert_eq!(check_btf(false).status, Status::Fail);
    }

    #[test]
    fn cgroup2_lines() {
        assert_eq!(
            check_cgroup2(&mounts(PURE_V2)).to_string(),
            "PASS  cgroup v2 mounted at /sys/fs/cgroup"
        );
        assert_eq!(
            check_cgroup2(&mounts(HYBRID_NO_BPFFS)).to_string(),
            "PASS  cgroup v2 mounted at /sys/fs/cgroup/unified (hybrid: cgroup v1 controllers are mounted too)"
        );
        assert_eq!(
            check_cgroup2(&mounts("30 1 8:1 / / rw - ext4 /dev/sda1 rw\n")).to_string(),
            "FAIL  cgroup v2 is not mounted (no cgroup2 entry in /proc/self/mountinfo)"
        );
    }

    #[test]
    fn bpffs_lines() {
        let dir = Path::new("/sys/fs/bpf/datalab-guard");
        assert_eq!(
            check_bpffs(&mounts(PURE_V2), dir).to_string(),
            "PASS  bpffs mounted at /sys/fs/bpf (holds /sys/fs/bpf/datalab-guard)"
        );
        assert_eq!(
            check_bpffs(&mounts(HYBRID_NO_BPFFS), dir).to_string(),
            "FAIL  /sys/fs/bpf/datalab-guard is on sysfs mounted at /sys, not on bpffs; \
             use a --bpffs directory on a bpf filesystem (`mount -t bpf bpf /sys/fs/bpf`)"
        );
        // A bpffs elsewhere, and a tmpfs mounted over the bpffs directory.
        let custom = format!("{PURE_V2}40 33 0:41 / /sys/fs/bpf/datalab-guard rw - tmpfs tmpfs rw\n41 1 0:42 / /run/bpf rw - bpf bpf rw\n");
        assert_eq!(check_bpffs(&mounts(&custom), dir).status, Status::Fail);
        assert_eq!(
            check_bpffs(&mounts(&custom), Path::new("/run/bpf/dg")).status,
            Status::Pass
        );
        // Component-wise: /sys/fs/bpfx is not under /sys/fs/bpf.
        assert_eq!(
            check_bpffs(&mounts(PURE_V2), Path::new("/sys/fs/bpfx")).status,
            Status::Fail
        );
    }

    #[test]
    fn paths_are_made_absolute_lexically() {
        assert_eq!(
            absolute(Path::new("/sys/fs/bpf/../bpf/./dg")),
            PathBuf::from("/sys/fs/bpf/dg")
        );
        assert!(absolute(Path::new("relative")).is_absolute());
    }

    #[test]
    fn cap_eff_parsing() {
        let status = "Name:\tcat\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(status), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff("Name:\tcat\n"), None);
        assert_eq!(parse_cap_eff("CapEff:\tzz\n"), None);
    }

    #[test]
    fn capability_lines() {
        let all = (1u64 << CAP_BPF) | (1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN);
        assert!(check_caps(Some(all))
            .iter()
            .all(|l| l.status == Status::Pass));

        let without_sys_admin = check_caps(Some((1u64 << CAP_BPF) | (1 << CAP_NET_ADMIN)));
        assert_eq!(without_sys_admin[0].status, Status::Pass);
        assert_eq!(without_sys_admin[1].status, Status::Pass);
        assert_eq!(without_sys_admin[2].status, Status::Warn);

        // CAP_SYS_ADMIN alone satisfies the BPF checks.
        let sys_admin_only = check_caps(Some(1u64 << CAP_SYS_ADMIN));
        assert!(sys_admin_only.iter().all(|l| l.status == Status::Pass));
        assert!(sys_admin_only[0]
            .message
            .starts_with("CAP_BPF not held; CAP_SYS_ADMIN grants it"));

        let none = check_caps(Some(0));
        assert_eq!(
            none[1].to_string(),
            "FAIL  CAP_NET_ADMIN missing: needed to load the cgroup connect, sendmsg and sock_create \
             programs (networking program types)"
        );
        assert_eq!(none[0].status, Status::Fail);
        assert_eq!(check_caps(None)[0].status, Status::Fail);
    }

    #[test]
    fn jit_and_unprivileged_lines() {
        assert_eq!(check_jit(Some("1\n")).to_string(), "PASS  BPF JIT enabled");
        assert_eq!(check_jit(Some("0\n")).status, Status::Warn);
        assert_eq!(check_jit(None).status, Status::Warn);
        assert_eq!(
            check_unprivileged_bpf(Some("2\n")).to_string(),
            "INFO  unprivileged BPF disabled (kernel.unprivileged_bpf_disabled=2)"
        );
        assert_eq!(check_unprivileged_bpf(Some("0")).status, Status::Info);
    }

    #[test]
    fn print_fails_only_on_fail_lines() {
        let pass = CheckLine::new(Status::Pass, "a");
        let warn = CheckLine::new(Status::Warn, "b");
        let info = CheckLine::new(Status::Info, "c");
        assert!(print(&[pass.clone(), warn, info]));
        assert!(!print(&[pass, CheckLine::new(Status::Fail, "d")]));
    }

    #[test]
    fn run_on_this_machine_reports_every_check() {
        let lines = checks(Path::new("/sys/fs/bpf/datalab-guard"));
        // kernel, BTF, cgroup2, bpffs, three capabilities, JIT, unprivileged BPF, BPF LSM,
        // raw paths.
        assert_eq!(lines.len(), 11, "{lines:#?}");
        assert!(lines[0].message.starts_with("kernel "));
    }
}
