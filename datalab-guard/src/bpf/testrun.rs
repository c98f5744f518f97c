//! Running the egress program (and the pod-edge one, on whole frames) on crafted packets
//! with BPF_PROG_TEST_RUN, without attaching anything: for the packet tests and `cargo xtask
//! bench`; and loading every program once to read how many instructions the verifier
//! processed (`cargo xtask verifier`).
//!
//! The maps are pinned by name (the object says so), so a runner pins them in its own
//! bpffs directory and removes them on drop. Under test-run the packet's socket is a dummy
//! one in the *calling thread's* cgroup, so that cgroup is where the verdict is looked up.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{anyhow, Context as _};
use aya::{
    maps::RingBuf,
    programs::{CgroupSkb, Program, SchedClassifier, TestRun, TestRunOptions},
    Btf, Ebpf, EbpfLoader,
};
use datalab_guard_common::{
    cidr::Cidr,
    counters::Stat,
    maps::{self as names, programs},
    AuditEvent, GuardConfig, Mode, TunnelConfig, Verdict, VerdictEntry,
};

use super::{maps::CounterValue, object::OBJECT, GuardMaps, PinLayout};

/// A loaded, unattached copy of the programs with private pinned maps.
pub struct TestRunner {
    ebpf: Ebpf,
    maps: GuardMaps,
    layout: PinLayout,
}

/// One program run's outcome.
#[derive(Clone, Copy, Debug)]
pub struct RunResult {
    /// 1 = pass, 0 = drop.
    pub verdict: u32,
    /// Mean time per run as measured by the kernel.
    pub per_run: Duration,
}

