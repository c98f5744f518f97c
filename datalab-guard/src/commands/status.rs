//! `datalab-guard status`: what is enforced now, read only from the pinned state, so it
//! answers the same whether or not an agent is running.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    time::SystemTime,
};

use aya::programs::links::PinnedLink;
use clap::{Args, ValueEnum};
use datalab_guard_common::{counters::Stat, Mode, Verdict};
use serde_json::json;

use super::Shared;
use crate::{
    blocklist::describe,
    bpf::{
        install::wanted_programs, maps::meta_root_path, object::object_hash, GuardMaps, PinLayout,
    },
    cgroups,
    node::state_file::{EnforcingFrom, ReadStateFile, StateFile, DEFAULT_STATE_FILE, STALE_AFTER},
};

/// Bound on the cgroup directories visited to name the verdict map's entries.
const MAX_CGROUP_WALK: usize = 200_000;

#[derive(Args, Debug)]
pub struct StatusArgs {
    #[arg(long, short, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    /// The node agent's state file (per environment namespace: CNI enforcement as probed
    /// from this node; per pod: verdict); shown when present. NetworkPolicy and Pod Security
    /// state is the controller's: see its metrics and logs.
    #[arg(long, value_name = "FILE", default_value = DEFAULT_STATE_FILE)]
    pub state_file: PathBuf,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputFormat {
    Text,
    Json,
}

pub fn run(shared: &Shared, args: &StatusArgs) -> anyhow::Result<()> {
    let layout = PinLayout::new(&shared.bpffs);
    let mut report = collect(&layout)?;
    // Node mode: the agent's view of each environment namespace's baseline, when the file
    // describes these pins (not a node agent's left beside another --bpffs).
    match StateFile::read_stamped(&args.state_file) {
        Ok(Some(read)) if read.describes(layout.root(), Path::new(super::DEFAULT_BPFFS)) => {
            add_state_file(&mut report, &layout, &read.state, SystemTime::now());
        }
        Ok(Some(read)) => report["state_file_ignored"] = json!(ignored_reason(args, &read)),
        Ok(None) => {}
        Err(e) => report["state_file_error"] = json!(format!("{e:#}")),
    }
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        OutputFormat::Text => print_text(&report),
    }
    if report["enforcing"] == json!(true) {
        Ok(())
    } else {
        Err(anyhow::anyhow!("not enforcing (see above)"))
    }
}

/// Why a state file is not shown: it describes other pins.
fn ignored_reason(args: &StatusArgs, read: &ReadStateFile) -> String {
    let describes = match &read.bpffs {
        Some(dir) => dir.display().to_string(),
        None => format!("{} (written by an older agent)", super::DEFAULT_BPFFS),
    };
    format!(
        "{} describes the pins under {describes}, not these; not shown",
        args.state_file.display()
    )
}

/// Adds the state file (as `environments`), its age, and the exact in-kernel totals per
/// environment namespace (its counter class).
fn add_state_file(
    report: &mut serde_json::Value,
    layout: &PinLayout,
    state: &StateFile,
    now: SystemTime,
) {
    if layout.exists() {
        if let Ok(maps) = GuardMaps::from_pins(layout) {
            let classes = &state.counter_classes;
            if let Ok(values) = maps.counters(classes.keys().copied()) {
                let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
                for v in values {
                    if let Some(ns) = classes.get(&v.class) {
                        *totals.entry(ns).or_insert(0) += v.value;
                    }
                }
                report["namespace_attempts"] = json!(totals);
            }
        }
    }
    report["state_file_age_seconds"] = json!(state.age_secs(now));
    report["state_file_stale"] = json!(state.is_stale(now));
    report["enforcing_from"] = json!(state.enforcing_from);
    report["enforcing_from_text"] = json!(enforcing_from_text(state, now));
    if let Some(written) = state.cache.loaded_written_unix {
        report["cache_age_seconds"] =
            json!(crate::node::state_file::unix_secs(now).saturating_sub(written));
    }
    report["environments"] = serde_json::to_value(state).unwrap_or_default();
}

/// Where the node agent's verdicts come from, as the text form says it.
fn enforcing_from_text(state: &StateFile, now: SystemTime) -> String {
    match state.enforcing_from {
        EnforcingFrom::Api => "API-synced".to_owned(),
        EnforcingFrom::Cache => match state.cache.loaded_written_unix {
            Some(written) => format!(
                "cache/runtime only (cache age {} s)",
                crate::node::state_file::unix_secs(now).saturating_sub(written)
            ),
            None => "cache/runtime only (no cache: unknown pods guarded)".to_owned(),
        },
    }
}

