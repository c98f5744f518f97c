//! `dg-probe KIND ADDR PORT [--timeout-ms N]`: one network attempt, one JSON line.
//!
//! Used by the privileged tests and the demo, run inside a tenant cgroup and network
//! namespace, to try every way a process can send something to a destination. It prints
//! exactly one line, `{"kind":..,"ok":bool,"errno":i32|null,"error":"..."|null,"elapsed_ms":f64}`,
//! and exits 0 whether or not the attempt worked (2 only for bad usage). A timed-out attempt
//! reports errno 110 (ETIMEDOUT): that is what a silently dropped packet looks like, while
//! the guard's syscall hooks make connect/sendmsg fail at once with EPERM (errno 1).
//!
//! Plain libc calls on purpose: each kind is the exact syscall sequence a tenant program would
//! use, with no runtime in between that might retry, resolve or fall back behind our back.

use std::{
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV6},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    time::{Duration, Instant},
};

const USAGE: &str = "\
usage: dg-probe KIND ADDR PORT [--timeout-ms N]

One network attempt; prints one JSON line and exits 0 whatever the outcome (2 = bad usage).
KIND (ok means):
  tcp                  TCP connect completed (v4 or v6 by ADDR)
  tcp-v4mapped         AF_INET6 socket connected to ::ffff:ADDR (ADDR must be IPv4)
  tcp-fastopen         sendto(MSG_FASTOPEN) carrying an HTTP GET got an HTTP response
  http                 connect, GET /latest/meta-data/, an HTTP response came back
  udp-connected        connect + send + the echo came back
  udp-sendto           unconnected sendto + the echo came back
  udp-v4mapped-sendto  AF_INET6 sendto ::ffff:ADDR + the echo came back
  icmp                 ICMP echo (SOCK_DGRAM ping socket, else SOCK_RAW) got a reply
  icmp6                ICMPv6 echo (SOCK_DGRAM ping socket, else SOCK_RAW) got a reply
  raw-hdrincl          SOCK_RAW/IPPROTO_RAW sendto of a hand-built IPv4/UDP packet succeeded
  packet-socket        socket(AF_PACKET, SOCK_RAW) was created (ADDR/PORT unused)
  packet-raw           an AF_PACKET SOCK_RAW socket sent one Ethernet frame carrying UDP to
                       ADDR:PORT (v4 or v6) on the first non-loopback interface
                       ($DG_PROBE_IFACE overrides), to the broadcast MAC
  packet-raw-vlan      the same frame with an 802.1Q tag (VLAN 7)
  packet-dgram         an AF_PACKET SOCK_DGRAM socket sent the same IP packet (the kernel
                       adds the Ethernet header)
  packet-dgram-socket  socket(AF_PACKET, SOCK_DGRAM) was created (ADDR/PORT unused)
  xdp-socket           socket(AF_XDP, SOCK_RAW) was created (ADDR/PORT unused)
  xdp-tx               an AF_XDP socket bound in copy mode (XDP_COPY, queue 0) on the
                       packet-raw interface transmitted the packet-raw frame: the kernel
                       handed it back on the completion ring
  vxlan-imds           unconnected sendto to ADDR:PORT of one VXLAN datagram (VNI 42)
                       whose inner frame carries IPv4/UDP to 169.254.169.254:80; ok means
                       the datagram left the socket (inner destination MAC from
                       $DG_PROBE_INNER_MAC, else broadcast)
  geneve-imds          the same inner frame in a Geneve datagram (VNI 42, protocol 0x6558)
  udp-stream           unconnected sendto in a loop (about 20,000 datagrams/s, one socket)
                       until the timeout, or until stdin closes when it is a pipe; ok means
                       at least one datagram left the socket; the line adds the counts
                       sent, refused (EPERM) and failed (any other error)
ADDR and PORT are ignored by the socket-only kinds (packet-socket, packet-dgram,
xdp-socket); PORT by icmp and icmp6. Default timeout 2000 ms.";

