//! `cargo xtask demo`: datalab-guard's local mode, end to end, in a sandbox.
//!
//! Builds a network lab (a tenant namespace and a fake metadata host serving fake
//! credentials on 169.254.169.254 and fd00:ec2::254), a cgroup tree `demo/` with children
//! `tenant/` (guarded) and `exempt/`, and a private bpffs directory; starts
//! `datalab-guard local --cgroup demo --exempt demo/exempt` against them; then tries to reach
//! the metadata endpoint from both cgroups and prints what happened, how many packets reached
//! the metadata host, the agent's audit lines and metrics, and `datalab-guard status`; then
//! uninstalls and removes everything (also on failure: the kit cleans up on drop).
//!
//! `--no-agent` runs the same attempts without datalab-guard: the unguarded baseline, where
//! every attempt reaches the fake metadata server.

use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::{bail, Context as _, Result};
use datalab_guard_tests::{
    cleanup_stale, free_loopback_addr,
    lab::{IMDS_V4, IMDS_V6, OTHER_V4},
    Agent, BpffsDir, Lab, ProbeResult, TestCgroup,
};

use crate::{artifacts, setup, test::require_root};

/// Name prefix of everything the demo creates (so stale leftovers can be found).
const PREFIX: &str = "dgdemo";

/// Options of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Run the attempts without datalab-guard (the unguarded baseline).
    #[arg(long)]
    pub no_agent: bool,
}

/// One attempt of the demo.
struct Attempt {
    label: &'static str,
    from: Origin,
    kind: &'static str,
    addr: IpAddr,
    blocked: bool,
}

#[derive(Clone, Copy)]
enum Origin {
    Tenant,
    Exempt,
}

impl Origin {
    fn name(self) -> &'static str {
        match self {
            Origin::Tenant => "tenant/",
            Origin::Exempt => "exempt/",
        }
    }
}

fn attempts() -> Vec<Attempt> {
    vec![
        Attempt {
            label: "HTTP to IMDS (v4)",
            from: Origin::Tenant,
            kind: "http",
            addr: IMDS_V4.into(),
            blocked: true,
        },
        Attempt {
            label: "TCP to IMDS (v6)",
            from: Origin::Tenant,
            kind: "tcp",
            addr: IMDS_V6.into(),
            blocked: true,
        },
        Attempt {
            label: "UDP to IMDS (v4)",
            from: Origin::Tenant,
            kind: "udp-sendto",
            addr: IMDS_V4.into(),
            blocked: true,
        },
        Attempt {
            label: "HTTP to 192.0.2.1",
            from: Origin::Tenant,
            kind: "http",
            addr: OTHER_V4.into(),
            blocked: false,
        },
        Attempt {
            label: "HTTP to IMDS (v4)",
            from: Origin::Exempt,
            kind: "http",
            addr: IMDS_V4.into(),
            blocked: false,
        },
    ]
}

