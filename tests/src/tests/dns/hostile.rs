//! The DNS server against hostile input: responses and garbage (a spoofed packet between two
//! servers must not bounce), TCP clients that hold connections or outrun the file descriptors,
//! floods of names that must be forwarded to a silent upstream, and an upstream that forwards
//! back to the server itself. Each limit's refusals are read back from `weir dns --metrics`.
use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    os::unix::process::CommandExt,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use super::dig_at;
use crate::weir_bin;
use weir_dns::server::MAX_TCP_CONNECTIONS;
use weir_testkit::{
    probe::{dns_message, http_get, metric, proc_status_kib},
    tag, Netns, Node, NodeExt, Proc, RunDir,
};

const ZONE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
                    spec: {clusterIP: 198.19.0.10, ports: [{port: 80}]}\n";

/// A node namespace with a pod, `weir dns` servers on addresses of its loopback.
struct Bed {
    node: Node,
    dir: RunDir,
    servers: Vec<Proc>,
}

impl Bed {
    fn new(addrs: &[&str]) -> Self {
        let t = format!("h{}", tag());
        let dir = RunDir::create(&format!("/run/weir-{t}")).unwrap();
        let mut node = Node::create(&t).unwrap();
        for a in addrs {
            node.ns
                .ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])
                .unwrap();
        }
        node.add_pod("cli", 10).unwrap();
        std::fs::write(dir.0.join("zone.yaml"), ZONE).unwrap();
        Bed {
            node,
            dir,
            servers: Vec::new(),
        }
    }

    fn pod(&self) -> &Netns {
        &self.node.pod("cli").unwrap().ns
    }

    /// `weir dns` on `listen`:53 with its metrics on `listen`:9153; at most `nofile` open
    /// files when given. Returns once it answers.
    fn serve(&mut self, listen: &str, extra: &[&str], nofile: Option<u64>) -> u32 {
        let mut cmd = self.node.ns.command(weir_bin().unwrap()).unwrap();
        cmd.args(["dns", "--source"])
            .arg(format!("file:{}", self.dir.0.join("zone.yaml").display()))
            .args(["--listen", &format!("{listen}:53")])
            .args(["--metrics", &format!("{listen}:9153")])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(n) = nofile {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let p = Proc::spawn("weir dns", cmd).unwrap();
        let pid = p.child.id();
        self.servers.push(p);
        let to: SocketAddr = format!("{listen}:53").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ask(
            self.pod(),
            to,
            &dns_message(1, "web.demo.svc.cluster.local", false),
        )
        .is_none()
        {
            assert!(
                Instant::now() < deadline,
                "weir dns on {listen} never answered"
            );
            thread::sleep(Duration::from_millis(100));
        }
        pid
    }

    /// A counter or gauge of the server on `listen` (0 when absent).
    fn metric(&self, listen: &str, name: &str) -> f64 {
        let addr: SocketAddr = format!("{listen}:9153").parse().unwrap();
        let body = http_get(&self.node.ns, addr, "/metrics")
            .unwrap_or_else(|| panic!("no metrics from {addr}"));
        metric(&body, name).unwrap_or(0.0)
    }
}

/// Sends `msg` from a fresh socket in `ns` and waits 300 ms for one reply.
fn ask(ns: &Netns, to: SocketAddr, msg: &[u8]) -> Option<Vec<u8>> {
    let msg = msg.to_vec();
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
        s.send_to(&msg, to).ok()?;
        let mut buf = [0u8; 2048];
        let n = s.recv(&mut buf).ok()?;
        Some(buf[..n].to_vec())
    })
    .unwrap()
}

/// Sends one UDP datagram from a forged source (a raw socket in `ns`).
fn forge(ns: &Netns, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
    let (SocketAddr::V4(f), SocketAddr::V4(t)) = (from, to) else {
        panic!("IPv4 only");
    };
    let mut pkt = Vec::new();
    etherparse::PacketBuilder::ipv4(f.ip().octets(), t.ip().octets(), 64)
        .udp(f.port(), t.port())
        .write(&mut pkt, payload)
        .unwrap();
    ns.run(move || {
        // SAFETY: plain socket calls on a descriptor this closure owns and closes.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(t.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            let n = libc::sendto(
                fd,
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&sa as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            libc::close(fd);
            assert_eq!(n, pkt.len() as isize, "{}", std::io::Error::last_os_error());
        }
    })
    .unwrap();
}