/// The status as JSON (the text form is rendered from it).
pub fn collect(layout: &PinLayout) -> anyhow::Result<serde_json::Value> {
    if !layout.exists() {
        return Ok(
            json!({ "bpffs": layout.root().display().to_string(), "installed": false, "enforcing": false }),
        );
    }
    let maps = GuardMaps::from_pins(layout)?;
    let meta = maps.meta()?;
    let config = maps.config()?;
    let root = meta_root_path(&meta);
    let wanted = wanted_programs(&config);
    let mut links = Vec::new();
    let mut all_attached = true;
    for program in &wanted {
        let attached = PinnedLink::from_pin(layout.link(program)).is_ok();
        all_attached &= attached;
        links.push(json!({ "program": program, "pinned": attached }));
    }
    let root_alive = std::fs::metadata(&root)
        .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == meta.root_cgroup_id);
    let entries = maps.verdicts()?;
    let ids: HashSet<u64> = entries.keys().copied().collect();
    // One walk for every entry: at 10 000 pods a walk per entry would be quadratic.
    let paths = cgroups::paths_by_id(Path::new(&root), &ids, MAX_CGROUP_WALK);
    let mount = cgroups::cgroup2_mount().ok();
    let verdicts: Vec<_> = entries
        .into_iter()
        .map(|(id, entry)| {
            let path = paths.get(&id).map(|p| match &mount {
                Some(m) => format!("/{}", p.strip_prefix(m).unwrap_or(p).display()),
                None => p.display().to_string(),
            });
            json!({
                "cgroup_id": id,
                "cgroup": path,
                "verdict": Verdict::from_raw(entry.verdict).name(),
                "class": entry.class,
            })
        })
        .collect();
    let counters: Vec<_> = maps
        .counters([0])?
        .into_iter()
        .map(|c| json!({ "action": format!("{:?}", c.action).to_lowercase(), "family": c.family.name(), "hook": c.hook.name(), "count": c.value }))
        .collect();
    let complete = meta.complete == 1;
    let raw_paths = crate::bpf::raw_paths::RawPaths::read(layout, config.deny_raw_sockets != 0);
    Ok(json!({
        "raw_paths": raw_paths.label(),
        "raw_paths_text": raw_paths.describe(),
        "edge_interfaces": raw_paths.edge_interfaces,
        "bpffs": layout.root().display().to_string(),
        "installed": true,
        "enforcing": complete && all_attached && root_alive,
        "root": root,
        "root_cgroup_id": meta.root_cgroup_id,
        "root_exists": root_alive,
        "mode": Mode::from_raw(config.mode).name(),
        "default_verdict": Verdict::from_raw(config.default_verdict).name(),
        "deny_raw_sockets": config.deny_raw_sockets != 0,
        "programs_hash": format!("{:016x}", meta.object_hash),
        "programs_match_this_binary": meta.object_hash == object_hash(),
        "attached_unix": meta.attached_unix,
        "links": links,
        "blocked": maps.blocked()?.iter().map(describe).collect::<Vec<_>>(),
        "verdicts": verdicts,
        "counters": counters,
        "audit_events_lost": maps.stat(Stat::EventsLost)?,
        "audit_events_suppressed": maps.stat(Stat::EventsSuppressed)?,
    }))
}

/// A JSON value as text: strings without quotes.
fn s(v: &serde_json::Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
}

fn print_text(r: &serde_json::Value) {
    print_install(r);
    if let Some(error) = r["state_file_error"].as_str() {
        println!("  ! cannot read the node agent's state file: {error}");
    }
    if let Some(ignored) = r["state_file_ignored"].as_str() {
        println!("  node agent state file ignored: {ignored}");
    }
    if let Some(from) = r["enforcing_from_text"].as_str() {
        println!("  verdicts from: {from}");
    }
    if let Some(error) = r["environments"]["cache"]["load_error"].as_str() {
        println!("  ! the state cache was ignored at start: {error}");
    }
    print_environments(r);
    print_pods(r);
    print_net_raw(r);
}