const PAYLOAD: &[u8] = b"dg-probe";

/// Why an attempt failed.
struct Fail {
    errno: i32,
    error: String,
}

type Attempt = Result<(), Fail>;

fn fail(errno: i32, what: &str) -> Fail {
    let msg = std::io::Error::from_raw_os_error(errno).to_string();
    let msg = msg.split(" (os error").next().unwrap_or(&msg).to_string();
    Fail {
        errno,
        error: format!("{what}: {msg}"),
    }
}

fn last_fail(what: &str) -> Fail {
    fail(
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        what,
    )
}

fn timeout(what: &str, limit: Duration) -> Fail {
    Fail {
        errno: libc::ETIMEDOUT,
        error: format!("{what}: timed out after {} ms", limit.as_millis()),
    }
}

/// The attempt's time budget.
#[derive(Clone, Copy)]
struct Deadline {
    end: Instant,
    limit: Duration,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let (kind, addr, port, limit) = match parse_args(&args) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("dg-probe: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let start = Instant::now();
    let dl = Deadline {
        end: start + limit,
        limit,
    };
    let mut counts = None;
    let result = if kind == "udp-stream" {
        let (result, c) = udp_stream(SocketAddr::new(addr, port), dl);
        counts = Some(c);
        result
    } else {
        run(&kind, addr, port, dl)
    };
    let elapsed_ms = (start.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    let (ok, errno, error) = match result {
        Ok(()) => (true, None, None),
        Err(f) => (false, Some(f.errno), Some(f.error)),
    };
    let mut line = serde_json::json!({
        "kind": kind, "ok": ok, "errno": errno, "error": error, "elapsed_ms": elapsed_ms,
    });
    if let Some(c) = counts {
        line["sent"] = c.sent.into();
        line["refused"] = c.refused.into();
        line["failed"] = c.failed.into();
    }
    println!("{line}");
}

fn parse_args(args: &[String]) -> Result<(String, IpAddr, u16, Duration), String> {
    let mut pos = Vec::new();
    let mut timeout_ms = 2000u64;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--timeout-ms" {
            let v = it.next().ok_or("--timeout-ms needs a value")?;
            timeout_ms = v.parse().map_err(|_| format!("bad --timeout-ms {v:?}"))?;
            if timeout_ms == 0 {
                return Err("--timeout-ms must be positive".into());
            }
        } else if a.starts_with("--") {
            return Err(format!("unknown option {a}"));
        } else {
            pos.push(a.as_str());
        }
    }
    let [kind, addr, port] = pos[..] else {
        return Err(format!(
            "expected KIND ADDR PORT, got {} arguments",
            pos.len()
        ));
    };
    let addr: IpAddr = addr.parse().map_err(|_| format!("bad address {addr:?}"))?;
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let needs_v4 = matches!(
        kind,
        "tcp-v4mapped" | "udp-v4mapped-sendto" | "raw-hdrincl" | "icmp"
    );
    match kind {
        "tcp"
        | "tcp-fastopen"
        | "http"
        | "udp-connected"
        | "udp-sendto"
        | "packet-socket"
        | "udp-stream"
        | "packet-raw"
        | "packet-raw-vlan"
        | "packet-dgram"
        | "packet-dgram-socket"
        | "xdp-socket"
        | "xdp-tx"
        | "vxlan-imds"
        | "geneve-imds" => {}
        "tcp-v4mapped" | "udp-v4mapped-sendto" | "raw-hdrincl" | "icmp" if addr.is_ipv4() => {}
        "icmp6" if addr.is_ipv6() => {}
        _ if needs_v4 => return Err(format!("{kind} needs an IPv4 address")),
        "icmp6" => return Err("icmp6 needs an IPv6 address".into()),
        _ => return Err(format!("unknown KIND {kind:?}")),
    }
    Ok((
        kind.to_string(),
        addr,
        port,
        Duration::from_millis(timeout_ms),
    ))
}

