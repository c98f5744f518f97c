//! The audit record: reading [`AuditEvent`]s from the EVENTS ring buffer, turning each into
//! the JSON object DESIGN.md specifies, and writing those as lines on stdout.
//!
//! What a record may contain is fixed here and nowhere else: the event's own fields, the
//! attribution the caller resolved (namespace, pod, ...), and the task's `comm` sanitized to
//! printable ASCII. Nothing else is read from the process or its environment (no cmdline,
//! no env), because a tenant controls all of those.
//!
//! `pid` is the process id (tgid) in the host's initial pid namespace, as the kernel helper
//! reports it; the agent's own pid namespace may number processes differently.

use std::{
    io::{self, Write},
    mem::size_of,
    net::{Ipv4Addr, Ipv6Addr},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use aya::maps::{MapData, RingBuf};
use datalab_guard_common::{classify, Action, AuditEvent, Family, Hook};
use serde_json::{Map, Value};
use tokio::{
    io::{unix::AsyncFd, Interest},
    sync::watch,
};

/// Converts `bpf_ktime_get_boot_ns` (CLOCK_BOOTTIME) to wall-clock time.
///
/// Both clocks are sampled once, at construction. BOOTTIME keeps counting through suspend
/// and is never stepped, so the offset stays right until the wall clock itself is stepped
/// (NTP); a long-running consumer may make a fresh one now and then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootClock {
    boot_ns: u64,
    unix_ns: i64,
}

impl BootClock {
    /// Samples CLOCK_BOOTTIME, CLOCK_REALTIME, CLOCK_BOOTTIME and pairs the wall time with
    /// the midpoint of the two boot samples, halving the error of being preempted between.
    pub fn new() -> BootClock {
        let before = clock_ns(libc::CLOCK_BOOTTIME);
        let wall = clock_ns(libc::CLOCK_REALTIME) as i64;
        let after = clock_ns(libc::CLOCK_BOOTTIME);
        BootClock::from_samples(before / 2 + after / 2, wall)
    }

    /// A clock from known samples (tests, or a caller with its own).
    pub fn from_samples(boot_ns: u64, unix_ns: i64) -> BootClock {
        BootClock { boot_ns, unix_ns }
    }

    /// Nanoseconds since the Unix epoch at boot time `boot_ns`.
    pub fn unix_ns(&self, boot_ns: u64) -> i64 {
        let delta = i128::from(boot_ns) - i128::from(self.boot_ns);
        (i128::from(self.unix_ns) + delta).clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
    }

    /// RFC 3339 UTC with milliseconds, e.g. `2025-03-01T12:34:56.789Z`.
    pub fn timestamp(&self, boot_ns: u64) -> String {
        rfc3339_millis(self.unix_ns(boot_ns))
    }
}