impl TestRunner {
    /// Loads the object with maps pinned under `bpffs_dir` (which must not exist yet).
    pub fn new(bpffs_dir: &std::path::Path) -> anyhow::Result<TestRunner> {
        let layout = PinLayout::new(bpffs_dir);
        layout.create_dirs()?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(layout.maps_dir())
            .load(OBJECT)
            .context("cannot load the eBPF object")?;
        let maps = GuardMaps::from_ebpf(&mut ebpf)?;
        for name in [programs::EGRESS, programs::BENCH_EMPTY] {
            let prog: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        let edge: &mut SchedClassifier = ebpf
            .program_mut(programs::EDGE)
            .ok_or_else(|| anyhow!("program {} missing", programs::EDGE))?
            .try_into()?;
        edge.load()
            .with_context(|| format!("verifier rejected {}", programs::EDGE))?;
        Ok(TestRunner { ebpf, maps, layout })
    }

    /// Configures the guard: blocked CIDRs, mode, default verdict, and policy entries.
    /// `root_level` 0 makes the walk start at the cgroup2 root, so an entry for the
    /// calling thread's cgroup (or any ancestor) applies.
    pub fn configure(
        &mut self,
        blocked: &[Cidr],
        mode: Mode,
        default_verdict: Verdict,
        policy: &BTreeMap<u64, VerdictEntry>,
    ) -> anyhow::Result<()> {
        let mut config = GuardConfig::zeroed();
        config.mode = mode as u32;
        config.default_verdict = default_verdict as u32;
        config.root_level = 0;
        config.events_per_window = 1_000_000;
        config.window_ms = 1000;
        config.tunnels = TunnelConfig::defaults();
        self.maps.reconcile_blocked(blocked)?;
        self.maps.write_config(config, blocked)?;
        self.maps.reconcile_verdicts(policy)?;
        Ok(())
    }

    /// Runs `program` (the guard or the empty floor) on an L3 packet. The kernel wants an
    /// Ethernet header in front; the program sees the packet from the IP header on.
    /// The kernel refuses (EINVAL) IPv4 packets shorter than 20 bytes and IPv6 ones shorter
    /// than 40: its IP layer never hands cgroup_skb such packets either.
    pub fn run(&self, program: &str, l3_packet: &[u8], repeat: u32) -> anyhow::Result<RunResult> {
        let ethertype: u16 = match l3_packet.first().map(|b| b >> 4) {
            Some(6) => 0x86dd,
            _ => 0x0800,
        };
        self.run_ethertype(program, ethertype, l3_packet, repeat)
    }

    /// Like [`TestRunner::run`] with an explicit ethertype (e.g. 0x0806 for ARP).
    pub fn run_ethertype(
        &self,
        program: &str,
        ethertype: u16,
        l3_packet: &[u8],
        repeat: u32,
    ) -> anyhow::Result<RunResult> {
        let mut frame = Vec::with_capacity(14 + l3_packet.len());
        frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2]);
        frame.extend_from_slice(&ethertype.to_be_bytes());
        frame.extend_from_slice(l3_packet);
        let prog: &CgroupSkb = self
            .ebpf
            .program(program)
            .ok_or_else(|| anyhow!("program {program} missing"))?
            .try_into()?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                repeat: repeat.max(1),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program}"))?;
        Ok(RunResult {
            verdict: result.return_value,
            per_run: result.duration,
        })
    }

    /// Runs the pod-edge program on a whole Ethernet frame (VLAN tags allowed) and returns
    /// its tc verdict: -1 (`TC_ACT_UNSPEC`, on to the next program) or 2 (`TC_ACT_SHOT`).
    /// Under test-run the frame comes in on the loopback device, which has no EDGE entry,
    /// so it is judged as a guarded pod's (the program's fail-closed default).
    pub fn run_edge(&self, frame: &[u8]) -> anyhow::Result<i32> {
        let prog: &SchedClassifier = self
            .ebpf
            .program(programs::EDGE)
            .ok_or_else(|| anyhow!("program {} missing", programs::EDGE))?
            .try_into()?;
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                repeat: 1,
                ..TestRunOptions::default()
            })
            .with_context(|| format!("BPF_PROG_TEST_RUN of {}", programs::EDGE))?;
        Ok(result.return_value.cast_signed())
    }

    /// Sets the audit rate limit: `events_per_window` events per cgroup per `window_ms`
    /// (`configure` sets a limit no test reaches).
    pub fn set_audit_rate(&mut self, events_per_window: u32, window_ms: u32) -> anyhow::Result<()> {
        let mut config = self.maps.config()?;
        config.events_per_window = events_per_window;
        config.window_ms = window_ms;
        self.maps.config_set(config)
    }

    /// Takes every audit event waiting in the EVENTS ring buffer (nothing else drains it
    /// under test-run), oldest first.
    pub fn take_audit_events(&mut self) -> anyhow::Result<Vec<AuditEvent>> {
        let map = self
            .ebpf
            .map_mut(names::EVENTS)
            .ok_or_else(|| anyhow!("map {} missing", names::EVENTS))?;
        let mut ring = RingBuf::try_from(map)?;
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            events.push(
                crate::audit::decode(&item)
                    .ok_or_else(|| anyhow!("a ring buffer record of {} bytes", item.len()))?,
            );
        }
        Ok(events)
    }

    /// Replaces the tunnel settings (`configure` sets the default ports, tunnels allowed).
    pub fn set_tunnels(&mut self, tunnels: TunnelConfig) -> anyhow::Result<()> {
        let mut config = self.maps.config()?;
        config.tunnels = tunnels;
        self.maps.config_set(config)
    }

    /// Turns the raw-socket refusal on or off in the config map.
    pub fn set_deny_raw_sockets(&mut self, deny: bool) -> anyhow::Result<()> {
        let mut config = self.maps.config()?;
        config.deny_raw_sockets = u32::from(deny);
        self.maps.config_set(config)
    }

    /// Attaches one of the socket programs (not the egress one, which stays unattached for
    /// test runs) to `cgroup`; it detaches when the returned link is dropped.
    pub fn attach(
        &mut self,
        program: &str,
        cgroup: &std::path::Path,
    ) -> anyhow::Result<aya::programs::links::FdLink> {
        let file =
            std::fs::File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
        super::install::attach(&mut self.ebpf, program, &file)
    }

    /// Attaches one of the bench-only programs ([`programs::BENCH`]: the do-nothing floor
    /// and the fast-path probes) or this runner's own configured copy of the guard
    /// ([`programs::EGRESS`]) to `cgroup`'s egress, as a bpf_link that detaches when
    /// dropped: `cargo xtask bench` runs them under real traffic beside the guard, so the
    /// kernel's per-run statistics compare them on the same kind of packets.
    pub fn attach_bench(
        &mut self,
        name: &str,
        cgroup: &std::path::Path,
    ) -> anyhow::Result<aya::programs::links::FdLink> {
        use aya::programs::{CgroupAttachMode, CgroupSkbAttachType};
        if !programs::BENCH.contains(&name) && name != programs::EGRESS {
            anyhow::bail!("{name} is not a bench-only program");
        }
        let file =
            std::fs::File::open(cgroup).with_context(|| format!("open {}", cgroup.display()))?;
        let prog: &mut CgroupSkb = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?;
        if prog.fd().is_err() {
            prog.load()
                .with_context(|| format!("verifier rejected {name}"))?;
        }
        let id = prog.attach(&file, CgroupSkbAttachType::Egress, CgroupAttachMode::Single)?;
        Ok(prog.take_link(id)?.try_into()?)
    }

    /// The kernel's id of one of this runner's programs (to tell it apart from the same
    /// program loaded by an agent).
    pub fn program_id(&self, name: &str) -> anyhow::Result<u32> {
        let prog: &CgroupSkb = self
            .ebpf
            .program(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?;
        Ok(prog.info()?.id())
    }

    /// Non-zero counters of class 0 (what test runs count into).
    pub fn counters(&self) -> anyhow::Result<Vec<CounterValue>> {
        self.maps.counters([0])
    }

    pub fn stat(&self, stat: Stat) -> anyhow::Result<u64> {
        self.maps.stat(stat)
    }
}