fn run(kind: &str, addr: IpAddr, port: u16, dl: Deadline) -> Attempt {
    let target = SocketAddr::new(addr, port);
    match kind {
        "tcp" => tcp(target, dl),
        "tcp-v4mapped" => tcp(v4mapped(target), dl),
        "tcp-fastopen" => tcp_fastopen(target, dl),
        "http" => http(target, dl),
        "udp-connected" => udp(target, true, dl),
        "udp-sendto" => udp(target, false, dl),
        "udp-v4mapped-sendto" => udp(v4mapped(target), false, dl),
        "icmp" => icmp_echo(addr, dl),
        "icmp6" => icmp_echo(addr, dl),
        "raw-hdrincl" => raw_hdrincl(target, dl),
        "packet-socket" => packet_socket(libc::SOCK_RAW),
        "packet-dgram-socket" => packet_socket(libc::SOCK_DGRAM),
        "xdp-socket" => socket(libc::AF_XDP, libc::SOCK_RAW, 0).map(drop),
        "packet-raw" => packet_frame(target, Framing::Raw { vlan: None }),
        "packet-raw-vlan" => packet_frame(target, Framing::Raw { vlan: Some(7) }),
        "packet-dgram" => packet_frame(target, Framing::Dgram),
        "xdp-tx" => xdp_frame(target, dl),
        "vxlan-imds" => tunnel_datagram(target, Tunnel::Vxlan),
        "geneve-imds" => tunnel_datagram(target, Tunnel::Geneve),
        _ => unreachable!("checked in parse_args"),
    }
}

// ---- kinds -------------------------------------------------------------------------------

fn tcp(target: SocketAddr, dl: Deadline) -> Attempt {
    let fd = stream_socket(&target)?;
    connect(&fd, &target, dl)
}

fn http(target: SocketAddr, dl: Deadline) -> Attempt {
    let fd = stream_socket(&target)?;
    connect(&fd, &target, dl)?;
    let req = http_request(&target);
    send_all(&fd, req.as_bytes(), dl)?;
    read_http_response(&fd, dl)
}

fn tcp_fastopen(target: SocketAddr, dl: Deadline) -> Attempt {
    let fd = stream_socket(&target)?;
    // Put the request in the SYN even without a cookie (the lab's server accepts that), so
    // the very first packet carries data; harmless if the kernel lacks the option.
    let _ = setsockopt_int(&fd, libc::IPPROTO_TCP, libc::TCP_FASTOPEN_NO_COOKIE, 1);
    let req = http_request(&target);
    let (sa, len) = sockaddr(&target);
    // SAFETY: valid fd, buffer and sockaddr of the given length.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            libc::MSG_FASTOPEN | libc::MSG_NOSIGNAL,
            (&raw const sa).cast(),
            len,
        )
    };
    let sent = if n >= 0 {
        n as usize
    } else {
        let errno = errno();
        if errno != libc::EINPROGRESS {
            return Err(fail(errno, "sendto(MSG_FASTOPEN)"));
        }
        0
    };
    wait_connected(&fd, dl)?;
    send_all(&fd, &req.as_bytes()[sent..], dl)?;
    read_http_response(&fd, dl)
}

fn udp(target: SocketAddr, connected: bool, dl: Deadline) -> Attempt {
    let fd = socket(family(&target), libc::SOCK_DGRAM, 0)?;
    if target.is_ipv6() {
        setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    let (sa, len) = sockaddr(&target);
    let n = if connected {
        // SAFETY: valid fd; sa is a sockaddr of length len that outlives the call.
        if unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len) } != 0 {
            return Err(last_fail("connect"));
        }
        // SAFETY: valid fd; PAYLOAD is a static buffer of the length passed.
        unsafe { libc::send(fd.as_raw_fd(), PAYLOAD.as_ptr().cast(), PAYLOAD.len(), 0) }
    } else {
        // SAFETY: valid fd, static buffer of the length passed, sockaddr of length len.
        unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                PAYLOAD.as_ptr().cast(),
                PAYLOAD.len(),
                0,
                (&raw const sa).cast(),
                len,
            )
        }
    };
    if n < 0 {
        return Err(last_fail(if connected { "send" } else { "sendto" }));
    }
    loop {
        let reply = recv(&fd, dl, "udp echo")?;
        if reply == PAYLOAD {
            return Ok(());
        }
    }
}