impl Default for BootClock {
    fn default() -> Self {
        BootClock::new()
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only into `ts`. Both clocks exist on every Linux the
    // agent supports (>= 5.8), so it cannot fail; a zero would only skew timestamps.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// Formats nanoseconds since the Unix epoch as RFC 3339 UTC with milliseconds.
pub fn rfc3339_millis(unix_ns: i64) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let millis = unix_ns.rem_euclid(1_000_000_000) / 1_000_000;
    let (days, second_of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        second_of_day / 3600,
        second_of_day / 60 % 60,
        second_of_day % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Who an event belongs to, as far as the caller could resolve its cgroup. Each field
/// appears in the record only when set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attribution {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
    pub node: Option<String>,
    /// cgroup path (local mode, where there are no pods).
    pub cgroup: Option<String>,
}

/// `comm` as printable ASCII: up to the first NUL, every other byte outside 0x20..=0x7e
/// (control characters, bytes of multi-byte UTF-8) becomes `?`, so a tenant-chosen process
/// name cannot forge log lines or terminal escapes.
pub fn sanitize_comm(comm: &[u8]) -> String {
    comm.iter()
        .take_while(|b| **b != 0)
        .map(|b| {
            if (0x20..=0x7e).contains(b) {
                char::from(*b)
            } else {
                '?'
            }
        })
        .collect()
}

/// IP protocol name for the record; other numbers as decimal text.
pub fn proto_name(proto: u8) -> String {
    match proto {
        classify::IPPROTO_TCP => "tcp".to_owned(),
        classify::IPPROTO_UDP => "udp".to_owned(),
        classify::IPPROTO_ICMP => "icmp".to_owned(),
        classify::IPPROTO_ICMPV6 => "icmpv6".to_owned(),
        classify::IPPROTO_SCTP => "sctp".to_owned(),
        classify::IPPROTO_UDPLITE => "udplite".to_owned(),
        other => other.to_string(),
    }
}

fn sock_type_name(sock_type: u8) -> String {
    match sock_type {
        1 => "stream".to_owned(),
        2 => "dgram".to_owned(),
        3 => "raw".to_owned(),
        5 => "seqpacket".to_owned(),
        other => other.to_string(),
    }
}

/// The JSON audit record of one event (DESIGN.md "Audit record"). Fields that do not apply
/// are left out rather than zeroed: `dst`/`dport` for sock_create (and `dport` when the
/// packet has no port), `proto` for packet sockets (the kernel's value is an ethertype
/// there), `pid`/`comm`/`uid` for the egress hook (a packet has no task),
/// `policy_cgroup_id` when the default verdict applied, `suppressed` when nothing was.
///
/// An action byte other than Audited reads as blocked, as Mode does in the kernel: an
/// unknown value is treated as the fail-closed case. Unknown hook, family and reason bytes
/// are written as their numbers.
pub fn record(event: &AuditEvent, clock: &BootClock, who: &Attribution) -> Value {
    let action = match Action::from_raw(event.action) {
        Some(Action::Audited) => Action::Audited,
        _ => Action::Blocked,
    };
    let hook = Hook::from_raw(event.hook);
    let family = Family::from_raw(event.family);

    let mut r = Map::new();
    r.insert("timestamp".into(), clock.timestamp(event.boot_ns).into());
    let (level, name, action_name) = match action {
        Action::Blocked => ("warn", "egress_blocked", "blocked"),
        Action::Audited => ("info", "egress_audited", "audited"),
    };
    r.insert("level".into(), level.into());
    r.insert("event".into(), name.into());
    r.insert("action".into(), action_name.into());
    r.insert(
        "hook".into(),
        hook.map_or_else(|| event.hook.to_string(), |h| h.name().to_owned())
            .into(),
    );
    r.insert(
        "family".into(),
        family
            .map_or_else(|| event.family.to_string(), |f| f.name().to_owned())
            .into(),
    );
    // Link-layer sockets have no IP protocol (AF_PACKET's is an ethertype, AF_XDP's is 0).
    if !matches!(family, Some(Family::Packet | Family::Xdp)) {
        r.insert("proto".into(), proto_name(event.proto).into());
    }
    if hook != Some(Hook::SockCreate) {
        match family {
            Some(Family::Ipv4) => {
                let [a, b, c, d, ..] = event.dst;
                r.insert("dst".into(), Ipv4Addr::new(a, b, c, d).to_string().into());
            }
            // std prints IPv4-mapped addresses as ::ffff:a.b.c.d, which is what we want.
            Some(Family::Ipv6) => {
                r.insert("dst".into(), Ipv6Addr::from(event.dst).to_string().into());
            }
            _ => {}
        }
        if event.dport != 0 {
            r.insert("dport".into(), event.dport.into());
        }
    }
    let reason = classify::Reason::from_raw(event.reason).map_or_else(
        || event.reason.to_string(),
        |reason| reason.name().to_owned(),
    );
    r.insert("reason".into(), reason.into());
    if hook != Some(Hook::Egress) && (event.tgid != 0 || event.pid != 0) {
        r.insert("pid".into(), event.tgid.into());
        r.insert("comm".into(), sanitize_comm(&event.comm).into());
        r.insert("uid".into(), event.uid.into());
    }
    r.insert("cgroup_id".into(), event.cgroup_id.into());
    if event.policy_cgroup_id != 0 {
        r.insert("policy_cgroup_id".into(), event.policy_cgroup_id.into());
    }
    if event.suppressed > 0 {
        r.insert("suppressed".into(), event.suppressed.into());
    }
    if hook == Some(Hook::SockCreate) {
        r.insert("sock_type".into(), sock_type_name(event.sock_type).into());
    }
    let attribution = [
        ("namespace", &who.namespace),
        ("pod", &who.pod),
        ("container", &who.container),
        ("node", &who.node),
        ("cgroup", &who.cgroup),
    ];
    for (key, value) in attribution {
        if let Some(value) = value {
            r.insert(key.into(), value.clone().into());
        }
    }
    Value::Object(r)
}

/// Counts kept by [`consume`], shared with the metrics snapshot.
#[derive(Debug, Default)]
pub struct ConsumerStats {
    /// Events read and handed to the sink.
    pub received: AtomicU64,
    /// Ring buffer records whose size was not `size_of::<AuditEvent>()` (an eBPF object
    /// built from other sources); skipped.
    pub malformed: AtomicU64,
}

/// Copies an event out of a ring buffer record, or `None` if its size is wrong.
pub fn decode(bytes: &[u8]) -> Option<AuditEvent> {
    if bytes.len() != size_of::<AuditEvent>() {
        return None;
    }
    // SAFETY: the length is exactly one AuditEvent, which is #[repr(C)] plain integers
    // (aya::Pod: every bit pattern is valid). Ring records are only 8-byte aligned, so
    // the copy is unaligned.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<AuditEvent>()) })
}

/// Reads events from the EVENTS ring buffer until `shutdown` turns true (or its sender is
/// dropped), passing each to `sink` in order; then drains what is left, so nothing already
/// committed is lost on a clean stop. Received and malformed records are counted in `stats`
/// (the metrics report them); malformed ones are skipped and logged once.
///
/// `sink` runs on this task: keep it short (format and write a line).
pub async fn consume<F>(
    ring: RingBuf<MapData>,
    mut sink: F,
    stats: Arc<ConsumerStats>,
    mut shutdown: watch::Receiver<bool>,
) -> io::Result<()>
where
    F: FnMut(AuditEvent) + Send,
{
    // SAFETY: the RingBuf owns its MapData, which owns the map's fd for as long as the
    // RingBuf lives, and as_raw_fd always returns that fd.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?;
    let stop = async move {
        // Err means the sender is gone: nobody can ask any more, so stop too.
        let _ = shutdown.wait_for(|stop| *stop).await;
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            biased;
            () = &mut stop => break,
            ready = fd.readable_mut() => {
                let mut guard = ready?;
                // Clear before draining: a record committed after the drain then re-arms
                // readiness instead of being stranded until the next one.
                guard.clear_ready();
                drain(guard.get_inner_mut(), &mut sink, &stats);
            }
        }
    }
    drain(fd.get_mut(), &mut sink, &stats);
    Ok(())
}

fn drain(ring: &mut RingBuf<MapData>, sink: &mut impl FnMut(AuditEvent), stats: &ConsumerStats) {
    while let Some(item) = ring.next() {
        let event = decode(&item);
        // Release the record (advance the consumer position) before running the sink.
        drop(item);
        deliver(event, sink, stats);
    }
}

/// Hands a decoded record to the sink, or counts it as malformed (`None`).
fn deliver(event: Option<AuditEvent>, sink: &mut impl FnMut(AuditEvent), stats: &ConsumerStats) {
    match event {
        Some(event) => {
            stats.received.fetch_add(1, Ordering::Relaxed);
            sink(event);
        }
        None => {
            if stats.malformed.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!(
                    expected = size_of::<AuditEvent>(),
                    "skipping ring buffer records of the wrong size: the loaded eBPF \
                     programs do not match this agent"
                );
            }
        }
    }
}

