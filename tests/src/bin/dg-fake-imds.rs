//! `dg-fake-imds [--port N]`: a fake cloud instance metadata server for the test lab.
//!
//! Started by the kit inside the lab's metadata-host network namespace (never on a real
//! network). It listens on TCP and UDP port 80 (default) on 0.0.0.0 and, through separate
//! v6-only sockets, on `[::]`, so it answers on 169.254.169.254, fd00:ec2::254 and the "other"
//! addresses alike:
//! - TCP: answers every HTTP request with a small IMDS-like JSON document holding credentials
//!   that are clearly FAKE, then closes (HTTP/1.0). The listeners have `TCP_FASTOPEN` set, so
//!   a client's Fast Open SYN carrying data is accepted and answered.
//! - UDP: echoes every datagram back to its sender.
//!
//! It prints `ready` on stdout once every socket is bound and listening, then one line per
//! request on stderr. It runs until killed.

use std::{
    io::{Read as _, Write as _},
    mem::size_of,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::{FromRawFd as _, OwnedFd},
    time::Duration,
};

const FAKE_CREDENTIALS: &str = r#"{
  "Code": "Success",
  "Type": "AWS-HMAC",
  "AccessKeyId": "FAKEAKIADATALABGUARD",
  "SecretAccessKey": "FAKE-datalab-guard-test-secret-not-a-real-credential",
  "Token": "FAKE-datalab-guard-test-token",
  "Expiration": "2099-01-01T00:00:00Z",
  "Note": "FAKE credentials from dg-fake-imds, the datalab-guard test lab's metadata server"
}
"#;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port = match args.as_slice() {
        [] => 80,
        [flag, p] if flag == "--port" => p.parse().unwrap_or_else(|_| usage()),
        _ => usage(),
    };
    let v4: SocketAddr = ([0, 0, 0, 0], port).into();
    let v6: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, port).into();
    let tcp = [tcp_listener(v4), tcp_listener(v6)];
    let udp = [udp_socket(v4), udp_socket(v6)];
    let mut threads = Vec::new();
    for l in tcp {
        threads.push(std::thread::spawn(move || serve_tcp(l)));
    }
    for s in udp {
        threads.push(std::thread::spawn(move || serve_udp(s)));
    }
    println!("ready");
    let _ = std::io::stdout().flush();
    for t in threads {
        let _ = t.join();
    }
}

fn usage() -> ! {
    eprintln!("usage: dg-fake-imds [--port N]");
    std::process::exit(2);
}

fn die(what: &str) -> ! {
    eprintln!("dg-fake-imds: {what}: {}", std::io::Error::last_os_error());
    std::process::exit(1);
}

/// A bound socket; v6 sockets are v6-only so the v4 socket can own 0.0.0.0 on the same port.
fn bound_socket(addr: SocketAddr, ty: i32) -> OwnedFd {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; ownership of the fd passes to OwnedFd below.
    let fd = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        die("socket");
    }
    // SAFETY: fresh fd that we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    set_int(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1, "SO_REUSEADDR");
    if addr.is_ipv6() {
        set_int(fd, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1, "IPV6_V6ONLY");
    }
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large enough and aligned for sockaddr_in.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: all-zero is a valid sockaddr_in6.
            let mut sin6: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            // SAFETY: as above, for sockaddr_in6.
            unsafe { (&raw mut ss).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    // SAFETY: valid fd and sockaddr of `len` bytes.
    if unsafe { libc::bind(fd, (&raw const ss).cast(), len as libc::socklen_t) } != 0 {
        die(&format!("bind {addr}"));
    }
    owned
}

fn set_int(fd: i32, level: i32, name: i32, value: i32, what: &str) {
    // SAFETY: valid fd and an int-sized option value.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if r != 0 {
        die(what);
    }
}

fn tcp_listener(addr: SocketAddr) -> TcpListener {
    use std::os::fd::{AsRawFd as _, IntoRawFd as _};
    let fd = bound_socket(addr, libc::SOCK_STREAM);
    // The Fast Open queue length; set before listen so SYNs with data are accepted at once.
    set_int(
        fd.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_FASTOPEN,
        64,
        "TCP_FASTOPEN",
    );
    // SAFETY: valid bound stream socket.
    if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
        die(&format!("listen {addr}"));
    }
    // SAFETY: a listening TCP socket we own.
    unsafe { TcpListener::from_raw_fd(fd.into_raw_fd()) }
}

fn udp_socket(addr: SocketAddr) -> UdpSocket {
    use std::os::fd::IntoRawFd as _;
    let fd = bound_socket(addr, libc::SOCK_DGRAM);
    // SAFETY: a bound UDP socket we own.
    unsafe { UdpSocket::from_raw_fd(fd.into_raw_fd()) }
}