/// What a `udp-stream` did.
#[derive(Default)]
struct StreamCounts {
    sent: u64,
    refused: u64,
    failed: u64,
}

/// Datagrams sent between two pauses of 1 ms: about 20,000 per second, enough to land
/// dozens of datagrams in any gap of a millisecond, without holding a core.
const STREAM_BURST: u32 = 20;

/// Sends datagrams to `target` from one unconnected socket until the deadline or until
/// stdin, when it is a pipe, closes (so a test can end the stream at the moment it
/// chooses). Each sendto goes through the sendmsg hook and, if it passes, the egress
/// program: a gap in either shows as "sent".
fn udp_stream(target: SocketAddr, dl: Deadline) -> (Attempt, StreamCounts) {
    let mut counts = StreamCounts::default();
    let fd = match socket(family(&target), libc::SOCK_DGRAM, 0) {
        Ok(fd) => fd,
        Err(f) => return (Err(f), counts),
    };
    let (sa, len) = sockaddr(&target);
    let stop_on_stdin = stdin_is_pipe();
    let mut last = None;
    while Instant::now() < dl.end && !(stop_on_stdin && stdin_closed()) {
        for _ in 0..STREAM_BURST {
            // SAFETY: valid fd, buffer and sockaddr.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    PAYLOAD.as_ptr().cast(),
                    PAYLOAD.len(),
                    0,
                    (&raw const sa).cast(),
                    len,
                )
            };
            if n >= 0 {
                counts.sent += 1;
            } else if errno() == libc::EPERM {
                counts.refused += 1;
                last = Some(libc::EPERM);
            } else {
                counts.failed += 1;
                last = Some(errno());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let result = if counts.sent > 0 {
        Ok(())
    } else {
        Err(fail(last.unwrap_or(0), "sendto"))
    };
    (result, counts)
}

fn stdin_is_pipe() -> bool {
    // SAFETY: libc::stat is plain integers; all-zero is a valid value.
    let mut st: libc::stat = unsafe { zeroed() };
    // SAFETY: fstat writes at most one `stat` into `st`, which lives across the call.
    let ok = unsafe { libc::fstat(0, &raw mut st) } == 0;
    ok && st.st_mode & libc::S_IFMT == libc::S_IFIFO
}

/// True once the writing end of stdin is closed (read would return EOF).
fn stdin_closed() -> bool {
    let mut p = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    let r = unsafe { libc::poll(&raw mut p, 1, 0) };
    r > 0 && p.revents & (libc::POLLHUP | libc::POLLIN) != 0
}

fn icmp_echo(addr: IpAddr, dl: Deadline) -> Attempt {
    let (domain, proto) = match addr {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
    };
    // Ping sockets are what unprivileged programs (and most pods) use; raw sockets need
    // CAP_NET_RAW. Try the former, fall back to the latter.
    let (fd, raw) = match socket(domain, libc::SOCK_DGRAM, proto) {
        Ok(fd) => (fd, false),
        Err(dgram) => match socket(domain, libc::SOCK_RAW, proto) {
            Ok(fd) => (fd, true),
            Err(rawf) => {
                return Err(Fail {
                    errno: rawf.errno,
                    error: format!("ping socket: {}; raw socket: {}", dgram.error, rawf.error),
                })
            }
        },
    };
    let (req_type, reply_type) = if addr.is_ipv4() {
        (8u8, 0u8)
    } else {
        (128u8, 129u8)
    };
    let ident = (std::process::id() & 0xffff) as u16;
    let mut msg = vec![req_type, 0, 0, 0];
    msg.extend_from_slice(&ident.to_be_bytes());
    msg.extend_from_slice(&1u16.to_be_bytes());
    msg.extend_from_slice(PAYLOAD);
    if addr.is_ipv4() {
        // The kernel computes ICMPv6 checksums itself; ICMPv4 on a raw socket needs ours.
        let c = inet_checksum(&msg);
        msg[2..4].copy_from_slice(&c.to_be_bytes());
    }
    let target = SocketAddr::new(addr, 0);
    let (sa, len) = sockaddr(&target);
    // SAFETY: valid fd, buffer and sockaddr.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&raw const sa).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(last_fail("sendto"));
    }
    loop {
        let pkt = recv(&fd, dl, "echo reply")?;
        // A raw IPv4 socket hands us the IP header too; skip it.
        let icmp = if raw && addr.is_ipv4() {
            let ihl = usize::from(pkt.first().copied().unwrap_or(0) & 0x0f) * 4;
            pkt.get(ihl..).unwrap_or_default()
        } else {
            &pkt[..]
        };
        if icmp.len() < 8 || icmp[0] != reply_type {
            continue;
        }
        // Ping sockets rewrite the identifier and filter replies for us; raw sockets see
        // every echo reply on the host, so match ours.
        if raw && icmp[4..6] != ident.to_be_bytes() {
            continue;
        }
        return Ok(());
    }
}