/// Runs the demo; fails if any attempt's outcome differs from what is expected.
pub fn run(args: &DemoArgs) -> Result<()> {
    setup::run_all()?;
    require_root("cargo xtask demo");
    let bins = if args.no_agent {
        artifacts::build_bins(&["datalab-guard-tests"])?
    } else {
        artifacts::build_bins(&[])?
    };
    for (var, path) in bins.kit_env() {
        std::env::set_var(var, path);
    }
    let removed = cleanup_stale(PREFIX)?;
    if removed > 0 {
        println!("demo: removed {removed} leftover(s) of an earlier interrupted demo");
    }

    println!("\n== sandbox");
    let mut lab = Lab::with_prefix(PREFIX).context("building the network lab")?;
    lab.start_fake_imds()?;
    let demo = TestCgroup::with_prefix(PREFIX)?;
    let tenant = demo.child("tenant")?;
    let exempt = demo.child("exempt")?;
    let bpffs = BpffsDir::with_prefix(PREFIX)?;
    let pins = bpffs.path().join("datalab-guard");
    println!(
        "network namespaces: {} (tenant), {} (fake metadata host)",
        lab.tenant_ns(),
        lab.imds_ns()
    );
    println!(
        "cgroups:            {} (demo/), tenant/ guarded, exempt/ exempt",
        demo.path().display()
    );
    println!("bpffs:              {}", pins.display());

    let metrics = free_loopback_addr()?;
    let mut agent = None;
    if !args.no_agent {
        let argv = vec![
            "local".to_string(),
            "--cgroup".into(),
            demo.path().display().to_string(),
            "--exempt".into(),
            exempt.display().to_string(),
            "--bpffs".into(),
            pins.display().to_string(),
            "--metrics-addr".into(),
            metrics.to_string(),
            "--log-format".into(),
            "json".into(),
        ];
        println!("\n== starting: datalab-guard {}", argv.join(" "));
        let mut a = Agent::spawn(&argv)?;
        a.wait_ready(metrics, Duration::from_secs(30))?;
        println!("ready (http://{metrics}/readyz answered 200)");
        agent = Some(a);
    }

    println!("\n== attempts");
    let mut rows = Vec::new();
    let mut surprises = Vec::new();
    for a in attempts() {
        let cgroup: &Path = match a.from {
            Origin::Tenant => &tenant,
            Origin::Exempt => &exempt,
        };
        let expect_blocked = a.blocked && !args.no_agent;
        let before = lab.counters()?;
        let r = lab.probe_timeout(cgroup, a.kind, a.addr, 80, 2000)?;
        let after = lab.counters()?;
        let arrived = after.to(a.addr).unwrap_or(0) - before.to(a.addr).unwrap_or(0);
        let outcome = describe(&r);
        let as_expected = if expect_blocked {
            !r.ok && arrived == 0
        } else {
            r.ok
        };
        if !as_expected {
            surprises.push(format!("{} from {}: {}", a.label, a.from.name(), r.raw));
        }
        rows.push([
            a.label.to_string(),
            a.from.name().to_string(),
            if expect_blocked { "blocked" } else { "allowed" }.to_string(),
            format!(
                "{outcome}{}",
                if as_expected { "" } else { "  <-- UNEXPECTED" }
            ),
            format!("{:.1} ms", r.elapsed_ms),
            arrived.to_string(),
        ]);
    }
    print_table(
        &[
            "attempt",
            "from",
            "expected",
            "result",
            "elapsed",
            "packets at metadata host",
        ],
        &rows,
    );
    println!("(packets at metadata host: packets to the attempt's destination counted on the fake host's ingress)");

    if let Some(mut a) = agent {
        // The audit consumer is asynchronous; give it a moment.
        std::thread::sleep(Duration::from_millis(1500));
        println!("\n== audit lines (agent stdout)");
        for l in a.stdout_lines() {
            println!("{l}");
        }
        println!("\n== metrics (datalab_guard_*)");
        match a.metrics(metrics) {
            Ok(text) => text
                .lines()
                .filter(|l| l.starts_with("datalab_guard_"))
                .for_each(|l| println!("{l}")),
            Err(e) => surprises.push(format!("GET /metrics: {e:#}")),
        }
        println!("\n== datalab-guard status --bpffs {}", pins.display());
        print_output(
            &Agent::run(&["status", "--bpffs", &pins.display().to_string()])?,
            &mut surprises,
            "status",
        );

        println!("\n== stopping the agent (SIGTERM); the pinned programs stay in force");
        a.sigterm()?;
        let status = a.wait_exit(Duration::from_secs(10))?;
        println!("agent exited: {status}");
        println!("\n== datalab-guard uninstall --bpffs {}", pins.display());
        print_output(
            &Agent::run(&["uninstall", "--bpffs", &pins.display().to_string()])?,
            &mut surprises,
            "uninstall",
        );
        let r = lab.probe_timeout(&tenant, "http", IMDS_V4, 80, 2000)?;
        println!(
            "after uninstall, HTTP to IMDS from tenant/: {}",
            describe(&r)
        );
        if !r.ok {
            surprises.push(format!(
                "after uninstall the tenant should reach IMDS again: {}",
                r.raw
            ));
        }
    }

    println!("\n== cleaning up (namespaces, cgroups, pins)");
    drop(bpffs);
    drop(demo);
    drop(lab);
    if !surprises.is_empty() {
        bail!(
            "the demo did not go as expected:\n  {}",
            surprises.join("\n  ")
        );
    }
    println!("demo finished: every attempt went as expected");
    Ok(())
}

fn describe(r: &ProbeResult) -> String {
    match (r.ok, r.errno) {
        (true, _) => "allowed".into(),
        (false, Some(libc::EPERM)) => "blocked (EPERM)".into(),
        (false, Some(libc::ETIMEDOUT)) => "blocked (timed out: dropped)".into(),
        (false, _) => format!("failed: {}", r.error.as_deref().unwrap_or("?")),
    }
}

fn print_output(out: &std::process::Output, surprises: &mut Vec<String>, what: &str) {
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        surprises.push(format!("datalab-guard {what} exited with {}", out.status));
    }
}

fn print_table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(header.to_vec());
    line(
        widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    );
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