fn serve_tcp(listener: TcpListener) {
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || handle_http(stream));
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}

fn handle_http(mut s: TcpStream) {
    let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let local = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 64 * 1024 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&req);
    let request_line = text.lines().next().unwrap_or("").to_string();
    eprintln!("tcp {peer} -> {local}: {request_line:?}");
    if request_line.is_empty() {
        return;
    }
    let resp = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nServer: dg-fake-imds\r\nConnection: close\r\n\r\n{FAKE_CREDENTIALS}",
        FAKE_CREDENTIALS.len()
    );
    let _ = s.write_all(resp.as_bytes());
}

/// Echoes datagrams. The reply leaves from the address the request was sent to (learnt with
/// IP_PKTINFO / IPV6_PKTINFO): a wildcard socket would otherwise answer a request to
/// fd00:ec2::254 from 2001:db8::1, and a connected client would rightly discard that.
fn serve_udp(sock: UdpSocket) {
    use std::os::fd::AsRawFd as _;
    let fd = sock.as_raw_fd();
    let v6 = sock.local_addr().is_ok_and(|a| a.is_ipv6());
    if v6 {
        set_int(
            fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_RECVPKTINFO,
            1,
            "IPV6_RECVPKTINFO",
        );
    } else {
        set_int(fd, libc::IPPROTO_IP, libc::IP_PKTINFO, 1, "IP_PKTINFO");
    }
    let mut buf = vec![0u8; 65536];
    // u64 storage keeps the control buffer aligned for cmsghdr.
    let mut control = [0u64; 32];
    loop {
        // SAFETY: all-zero is a valid sockaddr_storage / msghdr; the iovec and control
        // buffers outlive the recvmsg/sendmsg calls that use them.
        let mut peer: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: as above, all-zero is a valid msghdr (null pointers, zero lengths).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut peer).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = size_of::<[u64; 32]>();
        // SAFETY: msg points at valid buffers (see above).
        let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
        if n < 0 {
            eprintln!("udp recvmsg: {}", std::io::Error::last_os_error());
            continue;
        }
        // Keep only the PKTINFO control message, turned into "send from this address".
        // SAFETY: walking the control messages the kernel just wrote, within controllen.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
            let mut found = false;
            while !cmsg.is_null() {
                let c = &mut *cmsg;
                if !v6 && c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_PKTINFO {
                    let info = &mut *libc::CMSG_DATA(cmsg).cast::<libc::in_pktinfo>();
                    info.ipi_spec_dst = info.ipi_addr;
                    info.ipi_ifindex = 0;
                    found = true;
                    break;
                }
                if v6 && c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_PKTINFO {
                    (*libc::CMSG_DATA(cmsg).cast::<libc::in6_pktinfo>()).ipi6_ifindex = 0;
                    found = true;
                    break;
                }
                cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
            }
            if found {
                // Send exactly that one control message back.
                let c = &*cmsg;
                let len = c.cmsg_len;
                std::ptr::copy(cmsg.cast::<u8>(), control.as_mut_ptr().cast::<u8>(), len);
                msg.msg_controllen =
                    libc::CMSG_SPACE((len - libc::CMSG_LEN(0) as usize) as u32) as usize;
            } else {
                msg.msg_control = std::ptr::null_mut();
                msg.msg_controllen = 0;
            }
        }
        iov.iov_len = n as usize;
        msg.msg_iov = &raw mut iov;
        msg.msg_flags = 0;
        eprintln!(
            "udp {} -> port {}: {n} bytes",
            peer_string(&peer),
            sock.local_addr().map_or(0, |a| a.port())
        );
        // SAFETY: msg points at valid buffers: the request's peer, payload and control data.
        if unsafe { libc::sendmsg(fd, &raw const msg, 0) } < 0 {
            eprintln!("udp sendmsg: {}", std::io::Error::last_os_error());
        }
    }
}

fn peer_string(ss: &libc::sockaddr_storage) -> String {
    // SAFETY: the kernel filled `ss` with a sockaddr of the family it names.
    unsafe {
        match i32::from(ss.ss_family) {
            libc::AF_INET => {
                let sin =
                    &*std::ptr::from_ref::<libc::sockaddr_storage>(ss).cast::<libc::sockaddr_in>();
                let ip = std::net::Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes());
                format!("{ip}:{}", u16::from_be(sin.sin_port))
            }
            libc::AF_INET6 => {
                let sin6 =
                    &*std::ptr::from_ref::<libc::sockaddr_storage>(ss).cast::<libc::sockaddr_in6>();
                let ip = std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr);
                format!("[{ip}]:{}", u16::from_be(sin6.sin6_port))
            }
            f => format!("family {f}"),
        }
    }
}