impl Drop for TestRunner {
    fn drop(&mut self) {
        super::install::remove_all_pins(&self.layout);
    }
}

/// What the verifier said about one program of the object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedProgram {
    /// The program's name in the object (see `datalab_guard_common::maps::programs`).
    pub name: String,
    /// Instructions the verifier processed (`verified_insns`), or why there is no count:
    /// the kernel refused the program (the BPF LSM one where the LSM is off) or is older
    /// than 5.16, which does not report the count.
    pub verified: Result<u32, String>,
}

/// Loads every program of the object (maps pinned under `bpffs_dir`, which must not exist
/// yet and is emptied again before returning; nothing is attached) and reads the verifier's
/// instruction count of each, sorted by name.
pub fn verified_instruction_counts(
    bpffs_dir: &std::path::Path,
) -> anyhow::Result<Vec<VerifiedProgram>> {
    let layout = PinLayout::new(bpffs_dir);
    layout.create_dirs()?;
    let result = load_and_count(&layout);
    super::install::remove_all_pins(&layout);
    result
}

fn load_and_count(layout: &PinLayout) -> anyhow::Result<Vec<VerifiedProgram>> {
    let mut ebpf = EbpfLoader::new()
        .default_map_pin_directory(layout.maps_dir())
        .load(OBJECT)
        .context("cannot load the eBPF object")?;
    let mut out = Vec::new();
    for (name, program) in ebpf.programs_mut() {
        let verified = load_program(program)
            .and_then(|()| {
                program
                    .info()
                    .context("BPF_OBJ_GET_INFO_BY_FD")?
                    .verified_instruction_count()
                    .ok_or_else(|| anyhow!("the kernel does not report verified_insns (< 5.16)"))
            })
            .map_err(|e| format!("{e:#}"));
        out.push(VerifiedProgram {
            name: name.to_string(),
            verified,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Loads (verifies) one program of a type the object contains.
fn load_program(program: &mut Program) -> anyhow::Result<()> {
    match program {
        Program::CgroupSkb(p) => p.load()?,
        Program::CgroupSockAddr(p) => p.load()?,
        Program::CgroupSock(p) => p.load()?,
        Program::SchedClassifier(p) => p.load()?,
        Program::LsmCgroup(p) => {
            let btf = Btf::from_sys_fs().context("kernel BTF (/sys/kernel/btf/vmlinux)")?;
            p.load(programs::PACKET_SOCKET_LSM_HOOK, &btf)
                .context("the kernel refused the BPF LSM program")?;
        }
        _ => anyhow::bail!("a program type the guard's object should not contain"),
    }
    Ok(())
}

/// A bpf filesystem of its own for a test or benchmark run, mounted on a fresh directory
/// under the temp dir and unmounted (releasing every pin in it) on drop, so the system's
/// `/sys/fs/bpf` is never touched.
pub struct PrivateBpffs {
    path: std::path::PathBuf,
}

impl PrivateBpffs {
    pub fn mount(prefix: &str) -> anyhow::Result<PrivateBpffs> {
        use std::os::unix::ffi::OsStrExt as _;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("{prefix}-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        let target = std::ffi::CString::new(path.as_os_str().as_bytes())?;
        // SAFETY: valid NUL-terminated strings; data is null.
        if unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                std::ptr::null(),
            )
        } != 0
        {
            let err = std::io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(err).with_context(|| format!("mount -t bpf bpf {}", path.display()));
        }
        Ok(PrivateBpffs { path })
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        use std::os::unix::ffi::OsStrExt as _;
        if let Ok(target) = std::ffi::CString::new(self.path.as_os_str().as_bytes()) {
            // SAFETY: a valid NUL-terminated path.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = std::fs::remove_dir(&self.path);
    }
}
