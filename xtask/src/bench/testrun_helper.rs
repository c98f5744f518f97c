//! `xtask-bench-testrun`: the BPF_PROG_TEST_RUN half of `cargo xtask bench`, as a binary of
//! its own (feature `bench-testrun`; see xtask/Cargo.toml for why).
//!
//! Loads the real eBPF object (unattached, maps pinned under `--bpffs`), configures it as the
//! agent would by default (blocked set 169.254.169.254/32 and fd00:ec2::254/128, enforce,
//! unknown cgroups guarded, no policy entries: this process's cgroup is judged "guard"), and
//! runs the empty floor program and the guard on the same packets in alternating rounds.
//! Prints one JSON document with every raw sample on stdout; `cargo xtask bench` does the
//! statistics. Nothing is attached, so nothing outside the pin directory is touched.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use clap::Parser;
use datalab_guard::{
    blocklist::{parse_cidr, DEFAULT_BLOCKED},
    bpf::testrun::TestRunner,
};
use datalab_guard_common::{counters::Stat, maps::programs, Mode, Verdict};
use serde_json::json;

/// Runs the test-run benchmark and prints raw samples as JSON.
#[derive(Debug, Parser)]
struct Args {
    /// A bpffs path that does not exist yet; the maps are pinned there and removed at exit.
    #[arg(long)]
    bpffs: PathBuf,
    /// Rounds; each round runs every case once, in an order rotated per round.
    #[arg(long, default_value_t = 21)]
    rounds: u32,
    /// Program runs per case per round (the kernel reports their mean).
    #[arg(long, default_value_t = 1_000_000)]
    repeat: u32,
}

const TCP: u8 = 6;
const UDP: u8 = 17;

/// IPv4 + a 20-byte TCP header (SYN), 192.0.2.2:40000 -> dst:80, no IP options.
fn v4_tcp(dst: [u8; 4]) -> Vec<u8> {
    let mut p = vec![0u8; 40];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&40u16.to_be_bytes());
    p[6] = 0x40; // DF
    p[8] = 64;
    p[9] = TCP;
    p[12..16].copy_from_slice(&[192, 0, 2, 2]);
    p[16..20].copy_from_slice(&dst);
    tcp_header(&mut p[20..]);
    p
}

/// IPv6 + a 20-byte TCP header (SYN), 2001:db8::2 -> dst:80, no extension headers.
fn v6_tcp(dst: [u8; 16]) -> Vec<u8> {
    let mut p = vec![0u8; 60];
    p[0] = 0x60;
    p[4..6].copy_from_slice(&20u16.to_be_bytes());
    p[6] = TCP;
    p[7] = 64;
    p[8..24].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    p[24..40].copy_from_slice(&dst);
    tcp_header(&mut p[40..]);
    p
}

fn tcp_header(t: &mut [u8]) {
    t[0..2].copy_from_slice(&40000u16.to_be_bytes());
    t[2..4].copy_from_slice(&80u16.to_be_bytes());
    t[12] = 5 << 4;
    t[13] = 0x02; // SYN
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
}

/// One benchmarked (program, packet) pair.
struct Case {
    id: &'static str,
    label: &'static str,
    /// `empty` (the floor), `pass` (guard, passed packet) or `block` (guard, dropped packet).
    role: &'static str,
    family: &'static str,
    program: &'static str,
    packet: Vec<u8>,
    packet_desc: &'static str,
    expected: u32,
}

fn cases() -> Vec<Case> {
    let imds6 = [
        0xfd, 0, 0x0e, 0xc2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x02, 0x54,
    ];
    let other6 = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    let case = |id, label, role, family, program, packet, packet_desc, expected| Case {
        id,
        label,
        role,
        family,
        program,
        packet,
        packet_desc,
        expected,
    };
    vec![
        case(
            "empty_v4",
            "empty program, v4 packet",
            "empty",
            "v4",
            programs::BENCH_EMPTY,
            v4_tcp([192, 0, 2, 1]),
            "IPv4 TCP SYN to 192.0.2.1:80",
            1,
        ),
        case(
            "empty_v6",
            "empty program, v6 packet",
            "empty",
            "v6",
            programs::BENCH_EMPTY,
            v6_tcp(other6),
            "IPv6 TCP SYN to [2001:db8::1]:80",
            1,
        ),
        case(
            "guard_pass_v4",
            "guard, passed v4 (fast path)",
            "pass",
            "v4",
            programs::EGRESS,
            v4_tcp([192, 0, 2, 1]),
            "IPv4 TCP SYN to 192.0.2.1:80",
            1,
        ),
        case(
            "guard_pass_v6",
            "guard, passed v6 (fast path)",
            "pass",
            "v6",
            programs::EGRESS,
            v6_tcp(other6),
            "IPv6 TCP SYN to [2001:db8::1]:80",
            1,
        ),
        case(
            "guard_block_v4",
            "guard, blocked v4",
            "block",
            "v4",
            programs::EGRESS,
            v4_tcp([169, 254, 169, 254]),
            "IPv4 TCP SYN to 169.254.169.254:80",
            0,
        ),
        case(
            "guard_block_v6",
            "guard, blocked v6",
            "block",
            "v6",
            programs::EGRESS,
            v6_tcp(imds6),
            "IPv6 TCP SYN to [fd00:ec2::254]:80",
            0,
        ),
        // UDP must stay on the fast path although UDP to a tunnel port leaves it.
        case(
            "guard_pass_udp_v4",
            "guard, passed v4 UDP (fast path)",
            "pass",
            "v4",
            programs::EGRESS,
            udp_query(v4_tcp([192, 0, 2, 1]), 20),
            "IPv4 UDP to 192.0.2.1:53, 32 bytes",
            1,
        ),
        case(
            "guard_pass_udp_v6",
            "guard, passed v6 UDP (fast path)",
            "pass",
            "v6",
            programs::EGRESS,
            udp_query(v6_tcp(other6), 40),
            "IPv6 UDP to [2001:db8::1]:53, 32 bytes",
            1,
        ),
    ]
}