/// A response is never answered: one forged between two servers (from one's port 53 to the
/// other's) is dropped, where it used to bounce between them for ever. Garbage shorter than a
/// header gets nothing; a query whose header parses gets FORMERR, at most a burst and then
/// ten a second per source.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn responses_are_never_answered_and_error_replies_are_rate_limited() {
    let (a, b) = ("198.18.0.60", "198.18.0.61");
    let mut bed = Bed::new(&[a, b]);
    bed.serve(a, &["--upstream", "198.18.0.55"], None);
    bed.serve(b, &["--upstream", "198.18.0.55"], None);
    let (a53, b53): (SocketAddr, SocketAddr) = (
        format!("{a}:53").parse().unwrap(),
        format!("{b}:53").parse().unwrap(),
    );
    let replies = |bed: &Bed| {
        bed.metric(a, "weir_dns_reply_duration_seconds_count")
            + bed.metric(b, "weir_dns_reply_duration_seconds_count")
    };
    let before = replies(&bed);
    // A response from A's port 53 to B, and a garbage query likewise: B's error reply is a
    // response, which A must drop.
    forge(
        &bed.node.ns,
        a53,
        b53,
        &dns_message(7, "web.demo.svc.cluster.local", true),
    );
    forge(
        &bed.node.ns,
        a53,
        b53,
        &[0, 7, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w'],
    );
    thread::sleep(Duration::from_secs(1));
    let bounced = replies(&bed) - before;
    assert!(
        bounced <= 1.0,
        "{bounced} replies between the two servers after two forged packets"
    );
    assert!(bed.metric(b, "weir_dns_dropped_total") >= 1.0);
    assert!(bed.metric(a, "weir_dns_dropped_total") >= 1.0);

    let pod = bed.pod();
    assert_eq!(
        ask(
            pod,
            a53,
            &dns_message(9, "web.demo.svc.cluster.local", true)
        ),
        None
    );
    assert_eq!(ask(pod, a53, &[1, 2, 3, 4, 5]), None);
    let formerr = ask(pod, a53, &[0, 9, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w']);
    assert!(
        formerr
            .as_ref()
            .is_some_and(|r| r[..2] == [0, 9] && r[2] & 0x80 != 0 && r[3] & 0x0f == 1),
        "FORMERR expected: {formerr:?}"
    );
    // 200 garbage queries at once from one socket: a burst of answers, then the rate.
    let answered = pod
        .run(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            for i in 0..200u16 {
                let mut q = vec![0, 0, 0x01, 0, 0, 1, 0, 0, 0, 0, 0, 0, 3, b'w'];
                q[..2].copy_from_slice(&i.to_be_bytes());
                s.send_to(&q, a53).unwrap();
            }
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            let mut buf = [0u8; 512];
            let mut n = 0;
            while s.recv(&mut buf).is_ok() {
                n += 1;
            }
            n
        })
        .unwrap();
    assert!(
        (1..=40).contains(&answered),
        "{answered} of 200 garbage queries answered"
    );
    assert!(bed.metric(a, "weir_dns_errors_limited_total") >= 150.0);
    // Real queries from the same source are still answered.
    assert!(ask(
        pod,
        a53,
        &dns_message(10, "web.demo.svc.cluster.local", false)
    )
    .is_some());
}

/// TCP outlives what used to end it: running out of file descriptors (accepts fail, and are
/// retried), a client that announces 65 535 bytes and sends ten (closed after the message
/// timeout), and more connections than the limit (the ones past it closed at once).
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn tcp_survives_slow_clients_its_connection_limit_and_running_out_of_descriptors() {
    let (a, b) = ("198.18.0.60", "198.18.0.61");
    let mut bed = Bed::new(&[a, b]);
    let (a53, b53): (SocketAddr, SocketAddr) = (
        format!("{a}:53").parse().unwrap(),
        format!("{b}:53").parse().unwrap(),
    );
    // 128 descriptors: 200 connections run the server out.
    bed.serve(a, &["--upstream", "198.18.0.55"], Some(128));
    let held = bed
        .pod()
        .run(move || {
            (0..200)
                .filter_map(|_| TcpStream::connect_timeout(&a53, Duration::from_secs(1)).ok())
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(held.len() > 128, "{} connections", held.len());
    thread::sleep(Duration::from_millis(500));
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = dig_at(
            bed.pod(),
            a,
            &["+tcp", "+short", "web.demo.svc.cluster.local", "A"],
        );
        if out.trim() == "198.19.0.10" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TCP not answered after the descriptors came back: {out}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    assert!(bed.metric(a, "weir_dns_tcp_accept_errors_total") >= 1.0);

    // A message that never comes: the connection is closed within the message timeout.
    let closed_after = bed
        .pod()
        .run(move || {
            use std::io::{Read, Write};
            let mut c = TcpStream::connect(a53).unwrap();
            c.write_all(&[0xff, 0xff, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0])
                .unwrap();
            c.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            let t0 = Instant::now();
            let mut buf = [0u8; 16];
            let r = c.read(&mut buf);
            (r.ok(), t0.elapsed())
        })
        .unwrap();
    assert_eq!(closed_after.0, Some(0), "closed by the server");
    assert!(
        closed_after.1 < Duration::from_secs(8),
        "closed after {:?}",
        closed_after.1
    );
    assert!(bed.metric(a, "weir_dns_tcp_timeouts_total") >= 1.0);

    // More idle connections than the limit (a server with descriptors enough): the ones past
    // it are closed at once, and the rest answer.
    bed.serve(b, &["--upstream", "198.18.0.55"], None);
    let (refused_fast, answered) = bed
        .pod()
        .run(move || {
            use std::io::{Read, Write};
            let mut idle: Vec<TcpStream> = (0..MAX_TCP_CONNECTIONS)
                .map(|_| TcpStream::connect(b53).unwrap())
                .collect();
            thread::sleep(Duration::from_millis(300));
            let mut extra = TcpStream::connect(b53).unwrap();
            extra
                .set_read_timeout(Some(Duration::from_secs(3)))
                .unwrap();
            let mut buf = [0u8; 512];
            let r = extra.read(&mut buf);
            let refused_fast = matches!(r, Ok(0))
                || r.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset);
            // One of the held connections asks: it is served.
            let q = dns_message(3, "web.demo.svc.cluster.local", false);
            let c = &mut idle[0];
            c.write_all(&(q.len() as u16).to_be_bytes()).unwrap();
            c.write_all(&q).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let answered = c.read(&mut buf).is_ok_and(|n| n > 2);
            (refused_fast, answered)
        })
        .unwrap();
    assert!(refused_fast, "the connection past the limit was not closed");
    assert!(answered, "a held connection was not served");
    assert!(bed.metric(b, "weir_dns_tcp_refused_total") >= 1.0);
}

/// Forwarding is bounded: 3 000 names for a silent upstream leave at most the forward limit
/// waiting (the rest REFUSED at once), the server's memory low, and cluster names answered
/// meanwhile. An upstream that is the server itself is found by the loop probe and not used:
/// its names get SERVFAIL at once instead of forwarding into itself.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn forwarding_is_bounded_and_an_upstream_that_loops_back_is_not_used() {
    let (a, b, silent) = ("198.18.0.60", "198.18.0.61", "198.18.0.62");
    let mut bed = Bed::new(&[a, b, silent]);
    // The silent upstream: a socket that never reads.
    let _silent = bed
        .node
        .ns
        .run(move || UdpSocket::bind(format!("{silent}:53")).unwrap())
        .unwrap();
    let pid = bed.serve(a, &["--upstream", silent], None);
    let a53: SocketAddr = format!("{a}:53").parse().unwrap();
    let base = proc_status_kib(pid, "VmRSS").unwrap();
    let flood = bed.pod().run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 0..3000u16 {
            s.send_to(&dns_message(i, &format!("n{i}.example.org"), false), a53)
                .unwrap();
            if i % 100 == 99 {
                thread::sleep(Duration::from_millis(10));
            }
        }
        s
    });
    let flood = flood.unwrap();
    let in_flight = bed.metric(a, "weir_dns_forwards_in_flight");
    let peak = proc_status_kib(pid, "VmRSS").unwrap();
    let refused = bed.metric(a, "weir_dns_forwards_refused_total");
    assert!(in_flight <= 1000.0, "{in_flight} forwards waiting");
    // 3 000 sent, at most 1 000 waiting: the rest refused (some may be lost in the socket's
    // buffer under the burst).
    assert!(refused >= 1000.0, "{refused} refused");
    assert!(
        peak < 64 * 1024,
        "RSS {peak} KiB during the flood (before: {base} KiB)"
    );
    let out = dig_at(bed.pod(), a, &["+short", "web.demo.svc.cluster.local", "A"]);
    assert_eq!(out.trim(), "198.19.0.10", "a cluster name during the flood");
    drop(flood);

    // The server as its own upstream.
    bed.serve(b, &["--upstream", &format!("{b}:53")], None);
    let deadline = Instant::now() + Duration::from_secs(5);
    while bed.metric(b, "weir_dns_upstreams_looping") < 1.0 {
        assert!(Instant::now() < deadline, "the loop was not found");
        thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    let out = dig_at(bed.pod(), b, &["example.org", "A"]);
    assert!(out.contains("status: SERVFAIL"), "{out}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    assert!(bed.metric(b, "weir_dns_upstream_loops_total") >= 1.0);
    assert_eq!(bed.metric(b, "weir_dns_forwards_in_flight"), 0.0);
}