fn raw_hdrincl(target: SocketAddr, _dl: Deadline) -> Attempt {
    let IpAddr::V4(dst) = target.ip() else {
        unreachable!("checked in parse_args")
    };
    let fd = socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
    setsockopt_int(&fd, libc::IPPROTO_IP, libc::IP_HDRINCL, 1)?;
    let pkt = ipv4_udp_packet(Ipv4Addr::UNSPECIFIED, dst, 40000, target.port(), PAYLOAD);
    let (sa, len) = sockaddr(&SocketAddr::new(target.ip(), 0));
    // SAFETY: valid fd, buffer and sockaddr.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&raw const sa).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(last_fail("sendto"));
    }
    Ok(())
}

fn packet_socket(ty: i32) -> Attempt {
    let proto = i32::from((libc::ETH_P_ALL as u16).to_be());
    socket(libc::AF_PACKET, ty, proto).map(drop)
}

/// How an AF_PACKET sender hands its packet to the device.
#[derive(Clone, Copy)]
enum Framing {
    /// SOCK_RAW: the whole Ethernet frame, built here (optionally 802.1Q-tagged).
    Raw { vlan: Option<u16> },
    /// SOCK_DGRAM: the IP packet; the kernel adds the link header from the address.
    Dgram,
}

/// One UDP packet to `target` sent through an AF_PACKET socket, which no socket-address or
/// cgroup_skb hook ever sees: exactly what the pod-edge layer exists for.
const BROADCAST: [u8; 6] = [0xff; 6];

/// The Ethernet frame `packet-raw` sends (to the broadcast MAC) and its EtherType.
fn ethernet_frame(target: SocketAddr, vlan: Option<u16>) -> (u16, Vec<u8>) {
    let (ethertype, packet) = ip_packet(target);
    let mut frame = Vec::with_capacity(18 + packet.len());
    frame.extend_from_slice(&BROADCAST);
    // A locally administered source address: no real interface's.
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    if let Some(id) = vlan {
        frame.extend_from_slice(&(libc::ETH_P_8021Q as u16).to_be_bytes());
        frame.extend_from_slice(&id.to_be_bytes());
    }
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(&packet);
    (ethertype, frame)
}

