//! End to end: what the socket hooks judge by the calling task and what egress judges by the
//! socket, pinned down exactly so that a change to either is visible. Needs root.
//!
//! A socket connected by an exempt process and handed over (SCM_RIGHTS) to a guarded one
//! keeps the exempt verdict for data sent on it: egress is judged by the socket's cgroup,
//! and the kernel does not tell the egress program which task sent a packet (see README,
//! "Security model"). Everything that names a destination (connect, sendto) is judged by
//! the calling task and refused.

use std::time::Duration;

use datalab_guard_tests::{
    free_loopback_addr, process::spawn_in, require_root, Agent, BpffsDir, Lab, TestCgroup,
};

/// The exempt parent connects a TCP and a UDP socket to the metadata address and hands
/// both to a child that first moves itself into the guarded cgroup; the child reports, per
/// attempt, `ok` or the errno name, as one JSON object.
const HANDOVER: &str = r#"
import errno, json, os, socket, sys
addr, guarded_procs = sys.argv[1], sys.argv[2]
parent_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

def attempt(results, name, action):
    try:
        results[name] = action()
    except OSError as e:
        results[name] = errno.errorcode.get(e.errno, str(e))

pid = os.fork()
if pid == 0:
    parent_end.close()
    with open(guarded_procs, "w") as f:
        f.write(str(os.getpid()))
    child_end.sendall(b"moved")
    _, fds, _, _ = socket.recv_fds(child_end, 16, 2)
    tcp = socket.socket(fileno=fds[0])
    udp = socket.socket(fileno=fds[1])
    tcp.settimeout(3)
    udp.settimeout(3)
    r = {}
    def tcp_send():
        tcp.sendall(b"GET /latest/meta-data/iam/security-credentials/ HTTP/1.0\r\nHost: x\r\n\r\n")
        body = b""
        while True:
            chunk = tcp.recv(4096)
            if not chunk:
                break
            body += chunk
        return "ok:credentials" if b"FAKEAKIA" in body else "ok:no-credentials"
    attempt(r, "tcp_send_on_handed_over", tcp_send)
    def udp_send():
        udp.send(b"handed-over")
        return "ok:echo" if udp.recv(64) == b"handed-over" else "ok:no-echo"
    attempt(r, "udp_send_on_handed_over", udp_send)
    attempt(r, "udp_sendto_on_handed_over", lambda: udp.sendto(b"x", (addr, 80)) and "ok")
    attempt(r, "udp_connect_on_handed_over", lambda: udp.connect((addr, 80)) or "ok")
    own = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    own.settimeout(3)
    attempt(r, "tcp_connect_own", lambda: own.connect((addr, 80)) or "ok")
    print(json.dumps(r, sort_keys=True))
    sys.exit(0)
child_end.close()
assert parent_end.recv(16) == b"moved"
tcp = socket.create_connection((addr, 80), timeout=3)
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.connect((addr, 80))
socket.send_fds(parent_end, [b"fds"], [tcp.fileno(), udp.fileno()])
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"#;

/// Data on a handed-over connected socket gets through (the documented limit); every
/// attempt that names the destination is refused with EPERM, from the guarded task.
#[test]
fn handed_over_sockets_keep_the_exempt_verdict_for_data_only() {
    if !require_root() {
        return;
    }
    let mut lab = Lab::new().expect("lab");
    lab.start_fake_imds().expect("fake imds");
    let cgroup = TestCgroup::new().expect("cgroup");
    let guarded = cgroup.child("tenant").expect("tenant cgroup");
    let exempt = cgroup.child("exempt").expect("exempt cgroup");
    let bpffs = BpffsDir::new().expect("bpffs");
    let metrics = free_loopback_addr().expect("port");
    let pins = bpffs.path().join("guard").display().to_string();
    let mut agent = Agent::spawn(&[
        "local",
        "--cgroup",
        &cgroup.path().display().to_string(),
        "--exempt",
        &exempt.display().to_string(),
        "--bpffs",
        &pins,
        "--metrics-addr",
        &metrics.to_string(),
    ])
    .expect("spawn agent");
    agent
        .wait_ready(metrics, Duration::from_secs(20))
        .expect("agent ready");

    let procs = guarded.join("cgroup.procs").display().to_string();
    let child = spawn_in(
        &exempt,
        Some(lab.tenant_ns()),
        &["python3", "-c", HANDOVER, "169.254.169.254", procs.as_str()],
    )
    .expect("spawn handover");
    let out = child.wait_with_output().expect("handover output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "handover failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Value =
        serde_json::from_str(stdout.trim()).expect("one JSON line of results");
    let expected = serde_json::json!({
        // Not covered: data on a connected socket an exempt process handed over.
        "tcp_send_on_handed_over": "ok:credentials",
        "udp_send_on_handed_over": "ok:echo",
        // Covered: the guarded task names the destination itself.
        "udp_sendto_on_handed_over": "EPERM",
        "udp_connect_on_handed_over": "EPERM",
        "tcp_connect_own": "EPERM",
    });
    assert_eq!(results, expected);

    // The three refusals were counted at the socket hooks, none at egress.
    let text = agent.metrics(metrics).expect("metrics");
    let count = |hook: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with("datalab_guard_blocked_total{"))
            .filter(|l| l.contains(&format!("hook=\"{hook}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum()
    };
    assert_eq!(count("connect"), 2, "{text}");
    assert_eq!(count("sendmsg"), 1, "{text}");
    assert_eq!(count("egress"), 0, "{text}");
}
