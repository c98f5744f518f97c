//! Whether the kernel runs BPF LSM programs: `--deny-raw-sockets` / `denyRawSockets` needs
//! one (the `lsm_cgroup` program that refuses AF_PACKET and AF_XDP sockets). Checked at start (as bad
//! input) and before a reload turns the switch on (the reload is then refused).

use std::fs;

/// Where the kernel lists the active LSMs (securityfs).
pub const LSM_LIST: &str = "/sys/kernel/security/lsm";

/// The active LSMs, comma separated, when securityfs is mounted.
pub fn active_lsms() -> Option<String> {
    fs::read_to_string(LSM_LIST)
        .ok()
        .map(|s| s.trim().to_owned())
}

/// `Some(true)` when the BPF LSM is active, `None` when it cannot be told.
pub fn bpf_lsm_active(lsms: Option<&str>) -> Option<bool> {
    lsms.map(|list| list.split(',').any(|l| l.trim() == "bpf"))
}

/// `Err` with the reason when the BPF LSM is known to be inactive. When it cannot be told
/// (securityfs not mounted) this passes, and loading the program is the check: it fails and
/// nothing is attached.
pub fn require_bpf_lsm() -> Result<(), String> {
    let lsms = active_lsms();
    match bpf_lsm_active(lsms.as_deref()) {
        Some(false) => Err(format!(
            "denying raw sockets needs the BPF LSM to refuse AF_PACKET and AF_XDP sockets, and it is not active (LSMs: {}); add `bpf` to the lsm= kernel parameter",
            lsms.unwrap_or_default()
        )),
        _ => Ok(()),
    }
}