/// The IPv4 or IPv6 UDP packet every frame kind carries, with its EtherType.
fn ip_packet(target: SocketAddr) -> (u16, Vec<u8>) {
    match target.ip() {
        IpAddr::V4(dst) => (
            libc::ETH_P_IP as u16,
            ipv4_udp_packet(Ipv4Addr::UNSPECIFIED, dst, 40000, target.port(), PAYLOAD),
        ),
        IpAddr::V6(dst) => (
            libc::ETH_P_IPV6 as u16,
            ipv6_udp_packet(dst, 40000, target.port(), PAYLOAD),
        ),
    }
}

/// The `packet-raw` frame through an AF_XDP socket in copy mode.
fn xdp_frame(target: SocketAddr, dl: Deadline) -> Attempt {
    let ifindex = packet_ifindex()?;
    let (_, frame) = ethernet_frame(target, None);
    let left = dl.end.saturating_duration_since(Instant::now());
    match datalab_guard_tests::af_xdp::send_frames(ifindex as u32, &[frame], left) {
        Ok(1) => Ok(()),
        Ok(_) => Err(timeout("AF_XDP completion", dl.limit)),
        Err(e) => Err(Fail {
            errno: e.errno,
            error: e.to_string(),
        }),
    }
}

fn packet_frame(target: SocketAddr, framing: Framing) -> Attempt {
    let ifindex = packet_ifindex()?;
    let (ty, bytes, ethertype) = match framing {
        Framing::Dgram => {
            let (ethertype, packet) = ip_packet(target);
            (libc::SOCK_DGRAM, packet, ethertype)
        }
        Framing::Raw { vlan } => {
            let (ethertype, frame) = ethernet_frame(target, vlan);
            (libc::SOCK_RAW, frame, ethertype)
        }
    };
    // Protocol 0: send only, receive nothing.
    let fd = socket(libc::AF_PACKET, ty, 0)?;
    // SAFETY: sockaddr_ll is plain data; all-zero is valid.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ethertype.to_be();
    sll.sll_ifindex = ifindex;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&BROADCAST);
    // SAFETY: valid fd, buffer and sockaddr_ll of the given size.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(last_fail("sendto(AF_PACKET)"));
    }
    Ok(())
}

/// The UDP encapsulations `vxlan-imds` and `geneve-imds` send.
#[derive(Clone, Copy)]
enum Tunnel {
    Vxlan,
    Geneve,
}

/// One encapsulated datagram, sent with a plain UDP socket as any unprivileged process can:
/// the tunnel header (VNI 42), an Ethernet frame, and in it IPv4/UDP to the metadata
/// address. A VXLAN or Geneve endpoint at ADDR:PORT that decapsulates it delivers the inner
/// packet on its side.
fn tunnel_datagram(target: SocketAddr, tunnel: Tunnel) -> Attempt {
    const TEB: u16 = 0x6558;
    let inner_mac = std::env::var("DG_PROBE_INNER_MAC")
        .ok()
        .and_then(|m| parse_mac(&m))
        .unwrap_or([0xff; 6]);
    let mut datagram = match tunnel {
        // Flags: VNI present; VNI 42.
        Tunnel::Vxlan => vec![0x08, 0, 0, 0, 0, 0, 42, 0],
        // Version 0, no options; protocol TEB (an Ethernet frame follows); VNI 42.
        Tunnel::Geneve => {
            let mut h = vec![0, 0];
            h.extend_from_slice(&TEB.to_be_bytes());
            h.extend_from_slice(&[0, 0, 42, 0]);
            h
        }
    };
    datagram.extend_from_slice(&inner_mac);
    datagram.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    datagram.extend_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    datagram.extend(ipv4_udp_packet(
        Ipv4Addr::new(10, 42, 0, 2),
        Ipv4Addr::new(169, 254, 169, 254),
        40000,
        80,
        PAYLOAD,
    ));
    let fd = socket(family(&target), libc::SOCK_DGRAM, 0)?;
    let (sa, len) = sockaddr(&target);
    // SAFETY: valid fd, buffer and sockaddr of length len.
    let n = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            datagram.as_ptr().cast(),
            datagram.len(),
            0,
            (&raw const sa).cast(),
            len,
        )
    };
    if n < 0 {
        return Err(last_fail("sendto"));
    }
    Ok(())
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.trim().split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `$DG_PROBE_IFACE`, else the first interface that is not loopback.
fn packet_ifindex() -> Result<i32, Fail> {
    let wanted = std::env::var("DG_PROBE_IFACE").ok();
    // SAFETY: if_nameindex returns a NULL-terminated array freed below, or NULL.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Err(last_fail("if_nameindex"));
    }
    let mut found = None;
    let mut i = 0;
    loop {
        // SAFETY: walking the array up to its terminating zero entry.
        let entry = unsafe { *list.add(i) };
        if entry.if_index == 0 || entry.if_name.is_null() {
            break;
        }
        // SAFETY: if_name is a NUL-terminated string owned by the array.
        let name = unsafe { std::ffi::CStr::from_ptr(entry.if_name) }.to_string_lossy();
        let matches = match &wanted {
            Some(w) => name == w.as_str(),
            None => name != "lo",
        };
        if matches {
            found = Some(entry.if_index as i32);
            break;
        }
        i += 1;
    }
    // SAFETY: list came from if_nameindex.
    unsafe { libc::if_freenameindex(list) };
    found.ok_or_else(|| fail(libc::ENODEV, "no interface to send the frame on"))
}

