//! The report's section on the datapath's cost under real traffic: the kernel's per-run
//! statistics of the guard and of the do-nothing program over the same iperf3 runs, and the
//! small-packet (UDP, 64-byte payload) rates.

use super::{
    progstats::Program,
    stats::{summarize, Summary},
    throughput::{Config, ThroughputResults, Traffic},
};

/// The guard may cost at most this much more per run than the do-nothing program.
pub const REAL_TRAFFIC_BUDGET_NS: f64 = 5.0;

fn ns(s: Option<Summary>) -> String {
    s.map_or("?".into(), |s| {
        format!("{:.1} ({:.1}–{:.1})", s.median, s.min, s.max)
    })
}

/// The section's markdown.
pub fn markdown(t: &ThroughputResults) -> String {
    let mut s = String::from(
        "## Per-run cost under real traffic (kernel statistics)\n\n\
         `kernel.bpf_stats_enabled` (BPF_ENABLE_STATS) during the same iperf3 runs: the guard's \
         `cgroup_skb` egress program judges (a)'s packets; a do-nothing `cgroup_skb` egress \
         program (`dg_bench_empty`, returns 1) is attached to the unguarded cgroup and judges \
         (b)'s and (c)'s; the pod-edge program (`dg_edge`, tc ingress of the veth's host side) \
         judges (d)'s on their way out of the tenant namespace, after the do-nothing program. \
         Each run's cost is the program's run-time delta over its run-count \
         delta across that run. The kernel's own timing (two clock reads per run) is in both \
         numbers; their difference is the guard's cost. TCP runs carry GSO-sized packets, so \
         runs are far fewer than wire packets; UDP runs are one run per 64-byte datagram.\n\n\
         | traffic | (a) guard ns/run: median (min–max) | (b) do-nothing ns/run | (c) do-nothing ns/run | (d) dg_edge ns/run | guard − do-nothing, per round: median (min–max) |\n\
         |---|---:|---:|---:|---:|---:|\n",
    );
    for traffic in Traffic::ALL {
        let cost = |c| summarize(&t.costs(traffic, c));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            traffic.id(),
            ns(cost(Config::Guarded)),
            ns(cost(Config::Unguarded)),
            ns(cost(Config::Nftables)),
            ns(cost(Config::Edge)),
            ns(summarize(&t.cost_deltas(traffic))),
        ));
    }
    s.push_str(
        "\nWhere the guard's time goes: on (b)'s packets, beside the do-nothing program, two \
         probes that each do one memory touch of the guard's fast path (`dg_bench_config`: the \
         CONFIG lookup and one word of its prefilter bitmap; `dg_bench_packet`: the bounds \
         check and the destination's first byte) and one that runs the guard's whole fast path \
         without the rest of the guard (`dg_bench_fast`), and a second copy of the whole guard \
         program loaded by the bench with its own maps (`dg_egress_copy`, exempt by default). \
         Each is timed on its own by the kernel; they run after the do-nothing program, in \
         that order, on the same packets. With `--probes-on-guarded`, also on (a)'s packets \
         just before the guard: the same probes, and a second instance of the guard program \
         loaded by the bench over the agent's own pinned maps (`dg_egress_agent_maps`): the \
         agent's code, data, cgroup and packets, only the program instance differs.\n\n\
         | traffic | do-nothing ns/run | CONFIG read probe | packet read probe | whole fast path probe | guard copy | guard instance on the agent's maps | guard on (a) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for traffic in Traffic::ALL {
        let median = |v: Vec<f64>| summarize(&v).map_or("?".into(), |s| format!("{:.1}", s.median));
        let probe = |config, p| median(t.probe_costs(traffic, config, p));
        s.push_str(&format!(
            "| {} on (b) | {} | {} | {} | {} | {} | – | {} |\n",
            traffic.id(),
            median(t.costs(traffic, Config::Unguarded)),
            probe(Config::Unguarded, Program::ConfigProbe),
            probe(Config::Unguarded, Program::PacketProbe),
            probe(Config::Unguarded, Program::FastPathProbe),
            probe(Config::Unguarded, Program::GuardCopy),
            median(t.costs(traffic, Config::Guarded)),
        ));
        if !t
            .probe_costs(traffic, Config::Guarded, Program::Floor)
            .is_empty()
        {
            s.push_str(&format!(
                "| {} on (a), before the guard (`--probes-on-guarded`) | {} | {} | {} | {} | {} | {} | {} |\n",
                traffic.id(),
                probe(Config::Guarded, Program::Floor),
                probe(Config::Guarded, Program::ConfigProbe),
                probe(Config::Guarded, Program::PacketProbe),
                probe(Config::Guarded, Program::FastPathProbe),
                probe(Config::Guarded, Program::GuardCopy),
                probe(Config::Guarded, Program::GuardOnAgentMaps),
                median(t.costs(traffic, Config::Guarded)),
            ));
        }
    }
    s.push_str(
        "\nSmall packets: UDP, 64-byte payloads, `iperf3 -u -l 64 -b 0` (as fast as one \
         sender can), same clients and rounds.\n\n\
         | client | sent kpps: median (min–max) | received kpps (median) | sent vs (b) |\n\
         |---|---:|---:|---:|\n",
    );
    let base = summarize(&t.sent_pps(Config::Unguarded)).map(|b| b.median);
    for c in Config::ALL {
        let sent = summarize(&t.sent_pps(c));
        let received: Vec<f64> = t
            .runs_of(Traffic::Udp64, c)
            .filter_map(|r| r.received_pps)
            .collect();
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            c.label(),
            sent.map_or("?".into(), |p| format!(
                "{:.0} ({:.0}–{:.0})",
                p.median / 1e3,
                p.min / 1e3,
                p.max / 1e3
            )),
            summarize(&received).map_or("?".into(), |p| format!("{:.0}", p.median / 1e3)),
            match (sent, base) {
                (Some(p), Some(b)) if b > 0.0 => format!("{:.3}", p.median / b),
                _ => "?".into(),
            },
        ));
    }
    s.push('\n');
    s
}

/// The target's measurement: per traffic kind the median guard − do-nothing difference, and
/// the worse of the two (None when either was not measured).
pub fn target(t: &ThroughputResults) -> (String, Option<f64>) {
    let per: Vec<(Traffic, Option<f64>)> = Traffic::ALL
        .iter()
        .map(|&k| (k, summarize(&t.cost_deltas(k)).map(|d| d.median)))
        .collect();
    let measured = per
        .iter()
        .map(|(k, d)| {
            format!(
                "{} {}",
                k.id(),
                d.map_or("?".into(), |d| format!("{d:+.1} ns"))
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let worst = per
        .iter()
        .try_fold(f64::NEG_INFINITY, |acc, (_, d)| d.map(|d| acc.max(d)));
    (measured, worst)
}