/// Writes records as JSON lines: one object per line, each line written whole and flushed,
/// so `kubectl logs` and log shippers see complete records as they happen.
#[derive(Debug)]
pub struct LineWriter<W: Write> {
    out: W,
    buf: Vec<u8>,
}

impl<W: Write> LineWriter<W> {
    pub fn new(out: W) -> Self {
        LineWriter {
            out,
            buf: Vec::with_capacity(512),
        }
    }

    /// Writes one record and a newline, then flushes.
    pub fn write(&mut self, record: &Value) -> io::Result<()> {
        self.buf.clear();
        serde_json::to_writer(&mut self.buf, record)?;
        self.buf.push(b'\n');
        // One write_all: with Stdout that holds the lock for the whole line, so lines
        // never interleave with other writers.
        self.out.write_all(&self.buf)?;
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// The audit log: JSON lines on stdout.
pub fn stdout_lines() -> LineWriter<io::Stdout> {
    LineWriter::new(io::stdout())
}

/// Writes one record as a line on stdout. A failed write (stdout closed) loses that
/// record; it is reported once on stderr rather than stopping enforcement or the agent.
pub fn write_line(record: &Value) {
    static REPORTED: AtomicBool = AtomicBool::new(false);
    if let Err(err) = stdout_lines().write(record) {
        if !REPORTED.swap(true, Ordering::Relaxed) {
            tracing::error!(error = %err, "cannot write audit records to stdout; they are lost");
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const BOOT: u64 = 1_000_000_000_000;
    // 2025-03-01T12:34:56.789Z
    const WALL: i64 = 1_740_832_496_789_000_000;

    fn clock() -> BootClock {
        BootClock::from_samples(BOOT, WALL)
    }

    fn comm(s: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..s.len()].copy_from_slice(s);
        c
    }

    fn connect_v4() -> AuditEvent {
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&[169, 254, 169, 254]);
        AuditEvent {
            boot_ns: BOOT,
            cgroup_id: 4242,
            policy_cgroup_id: 4000,
            suppressed: 0,
            pid: 1235,
            tgid: 1234,
            uid: 1000,
            gid: 1000,
            class: 3,
            dport: 80,
            hook: Hook::Connect as u8,
            family: Family::Ipv4 as u8,
            proto: classify::IPPROTO_TCP,
            action: Action::Blocked as u8,
            sock_type: 0,
            reason: classify::Reason::Destination as u8,
            dst,
            comm: comm(b"curl"),
        }
    }

    fn keys(v: &Value) -> Vec<&str> {
        v.as_object().unwrap().keys().map(String::as_str).collect()
    }

    #[test]
    fn blocked_connect_record_has_every_field_in_order() {
        let who = Attribution {
            namespace: Some("lab-alice".into()),
            pod: Some("notebook-0".into()),
            container: Some("jupyter".into()),
            node: Some("node-1".into()),
            cgroup: None,
        };
        let r = record(&connect_v4(), &clock(), &who);
        assert_eq!(
            r,
            json!({
                "timestamp": "2025-03-01T12:34:56.789Z",
                "level": "warn",
                "event": "egress_blocked",
                "action": "blocked",
                "hook": "connect",
                "family": "ipv4",
                "proto": "tcp",
                "dst": "169.254.169.254",
                "dport": 80,
                "reason": "destination",
                "pid": 1234,
                "comm": "curl",
                "uid": 1000,
                "cgroup_id": 4242,
                "policy_cgroup_id": 4000,
                "namespace": "lab-alice",
                "pod": "notebook-0",
                "container": "jupyter",
                "node": "node-1",
            })
        );
        assert_eq!(keys(&r)[..3], ["timestamp", "level", "event"]);
    }

    #[test]
    fn audited_egress_has_no_task_fields() {
        let mut e = connect_v4();
        e.hook = Hook::Egress as u8;
        e.action = Action::Audited as u8;
        e.pid = 0;
        e.tgid = 0;
        e.uid = 0;
        e.comm = [0; 16];
        e.policy_cgroup_id = 0;
        e.suppressed = 7;
        e.proto = classify::IPPROTO_ICMP;
        e.dport = 0;
        let r = record(
            &e,
            &clock(),
            &Attribution {
                cgroup: Some("/sys/fs/cgroup/user.slice".into()),
                ..Default::default()
            },
        );
        assert_eq!(r["level"], "info");
        assert_eq!(r["event"], "egress_audited");
        assert_eq!(r["action"], "audited");
        assert_eq!(r["hook"], "egress");
        assert_eq!(r["proto"], "icmp");
        assert_eq!(r["suppressed"], 7);
        assert_eq!(r["cgroup"], "/sys/fs/cgroup/user.slice");
        for absent in [
            "pid",
            "comm",
            "uid",
            "dport",
            "policy_cgroup_id",
            "sock_type",
            "namespace",
            "pod",
            "node",
        ] {
            assert!(r.get(absent).is_none(), "{absent} present in {r}");
        }
    }

    #[test]
    fn sock_create_record_has_sock_type_and_no_destination() {
        let mut e = connect_v4();
        e.hook = Hook::SockCreate as u8;
        e.family = Family::Packet as u8;
        e.sock_type = 3;
        e.dport = 0;
        e.dst = [0; 16];
        e.proto = 3; // low byte of htons(ETH_P_ALL): meaningless, so not reported
        e.reason = classify::Reason::RawSocket as u8;
        let r = record(&e, &clock(), &Attribution::default());
        assert_eq!(r["hook"], "sock_create");
        assert_eq!(r["family"], "packet");
        assert_eq!(r["sock_type"], "raw");
        assert_eq!(r["reason"], "raw_socket");
        assert_eq!(r["pid"], 1234);
        for absent in ["dst", "dport", "proto"] {
            assert!(r.get(absent).is_none(), "{absent} present in {r}");
        }
        // AF_XDP: its own family, no protocol either.
        e.family = Family::Xdp as u8;
        e.proto = 0;
        let r = record(&e, &clock(), &Attribution::default());
        assert_eq!(r["family"], "xdp");
        assert_eq!(r["sock_type"], "raw");
        assert!(r.get("proto").is_none(), "proto present in {r}");
        // A raw IPv4 socket keeps its IP protocol.
        e.family = Family::Ipv4 as u8;
        e.proto = classify::IPPROTO_ICMP;
        assert_eq!(
            record(&e, &clock(), &Attribution::default())["proto"],
            "icmp"
        );
    }

    #[test]
    fn ipv6_and_mapped_destinations() {
        let mut e = connect_v4();
        e.family = Family::Ipv6 as u8;
        e.hook = Hook::Sendmsg as u8;
        e.proto = classify::IPPROTO_UDP;
        e.dport = 53;
        e.dst = "fd00:ec2::254".parse::<Ipv6Addr>().unwrap().octets();
        let r = record(&e, &clock(), &Attribution::default());
        assert_eq!(r["dst"], "fd00:ec2::254");
        assert_eq!(r["proto"], "udp");
        assert_eq!(r["hook"], "sendmsg");
        e.dst = "::ffff:169.254.169.254"
            .parse::<Ipv6Addr>()
            .unwrap()
            .octets();
        assert_eq!(
            record(&e, &clock(), &Attribution::default())["dst"],
            "::ffff:169.254.169.254"
        );
        e.dst = "64:ff9b::a9fe:a9fe".parse::<Ipv6Addr>().unwrap().octets();
        assert_eq!(
            record(&e, &clock(), &Attribution::default())["dst"],
            "64:ff9b::a9fe:a9fe"
        );
    }

    #[test]
    fn unknown_bytes_are_numbers_and_unknown_action_is_blocked() {
        let mut e = connect_v4();
        e.hook = 9;
        e.family = 8;
        e.proto = 200;
        e.reason = 77;
        e.action = 5;
        let r = record(&e, &clock(), &Attribution::default());
        assert_eq!(r["hook"], "9");
        assert_eq!(r["family"], "8");
        assert_eq!(r["proto"], "200");
        assert_eq!(r["reason"], "77");
        assert_eq!(r["action"], "blocked");
        assert!(r.get("dst").is_none());
    }

    #[test]
    fn proto_names() {
        let names: Vec<String> = [6, 17, 1, 58, 132, 136, 0, 255]
            .into_iter()
            .map(proto_name)
            .collect();
        assert_eq!(
            names,
            ["tcp", "udp", "icmp", "icmpv6", "sctp", "udplite", "0", "255"]
        );
    }

    #[test]
    fn comm_is_sanitized() {
        assert_eq!(sanitize_comm(&comm(b"python3")), "python3");
        assert_eq!(sanitize_comm(&comm(b"a\x1b[31mb\n")), "a?[31mb?");
        assert_eq!(sanitize_comm(&comm("pé".as_bytes())), "p??");
        assert_eq!(sanitize_comm(&comm(b"ab\0cd")), "ab");
        assert_eq!(sanitize_comm(&[b'x'; 16]), "x".repeat(16));
        assert_eq!(sanitize_comm(&[0; 16]), "");
        assert_eq!(sanitize_comm(&comm(b"\"}{\\")), "\"}{\\");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_millis() {
        assert_eq!(rfc3339_millis(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_millis(WALL), "2025-03-01T12:34:56.789Z");
        assert_eq!(
            rfc3339_millis(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000Z"
        );
        assert_eq!(
            rfc3339_millis(4_102_444_799_999_999_999),
            "2099-12-31T23:59:59.999Z"
        );
        assert_eq!(rfc3339_millis(-1_000_000), "1969-12-31T23:59:59.999Z");
        // Truncation, not rounding: .9999 ms stays in the same millisecond.
        assert_eq!(rfc3339_millis(999_999), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn boot_clock_converts_offsets_both_ways() {
        let c = clock();
        assert_eq!(c.unix_ns(BOOT + 1_500_000_000), WALL + 1_500_000_000);
        assert_eq!(c.unix_ns(BOOT - 2_000_000_000), WALL - 2_000_000_000);
        assert_eq!(c.timestamp(BOOT + 211_000_000), "2025-03-01T12:34:57.000Z");
    }

    #[test]
    fn live_boot_clock_is_close_to_now() {
        let c = BootClock::new();
        let now_boot = clock_ns(libc::CLOCK_BOOTTIME);
        let now_wall = clock_ns(libc::CLOCK_REALTIME) as i64;
        assert!((c.unix_ns(now_boot) - now_wall).abs() < 1_000_000_000);
    }

    fn event_bytes(e: &AuditEvent) -> Vec<u8> {
        // SAFETY: viewing a plain-integer repr(C) struct as bytes.
        unsafe {
            std::slice::from_raw_parts(
                std::ptr::from_ref::<AuditEvent>(e).cast::<u8>(),
                size_of::<AuditEvent>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decode_checks_the_length() {
        let e = connect_v4();
        let bytes = &event_bytes(&e)[..];
        assert_eq!(decode(bytes), Some(e));
        // Unaligned start.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(bytes);
        assert_eq!(decode(&shifted[1..]), Some(e));
        assert_eq!(decode(&bytes[..bytes.len() - 1]), None);
        assert_eq!(decode(&shifted), None);
        assert_eq!(decode(&[]), None);
    }

    /// The real path: the egress program (audit mode, under BPF_PROG_TEST_RUN) writes to
    /// the EVENTS ring buffer, and [`consume`] reads it through AsyncFd.
    #[tokio::test]
    async fn consumes_events_from_the_real_ring_buffer() {
        use std::{collections::BTreeMap, sync::Mutex, time::Duration};

        use aya::maps::Map;
        use datalab_guard_common::{maps, Mode, Verdict};

        use crate::{blocklist::parse_cidr, bpf::testrun::TestRunner};

        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: needs root (loads eBPF programs)");
            return;
        }
        // A private bpffs: never the system's /sys/fs/bpf; unmounting releases every pin.
        let bpffs = crate::bpf::testrun::PrivateBpffs::mount("dg-audit-test").unwrap();
        let dir = bpffs.path().join("runner");
        let mut runner = TestRunner::new(&dir).unwrap();
        let blocked = [parse_cidr("169.254.169.254").unwrap()];
        runner
            .configure(&blocked, Mode::Audit, Verdict::Guard, &BTreeMap::new())
            .unwrap();
        let pin = dir.join("maps").join(maps::EVENTS);
        let ring = Map::from_map_data(MapData::from_pin(&pin).unwrap()).unwrap();
        let ring = RingBuf::try_from(ring).unwrap();

        let seen = Arc::new(Mutex::new(Vec::new()));
        let stats = Arc::new(ConsumerStats::default());
        let (stop, stopped) = watch::channel(false);
        let consumer = tokio::spawn(consume(
            ring,
            {
                let seen = Arc::clone(&seen);
                move |event| seen.lock().unwrap().push(event)
            },
            Arc::clone(&stats),
            stopped,
        ));

        // IPv4 TCP SYN 10.0.0.2:40000 -> 169.254.169.254:80.
        let mut syn = vec![
            0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0, 10, 0, 0, 2, 169, 254, 169, 254,
        ];
        syn.extend_from_slice(&[
            0x9c, 0x40, 0, 80, 0, 0, 0, 0, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
        ]);
        let result = runner.run(maps::programs::EGRESS, &syn, 3).unwrap();
        assert_eq!(result.verdict, 1, "audit mode lets the packet through");

        // Readiness, not the final drain, must deliver them.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while seen.lock().unwrap().len() < 3 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send(true).unwrap();
        consumer.await.unwrap().unwrap();

        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert_eq!(stats.received.load(Ordering::Relaxed), 3);
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 0);
        let r = record(&seen[0], &BootClock::new(), &Attribution::default());
        assert_eq!(r["hook"], "egress");
        assert_eq!(r["action"], "audited");
        assert_eq!(r["dst"], "169.254.169.254");
        assert_eq!(r["dport"], 80);
        assert_eq!(r["proto"], "tcp");
        assert!(r.get("pid").is_none());
        drop(runner);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn malformed_records_are_counted_and_skipped() {
        let stats = ConsumerStats::default();
        let mut seen = Vec::new();
        let bytes = event_bytes(&connect_v4());
        for record in [&bytes[..], &bytes[..3], &[][..], &bytes[..]] {
            deliver(decode(record), &mut |e| seen.push(e), &stats);
        }
        assert_eq!(seen.len(), 2);
        assert_eq!(stats.received.load(Ordering::Relaxed), 2);
        assert_eq!(stats.malformed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn line_writer_writes_one_object_per_line() {
        let mut w = LineWriter::new(Vec::new());
        let r = record(&connect_v4(), &clock(), &Attribution::default());
        w.write(&r).unwrap();
        w.write(&json!({"a": "multi\nline"})).unwrap();
        let out = String::from_utf8(w.into_inner()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with(r#"{"timestamp":"2025-03-01T12:34:56.789Z","level":"warn""#),
            "{}",
            lines[0]
        );
        assert_eq!(serde_json::from_str::<Value>(lines[0]).unwrap(), r);
        assert_eq!(lines[1], r#"{"a":"multi\nline"}"#);
    }
}