/// The pinned state: headline, config, links, verdict map, counters.
fn print_install(r: &serde_json::Value) {
    if r["installed"] != json!(true) {
        println!("NOT INSTALLED  nothing pinned under {}", s(&r["bpffs"]));
        return;
    }
    let headline = if r["enforcing"] == json!(true) {
        "ENFORCING"
    } else {
        "DEGRADED"
    };
    println!(
        "{headline}  mode={}  root={}  bpffs={}",
        s(&r["mode"]),
        s(&r["root"]),
        s(&r["bpffs"])
    );
    if r["root_exists"] != json!(true) {
        println!("  ! the guarded cgroup no longer exists");
    }
    println!(
        "  default verdict (unknown cgroups): {}",
        s(&r["default_verdict"])
    );
    println!("  raw/packet sockets denied: {}", r["deny_raw_sockets"]);
    println!(
        "  raw paths (AF_PACKET, AF_XDP) closed by: {}",
        s(&r["raw_paths_text"])
    );
    println!(
        "  programs: {}{}",
        s(&r["programs_hash"]),
        if r["programs_match_this_binary"] == json!(true) {
            ""
        } else {
            " (differ from this binary: the next start upgrades them)"
        }
    );
    let blocked: Vec<String> = r["blocked"]
        .as_array()
        .into_iter()
        .flatten()
        .map(s)
        .collect();
    println!("  blocked: {}", blocked.join(", "));
    println!("  links:");
    for link in r["links"].as_array().into_iter().flatten() {
        let mark = if link["pinned"] == json!(true) {
            "attached"
        } else {
            "MISSING"
        };
        println!("    {:<16} {mark}", s(&link["program"]));
    }
    println!(
        "  verdicts ({} entries):",
        r["verdicts"].as_array().map_or(0, Vec::len)
    );
    println!("    {:<8} {:<20} CGROUP", "VERDICT", "CGROUP_ID");
    for p in r["verdicts"].as_array().into_iter().flatten() {
        let path = if p["cgroup"].is_null() {
            "(gone)".to_owned()
        } else {
            s(&p["cgroup"])
        };
        println!(
            "    {:<8} {:<20} {path}",
            s(&p["verdict"]),
            p["cgroup_id"].to_string()
        );
    }
    println!("  counters:");
    let counters = r["counters"].as_array().cloned().unwrap_or_default();
    if counters.is_empty() {
        println!("    (no attempts yet)");
    }
    for c in counters {
        println!(
            "    {:<8} {:<6} {:<12} {}",
            s(&c["action"]),
            s(&c["family"]),
            s(&c["hook"]),
            c["count"]
        );
    }
    println!(
        "  audit events lost: {}  suppressed by rate limit: {}",
        r["audit_events_lost"], r["audit_events_suppressed"]
    );
}

/// The state file's environment namespaces, with its age (and a warning when stale).
fn print_environments(r: &serde_json::Value) {
    if let Some(namespaces) = r["environments"]["namespaces"].as_object() {
        let age = r["state_file_age_seconds"].as_u64().unwrap_or(0);
        println!(
            "  environments (node {}, state written {age}s ago):",
            s(&r["environments"]["node"])
        );
        if r["state_file_stale"] == json!(true) {
            println!(
                "  ! the state file is older than {}s: the node agent is not running or cannot write it; what follows may be out of date",
                STALE_AFTER.as_secs()
            );
        }
        println!("    {:<32} {:<14} ATTEMPTS", "NAMESPACE", "CNI");
        for (ns, st) in namespaces {
            let cni = if st["cni"].is_null() {
                "-".to_owned()
            } else {
                s(&st["cni"])
            };
            let attempts = r["namespace_attempts"][ns.as_str()].as_u64().unwrap_or(0);
            println!("    {ns:<32} {cni:<14} {attempts}");
        }
    }
}

/// The state file's pods: attempts first, then guarded before exempt.
fn print_pods(r: &serde_json::Value) {
    if let Some(pods) = r["environments"]["pods"].as_array() {
        let guarded = pods
            .iter()
            .filter(|p| p["verdict"] == json!("guard"))
            .count();
        println!(
            "  pods on this node: {} guarded, {} exempt",
            guarded,
            pods.len() - guarded
        );
        println!(
            "    {:<7} {:<28} {:<40} {:<24} {:>8}",
            "VERDICT", "NAMESPACE", "POD", "WHY", "ATTEMPTS"
        );
        let mut rows: Vec<&serde_json::Value> = pods.iter().collect();
        // Pods with attempts first, then guarded before exempt.
        rows.sort_by_key(|p| {
            (
                std::cmp::Reverse(p["audited_attempts"].as_u64().unwrap_or(0)),
                p["verdict"] != json!("guard"),
                s(&p["namespace"]),
                s(&p["pod"]),
            )
        });
        for p in rows {
            let cgroup = if p["cgroup_id"].is_null() {
                " (no cgroup yet)"
            } else {
                ""
            };
            println!(
                "    {:<7} {:<28} {:<40} {:<24} {:>8}{cgroup}",
                s(&p["verdict"]),
                s(&p["namespace"]),
                s(&p["pod"]),
                s(&p["reason"]),
                p["audited_attempts"].as_u64().unwrap_or(0).to_string()
            );
        }
    }
}