/// A complete IPv6/UDP packet from the unspecified address. Its UDP checksum is left zero
/// (invalid for IPv6): the packet only has to arrive, and arrivals are counted before any
/// transport check.
fn ipv6_udp_packet(dst: std::net::Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let udp_len = (8 + payload.len()) as u16;
    let mut p = Vec::with_capacity(40 + udp_len as usize);
    p.extend_from_slice(&[0x60, 0, 0, 0]);
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[libc::IPPROTO_UDP as u8, 64]);
    p.extend_from_slice(&[0; 16]);
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&udp_len.to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(payload);
    p
}

// ---- helpers -----------------------------------------------------------------------------

fn http_request(target: &SocketAddr) -> String {
    format!(
        "GET /latest/meta-data/ HTTP/1.0\r\nHost: {}\r\nUser-Agent: dg-probe\r\n\r\n",
        target.ip()
    )
}

fn v4mapped(target: SocketAddr) -> SocketAddr {
    match target {
        SocketAddr::V4(a) => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        v6 => v6,
    }
}

fn family(a: &SocketAddr) -> i32 {
    if a.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn socket(domain: i32, ty: i32, proto: i32) -> Result<OwnedFd, Fail> {
    // SAFETY: plain syscall; the fd is owned by the returned OwnedFd.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(last_fail("socket"));
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn stream_socket(target: &SocketAddr) -> Result<OwnedFd, Fail> {
    let fd = socket(family(target), libc::SOCK_STREAM, 0)?;
    if target.is_ipv6() {
        // Needed for ::ffff:a.b.c.d targets; the default may be 1 on hardened hosts.
        setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    }
    Ok(fd)
}

fn setsockopt_int(fd: &OwnedFd, level: i32, name: i32, value: i32) -> Attempt {
    // SAFETY: valid fd and a pointer to an int of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(last_fail("setsockopt"));
    }
    Ok(())
}

fn sockaddr(a: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            // SAFETY: all-zero is a valid sockaddr_in6.
            let mut sin6: libc::sockaddr_in6 = unsafe { zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = v6.port().to_be();
            sin6.sin6_addr.s6_addr = v6.ip().octets();
            sin6.sin6_scope_id = v6.scope_id();
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Waits for `events` on `fd` until the deadline; a timeout is reported as ETIMEDOUT.
fn wait_for(fd: RawFd, events: i16, dl: Deadline, what: &str) -> Result<i16, Fail> {
    loop {
        let remaining = dl.end.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(timeout(what, dl.limit));
        }
        let ms = remaining.as_millis().clamp(1, i32::MAX as u128) as i32;
        let mut p = libc::pollfd {
            fd,
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&raw mut p, 1, ms) };
        if r < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return Err(last_fail("poll"));
        }
        if r > 0 {
            return Ok(p.revents);
        }
    }
}