/// The TCP packet turned into a UDP datagram to port 53 with 32 bytes of payload.
fn udp_query(mut p: Vec<u8>, l4: usize) -> Vec<u8> {
    p.truncate(l4);
    if l4 == 20 {
        p[9] = UDP;
        p[2..4].copy_from_slice(&((20 + 8 + 32) as u16).to_be_bytes());
    } else {
        p[6] = UDP;
        p[4..6].copy_from_slice(&((8 + 32) as u16).to_be_bytes());
    }
    p.extend_from_slice(&40000u16.to_be_bytes());
    p.extend_from_slice(&53u16.to_be_bytes());
    p.extend_from_slice(&40u16.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&[0x5a; 32]);
    p
}

/// In-kernel counters read around each run: which path the packets took.
#[derive(Default, Clone, Copy)]
struct Paths {
    slow_path_passed: u64,
    events_lost: u64,
    events_suppressed: u64,
    counted: u64,
}

impl Paths {
    fn read(r: &TestRunner) -> Result<Paths> {
        Ok(Paths {
            slow_path_passed: r.stat(Stat::SlowPathPassed)?,
            events_lost: r.stat(Stat::EventsLost)?,
            events_suppressed: r.stat(Stat::EventsSuppressed)?,
            counted: r.counters()?.iter().map(|c| c.value).sum(),
        })
    }

    fn add_delta(&mut self, before: Paths, after: Paths) {
        self.slow_path_passed += after.slow_path_passed - before.slow_path_passed;
        self.events_lost += after.events_lost - before.events_lost;
        self.events_suppressed += after.events_suppressed - before.events_suppressed;
        self.counted += after.counted - before.counted;
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.rounds == 0 || args.repeat == 0 {
        bail!("--rounds and --repeat must be at least 1");
    }
    let blocked = DEFAULT_BLOCKED
        .iter()
        .map(|c| parse_cidr(c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut runner = TestRunner::new(&args.bpffs).context("loading the eBPF object")?;
    runner.configure(&blocked, Mode::Enforce, Verdict::Guard, &Default::default())?;

    let cases = cases();
    // Warm-up: JIT'd code, maps and the packet path in cache before anything is measured.
    for c in &cases {
        let r = runner.run(c.program, &c.packet, (args.repeat / 10).max(1))?;
        if r.verdict != c.expected {
            bail!(
                "{} returned {} on {}, expected {}: the benchmark would measure the wrong path",
                c.label,
                r.verdict,
                c.packet_desc,
                c.expected
            );
        }
    }

    let n = cases.len();
    let mut ns = vec![Vec::new(); n];
    let mut verdicts = vec![Vec::new(); n];
    let mut paths = vec![Paths::default(); n];
    for round in 0..args.rounds as usize {
        for k in 0..n {
            let i = (round + k) % n;
            let c = &cases[i];
            let before = Paths::read(&runner)?;
            let r = runner.run(c.program, &c.packet, args.repeat)?;
            paths[i].add_delta(before, Paths::read(&runner)?);
            ns[i].push(r.per_run.as_nanos() as u64);
            verdicts[i].push(r.verdict);
        }
    }

    let out: Vec<_> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "id": c.id,
                "label": c.label,
                "role": c.role,
                "family": c.family,
                "program": c.program,
                "packet": c.packet_desc,
                "packet_bytes": c.packet.len(),
                "expected_verdict": c.expected,
                "verdicts": verdicts[i],
                "ns": ns[i],
                "slow_path_passed": paths[i].slow_path_passed,
                "events_lost": paths[i].events_lost,
                "events_suppressed": paths[i].events_suppressed,
                "counted": paths[i].counted,
            })
        })
        .collect();
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let cgroup = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("?")
        .to_string();
    let doc = json!({
        "rounds": args.rounds,
        "repeat": args.repeat,
        "cgroup": cgroup,
        "cases": out,
    });
    println!("{doc}");
    drop(runner);
    Ok(())
}
