//! Proof that the BPF LSM branches of the tests ran somewhere. The tests with a BPF LSM
//! branch print, once that branch has passed, `BPF LSM branch ran: <test>`; where the kernel
//! refuses BPF LSM programs they take their fail-closed branch instead and print
//! `BPF LSM refused, fail-closed branch only: <test>`. `cargo xtask test` collects both from
//! the host run and the VM step and fails when a test's LSM branch ran nowhere, so a machine
//! whose kernel refuses the BPF LSM cannot pass on the fail-closed branch alone.

use std::collections::BTreeSet;

use anyhow::{bail, Result};

/// Printed by a test once its BPF LSM branch has passed.
pub const LSM_BRANCH_RAN: &str = "BPF LSM branch ran: ";
/// Printed by a test that could run only its fail-closed branch (kernel refuses BPF LSM).
pub const FAIL_CLOSED_ONLY: &str = "BPF LSM refused, fail-closed branch only: ";

/// The tests whose BPF LSM branch a full run must see, by file under `tests/tests/`.
pub const REQUIRED: [(&str, &str); 3] = [
    (
        "raw_sockets.rs",
        "deny_raw_sockets_refuses_af_packet_or_fails_closed",
    ),
    (
        "raw_sockets.rs",
        "socket_programs_attach_to_a_running_install_all_or_none",
    ),
    (
        "node_mode.rs",
        "sighup_deny_raw_sockets_attaches_the_socket_programs_or_is_rejected",
    ),
];

/// The markers seen in one run's output.
#[derive(Debug, Default, Clone)]
pub struct LsmMarkers {
    /// Tests whose BPF LSM branch ran to its end.
    pub ran: BTreeSet<String>,
    /// Tests that ran only their fail-closed branch.
    pub fail_closed_only: BTreeSet<String>,
}

impl LsmMarkers {
    /// Records the markers in one output line. With two test threads, a marker can share a
    /// line with libtest's `test name ... ` prefix, so it is looked for anywhere in the line.
    pub fn observe(&mut self, line: &str) {
        for (marker, set) in [
            (LSM_BRANCH_RAN, &mut self.ran),
            (FAIL_CLOSED_ONLY, &mut self.fail_closed_only),
        ] {
            if let Some(at) = line.find(marker) {
                let name: String = line[at + marker.len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    set.insert(name);
                }
            }
        }
    }

    pub fn merge(&mut self, other: &LsmMarkers) {
        self.ran.extend(other.ran.iter().cloned());
        self.fail_closed_only
            .extend(other.fail_closed_only.iter().cloned());
    }
}

/// Fails unless the BPF LSM branch of every test that needs one ran in `seen` (host and VM
/// markers merged): with `all_required`, every test in [`REQUIRED`]; always, every test that
/// ran only its fail-closed branch somewhere.
pub fn require_lsm_branches(seen: &LsmMarkers, all_required: bool) -> Result<()> {
    let mut needed: BTreeSet<&str> = seen.fail_closed_only.iter().map(String::as_str).collect();
    if all_required {
        needed.extend(REQUIRED.iter().map(|(_, test)| *test));
    }
    let missing: Vec<&str> = needed
        .into_iter()
        .filter(|test| !seen.ran.contains(*test))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    bail!(
        "the BPF LSM branch of {} never ran: {}.\nThe guard's raw-socket refusal (AF_PACKET, \
         AF_XDP) is a BPF LSM program; a kernel that refuses BPF LSM programs (this host's \
         does) only lets these tests check that the agent fails closed. Run their LSM branch \
         in the VM on Debian 12's 6.1 kernel: `cargo xtask vm` (the full `./x test` runs it; \
         needs qemu-system-x86, linux-image-amd64, mmdebstrap and busybox-static, which \
         `cargo xtask setup` installs), or run the tests on a host whose kernel loads BPF LSM \
         programs (`bpf` in its lsm= list).",
        if missing.len() == 1 {
            "this test"
        } else {
            "these tests"
        },
        missing.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(lines: &[&str]) -> LsmMarkers {
        let mut m = LsmMarkers::default();
        for l in lines {
            m.observe(l);
        }
        m
    }

    #[test]
    fn markers_are_found_inside_interleaved_lines() {
        let m = seen(&[
            "test deny ... BPF LSM branch ran: deny_raw_sockets_refuses_af_packet_or_fails_closed",
            "BPF LSM refused, fail-closed branch only: socket_programs_attach_to_a_running_install_all_or_none\r",
            "BPF LSM branch ran: ",
            "BPF LSM available: exercising",
        ]);
        assert_eq!(
            m.ran.iter().collect::<Vec<_>>(),
            ["deny_raw_sockets_refuses_af_packet_or_fails_closed"]
        );
        assert_eq!(
            m.fail_closed_only.iter().collect::<Vec<_>>(),
            ["socket_programs_attach_to_a_running_install_all_or_none"]
        );
    }

    #[test]
    fn the_fail_closed_branch_alone_fails_the_run() {
        let host = seen(&[&format!("{FAIL_CLOSED_ONLY}{}", REQUIRED[0].1)]);
        let err = require_lsm_branches(&host, false).unwrap_err().to_string();
        assert!(
            err.contains(REQUIRED[0].1) && err.contains("cargo xtask vm"),
            "{err}"
        );
        // The VM's run supplies it.
        let mut all = host;
        all.merge(&seen(&[&format!("{LSM_BRANCH_RAN}{}", REQUIRED[0].1)]));
        require_lsm_branches(&all, false).unwrap();
        // A full run needs every required test, even one that printed nothing at all.
        let err = require_lsm_branches(&all, true).unwrap_err().to_string();
        assert!(
            err.contains(REQUIRED[1].1) && err.contains(REQUIRED[2].1),
            "{err}"
        );
        for (_, test) in REQUIRED {
            all.observe(&format!("{LSM_BRANCH_RAN}{test}"));
        }
        require_lsm_branches(&all, true).unwrap();
    }

    /// The required tests exist and print the marker (a renamed test would otherwise make
    /// every full run fail with a confusing message, or worse, a moved marker go unseen).
    #[test]
    fn required_tests_print_their_marker() {
        let sources = [
            (
                "raw_sockets.rs",
                include_str!("../../tests/tests/raw_sockets.rs"),
            ),
            (
                "node_mode.rs",
                include_str!("../../tests/tests/node_mode.rs"),
            ),
        ];
        for (file, test) in REQUIRED {
            let (_, src) = sources.iter().find(|(f, _)| *f == file).unwrap();
            assert!(
                src.contains(&format!("fn {test}()")),
                "{file} has no {test}"
            );
            let direct = src.contains(&format!("{LSM_BRANCH_RAN}{test}"));
            let through_helper = src.contains(&format!("const TEST: &str = \"{test}\";"))
                && src.contains(&format!("\"{LSM_BRANCH_RAN}{{test}}\""));
            assert!(direct || through_helper, "{file}: {test} prints no marker");
        }
    }
}