fn so_error(fd: &OwnedFd) -> i32 {
    let mut err: i32 = 0;
    let mut len = size_of::<i32>() as libc::socklen_t;
    // SAFETY: valid fd, int-sized out buffer.
    unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&raw mut err).cast(),
            &raw mut len,
        )
    };
    err
}

fn connect(fd: &OwnedFd, target: &SocketAddr, dl: Deadline) -> Attempt {
    let (sa, len) = sockaddr(target);
    // SAFETY: valid fd and sockaddr.
    if unsafe { libc::connect(fd.as_raw_fd(), (&raw const sa).cast(), len) } == 0 {
        return Ok(());
    }
    let e = errno();
    if e != libc::EINPROGRESS {
        return Err(fail(e, "connect"));
    }
    wait_connected(fd, dl)
}

fn wait_connected(fd: &OwnedFd, dl: Deadline) -> Attempt {
    wait_for(fd.as_raw_fd(), libc::POLLOUT, dl, "connect")?;
    match so_error(fd) {
        0 => Ok(()),
        e => Err(fail(e, "connect")),
    }
}

fn send_all(fd: &OwnedFd, mut data: &[u8], dl: Deadline) -> Attempt {
    while !data.is_empty() {
        // SAFETY: valid fd and buffer.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                data.as_ptr().cast(),
                data.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            data = &data[n as usize..];
            continue;
        }
        match errno() {
            libc::EAGAIN | libc::EINTR => {
                wait_for(fd.as_raw_fd(), libc::POLLOUT, dl, "send")?;
            }
            e => return Err(fail(e, "send")),
        }
    }
    Ok(())
}

/// One recv (a datagram, or what a stream has so far); empty means EOF on a stream.
fn recv(fd: &OwnedFd, dl: Deadline, what: &str) -> Result<Vec<u8>, Fail> {
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: valid fd and buffer.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(buf);
        }
        match errno() {
            libc::EAGAIN | libc::EINTR => {
                wait_for(fd.as_raw_fd(), libc::POLLIN, dl, what)?;
            }
            e => return Err(fail(e, &format!("recv ({what})"))),
        }
    }
}

fn read_http_response(fd: &OwnedFd, dl: Deadline) -> Attempt {
    let mut data = Vec::new();
    loop {
        match recv(fd, dl, "HTTP response") {
            Ok(chunk) if chunk.is_empty() => break,
            Ok(chunk) => data.extend_from_slice(&chunk),
            // A complete header already counts as an answer, even if the body is slow.
            Err(f) if f.errno == libc::ETIMEDOUT && data.windows(4).any(|w| w == b"\r\n\r\n") => {
                break
            }
            Err(f) => return Err(f),
        }
    }
    if data.starts_with(b"HTTP/") {
        Ok(())
    } else if data.is_empty() {
        Err(Fail {
            errno: libc::ECONNRESET,
            error: "connection closed without an HTTP response".into(),
        })
    } else {
        Err(Fail {
            errno: libc::EPROTO,
            error: "answer is not HTTP".into(),
        })
    }
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A complete IPv4/UDP packet. With IP_HDRINCL the kernel fills in a zero source address,
/// the id, the total length and the header checksum; we set them anyway where we can.
fn ipv4_udp_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0, 64, libc::IPPROTO_UDP as u8, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    let c = inet_checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]); // no UDP checksum (allowed for IPv4)
    p.extend_from_slice(payload);
    p
}