/// The state file's guarded pods holding CAP_NET_RAW with raw paths open (node mode).
fn print_net_raw(r: &serde_json::Value) {
    for line in net_raw_lines(r) {
        println!("{line}");
    }
}

/// [`print_net_raw`]'s lines: the rows the agent wrote (at most `node::net_raw::MAX_ROWS`)
/// and how many more there are; nothing outside node mode.
fn net_raw_lines(r: &serde_json::Value) -> Vec<String> {
    if !r["environments"].is_object() {
        return Vec::new();
    }
    let title = "guarded pods holding CAP_NET_RAW with raw paths open";
    let report = &r["environments"]["net_raw"];
    let Some(total) = report["total"].as_u64() else {
        return vec![format!("  {title}: not counted yet")];
    };
    if total == 0 {
        return vec![format!("  {title}: none")];
    }
    let mut lines = vec![
        format!("  {title}: {total} (drop NET_RAW from them: Kyverno policy datalab-drop-net-raw)"),
        format!(
            "    {:<28} {:<40} WHY THE EDGE LAYER DOES NOT COVER IT",
            "NAMESPACE", "POD"
        ),
    ];
    let rows = report["pods"].as_array().cloned().unwrap_or_default();
    for p in &rows {
        let pod = match s(&p["pod"]) {
            name if name.is_empty() => format!("(uid {})", s(&p["uid"])),
            name => name,
        };
        lines.push(format!(
            "    {:<28} {pod:<40} {}",
            s(&p["namespace"]),
            s(&p["edge"])
        ));
    }
    let more = total.saturating_sub(rows.len() as u64);
    if more > 0 {
        lines.push(format!(
            "    ... and {more} more (datalab_guard_guarded_pods_with_net_raw counts them all)"
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;
    use crate::node::cache::CacheReport;

    #[test]
    fn net_raw_rows_say_how_many_more_and_nothing_outside_node_mode() {
        assert!(
            net_raw_lines(&json!({})).is_empty(),
            "local mode: no node state"
        );
        let node = |net_raw: serde_json::Value| json!({ "environments": { "net_raw": net_raw } });
        assert_eq!(
            net_raw_lines(&node(serde_json::Value::Null)),
            ["  guarded pods holding CAP_NET_RAW with raw paths open: not counted yet"]
        );
        assert_eq!(
            net_raw_lines(&node(json!({ "total": 0, "pods": [] }))),
            ["  guarded pods holding CAP_NET_RAW with raw paths open: none"]
        );
        let lines = net_raw_lines(&node(json!({ "total": 3, "pods": [
            { "namespace": "tenant-a", "pod": "nb", "uid": "u1", "edge": "host_network" },
            { "namespace": "", "pod": "", "uid": "u2", "edge": "pending" },
        ] })));
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(lines[0]
            .ends_with("open: 3 (drop NET_RAW from them: Kyverno policy datalab-drop-net-raw)"));
        assert!(
            lines[2].contains("tenant-a")
                && lines[2].contains("nb")
                && lines[2].ends_with("host_network")
        );
        assert!(lines[3].contains("(uid u2)"), "{}", lines[3]);
        assert_eq!(
            lines[4],
            "    ... and 1 more (datalab_guard_guarded_pods_with_net_raw counts them all)"
        );
    }

    #[test]
    fn says_where_the_verdicts_come_from() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        let mut state = StateFile::default();
        assert_eq!(enforcing_from_text(&state, now), "API-synced");
        state.enforcing_from = EnforcingFrom::Cache;
        assert_eq!(
            enforcing_from_text(&state, now),
            "cache/runtime only (no cache: unknown pods guarded)"
        );
        state.cache = CacheReport {
            loaded_written_unix: Some(958),
            ..CacheReport::default()
        };
        assert_eq!(
            enforcing_from_text(&state, now),
            "cache/runtime only (cache age 42 s)"
        );
    }
}
