//! Open-loop, constant-rate service load test.
//!
//! Request `i` is due at `start + i/rate` whatever happened before it. Its latency is measured
//! from that due time, not from when a worker got round to sending it, so a stall shows up in
//! the percentiles as the queueing it caused (the coordinated-omission correction). The loop
//! is bounded by `rate × duration` requests and by the duration plus one timeout.
//!
//! Workers are OS threads with blocking sockets and a 1 ns timer slack: an async runtime's
//! millisecond timer would add up to a millisecond of lateness to every due time, and hide
//! the microseconds this tool exists to measure.
use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream, ToSocketAddrs, UdpSocket},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub target: String,
    pub rate: u32,
    pub duration: Duration,
    pub proto: Proto,
    /// Concurrent workers: persistent connections, or at most this many requests in flight
    /// with `new_conn`.
    pub connections: usize,
    /// A new connection (TCP) or socket (UDP) per request.
    pub new_conn: bool,
    /// UDP with `sendto` on an unconnected socket instead of `connect`.
    pub unconnected: bool,
    pub timeout: Duration,
    pub progress: bool,
    /// Closed loop: each worker sends its next request as soon as the previous one is answered,
    /// for `duration`; latency is then measured from the send. For maximum rates.
    pub closed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub target: String,
    pub resolved: String,
    pub proto: Proto,
    pub mode: String,
    pub rate: u32,
    pub duration_s: f64,
    pub sent: u64,
    pub ok: u64,
    pub errors: BTreeMap<String, u64>,
    pub achieved_rate: f64,
    pub latency: Latency,
    /// Replies per backend (the name the backend answered with).
    pub backends: BTreeMap<String, u64>,
}

impl Report {
    /// Parses the report `weir loadtest --json` prints.
    pub fn from_json(bytes: &[u8]) -> anyhow::Result<Report> {
        serde_json::from_slice(bytes).with_context(|| {
            format!(
                "parse a loadtest report: {}",
                String::from_utf8_lossy(bytes)
            )
        })
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Share of the answered requests each backend served, in percent.
    pub fn shares(&self) -> BTreeMap<String, f64> {
        let total: u64 = self.backends.values().sum();
        self.backends
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    if total == 0 {
                        0.0
                    } else {
                        *v as f64 * 100.0 / total as f64
                    },
                )
            })
            .collect()
    }

    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} {} ({}), {} req/s for {:.1}s, {}",
            format!("{:?}", self.proto).to_uppercase(),
            self.target,
            self.resolved,
            self.rate,
            self.duration_s,
            self.mode
        );
        let _ = writeln!(
            s,
            "  requests  {} sent, {} ok, {} errors, {:.0} ok/s",
            self.sent,
            self.ok,
            self.error_count(),
            self.achieved_rate
        );
        for (k, v) in &self.errors {
            let _ = writeln!(s, "    error {k}: {v}");
        }
        let l = &self.latency;
        let _ = writeln!(
            s,
            "  latency   p50 {:.1}µs  p90 {:.1}µs  p99 {:.1}µs  p99.9 {:.1}µs  max {:.1}µs",
            l.p50_us, l.p90_us, l.p99_us, l.p999_us, l.max_us
        );
        for (k, v) in self.shares() {
            let _ = writeln!(s, "  backend   {k:<12} {v:5.1}%  ({})", self.backends[&k]);
        }
        s
    }
}

struct Tally {
    hist: Option<Histogram<u64>>,
    errors: BTreeMap<String, u64>,
    backends: BTreeMap<String, u64>,
}

/// Latencies in nanoseconds: kept-alive round trips on one CPU take a few microseconds, and a
/// 5 % difference must be visible.
fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(100, 120_000_000_000, 3).expect("valid histogram bounds")
}

fn classify(e: &io::Error) -> String {
    // A connected UDP socket the agent aborted (its backend left) is unconnected again: a
    // send without an address fails so.
    if e.raw_os_error() == Some(libc::EDESTADDRREQ) {
        return "disconnected".into();
    }
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "refused".into(),
        io::ErrorKind::ConnectionReset => "reset".into(),
        io::ErrorKind::ConnectionAborted => "aborted".into(),
        io::ErrorKind::TimedOut => "timeout".into(),
        io::ErrorKind::PermissionDenied => "denied".into(),
        io::ErrorKind::UnexpectedEof => "closed".into(),
        k => format!("{k:?}").to_lowercase(),
    }
}

struct Shared {
    next: AtomicU64,
    ok: AtomicU64,
    err: AtomicU64,
    total: u64,
    start: Instant,
    interval: Duration,
    closed: bool,
    duration: Duration,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            hist: Some(new_hist()),
            errors: BTreeMap::new(),
            backends: BTreeMap::new(),
        }
    }
}

impl Shared {
    /// The next request to send and when it is due, or None when all are taken.
    fn take(&self) -> Option<(u64, Instant)> {
        if self.closed {
            let now = Instant::now();
            if now >= self.start + self.duration {
                return None;
            }
            return Some((self.next.fetch_add(1, Ordering::Relaxed), now));
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        (i < self.total).then(|| (i, self.start + self.interval.mul_f64(i as f64)))
    }
}

fn sleep_until(due: Instant) {
    let now = Instant::now();
    if due > now {
        thread::sleep(due - now);
    }
}

fn precise_timers() {
    // SAFETY: prctl on the calling thread with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
}

pub fn run(spec: Spec) -> Result<Report> {
    if spec.rate == 0 || spec.connections == 0 {
        bail!("--rate and --connections must be at least 1");
    }
    let target: SocketAddr = spec
        .target
        .to_socket_addrs()
        .with_context(|| format!("resolve {}", spec.target))?
        .next()
        .with_context(|| format!("{} resolves to no address", spec.target))?;
    let total = (spec.rate as f64 * spec.duration.as_secs_f64())
        .round()
        .max(1.0) as u64;
    let shared = Shared {
        next: AtomicU64::new(0),
        ok: AtomicU64::new(0),
        err: AtomicU64::new(0),
        total,
        start: Instant::now() + Duration::from_millis(20),
        interval: Duration::from_secs_f64(1.0 / spec.rate as f64),
        closed: spec.closed,
        duration: spec.duration,
    };
    let done = AtomicBool::new(false);
    let workers = if spec.closed {
        spec.connections
    } else {
        spec.connections.min(total as usize)
    };
    let tallies: Vec<Tally> = thread::scope(|sc| {
        if spec.progress {
            let (sh, done, dur) = (&shared, &done, spec.duration);
            sc.spawn(move || {
                let mut next = sh.start + Duration::from_secs(1);
                while !done.load(Ordering::Relaxed) {
                    if Instant::now() < next {
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    next += Duration::from_secs(1);
                    eprintln!(
                        "  {:>4.0}s/{:.0}s  sent {:>7}  ok {:>7}  errors {}",
                        sh.start.elapsed().as_secs_f64(),
                        dur.as_secs_f64(),
                        sh.next.load(Ordering::Relaxed).min(sh.total),
                        sh.ok.load(Ordering::Relaxed),
                        sh.err.load(Ordering::Relaxed)
                    );
                }
            });
        }
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let (sh, sp) = (&shared, &spec);
                sc.spawn(move || {
                    precise_timers();
                    match sp.proto {
                        Proto::Tcp => tcp_worker(sp, target, sh),
                        Proto::Udp => udp_worker(sp, target, sh),
                    }
                })
            })
            .collect();
        let out = handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect();
        done.store(true, Ordering::Relaxed);
        out
    });
    let mut tally = Tally {
        hist: Some(new_hist()),
        ..Default::default()
    };
    for w in tallies {
        if let (Some(h), Some(wh)) = (tally.hist.as_mut(), w.hist.as_ref()) {
            h.add(wh).context("merge histograms")?;
        }
        for (k, v) in w.errors {
            *tally.errors.entry(k).or_default() += v;
        }
        for (k, v) in w.backends {
            *tally.backends.entry(k).or_default() += v;
        }
    }
    let elapsed = shared
        .start
        .elapsed()
        .as_secs_f64()
        .max(spec.duration.as_secs_f64());
    let h = tally.hist.unwrap_or_else(new_hist);
    let q = |p: f64| {
        if h.is_empty() {
            0.0
        } else {
            h.value_at_quantile(p) as f64 / 1000.0
        }
    };
    let ok = shared.ok.load(Ordering::Relaxed);
    let sent = if spec.closed {
        ok + shared.err.load(Ordering::Relaxed)
    } else {
        total
    };
    Ok(Report {
        target: spec.target.clone(),
        resolved: target.to_string(),
        proto: spec.proto,
        mode: if spec.closed {
            format!(
                "closed loop, {} worker(s), {}",
                spec.connections,
                if spec.new_conn {
                    "new connection per request"
                } else {
                    "persistent connections"
                }
            )
        } else if spec.new_conn {
            format!(
                "new connection per request, up to {} in flight",
                spec.connections
            )
        } else {
            format!("{} persistent connections", spec.connections)
        },
        rate: spec.rate,
        duration_s: spec.duration.as_secs_f64(),
        sent,
        ok,
        errors: tally.errors,
        achieved_rate: ok as f64 / elapsed,
        latency: Latency {
            p50_us: q(0.5),
            p90_us: q(0.9),
            p99_us: q(0.99),
            p999_us: q(0.999),
            max_us: if h.is_empty() {
                0.0
            } else {
                h.max() as f64 / 1000.0
            },
            mean_us: if h.is_empty() { 0.0 } else { h.mean() / 1000.0 },
        },
        backends: tally.backends,
    })
}

fn record(t: &mut Tally, sh: &Shared, due: Instant, res: Result<String, String>) {
    match res {
        Ok(name) => {
            let ns = (due.elapsed().as_nanos() as u64).max(100);
            if let Some(h) = t.hist.as_mut() {
                let _ = h.record(ns.min(h.high()));
            }
            *t.backends.entry(name).or_default() += 1;
            sh.ok.fetch_add(1, Ordering::Relaxed);
        }
        Err(kind) => {
            *t.errors.entry(kind).or_default() += 1;
            sh.err.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Checks an answer `<name> <seq>` and returns the name.
fn parse_reply(reply: &str, seq: u64) -> Result<String, String> {
    let mut it = reply.trim().rsplitn(2, ' ');
    match (it.next(), it.next()) {
        (Some(s), Some(name)) if s == seq.to_string() => Ok(name.to_string()),
        _ => Err("bad_reply".into()),
    }
}

fn timeout_kind(e: &io::Error) -> String {
    if matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    ) {
        "timeout".into()
    } else {
        classify(e)
    }
}

struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

fn connect(target: SocketAddr, timeout: Duration) -> Result<Conn, String> {
    let s = TcpStream::connect_timeout(&target, timeout).map_err(|e| timeout_kind(&e))?;
    // The client must see the service as its peer, whatever backend it reached.
    if s.peer_addr().ok() != Some(target) {
        return Err("peer_not_service_address".into());
    }
    connected(s, timeout).map_err(|e| classify(&e))
}

fn connected(s: TcpStream, timeout: Duration) -> io::Result<Conn> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(Conn {
        reader: BufReader::new(s.try_clone()?),
        writer: s,
    })
}

fn exchange(c: &mut Conn, seq: u64, line: &mut String) -> Result<String, String> {
    c.writer
        .write_all(format!("{seq}\n").as_bytes())
        .map_err(|e| classify(&e))?;
    line.clear();
    match c.reader.read_line(line) {
        Ok(0) => Err("closed".into()),
        Ok(_) => parse_reply(line, seq),
        Err(e) => Err(timeout_kind(&e)),
    }
}

fn tcp_worker(spec: &Spec, target: SocketAddr, sh: &Shared) -> Tally {
    let mut t = Tally {
        hist: Some(new_hist()),
        ..Default::default()
    };
    let mut conn: Option<Conn> = None;
    let mut line = String::new();
    while let Some((seq, due)) = sh.take() {
        sleep_until(due);
        let res = (|| {
            if spec.new_conn || conn.is_none() {
                conn = Some(connect(target, spec.timeout)?);
            }
            let c = conn.as_mut().ok_or("closed")?;
            exchange(c, seq, &mut line)
        })();
        if res.is_err() || spec.new_conn {
            conn = None;
        }
        record(&mut t, sh, due, res);
    }
    t
}

fn udp_socket(target: SocketAddr, connect: bool, timeout: Duration) -> io::Result<UdpSocket> {
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    }
    .parse()
    .map_err(|_| io::Error::other("bind address"))?;
    let s = UdpSocket::bind(bind)?;
    if connect {
        s.connect(target)?;
    }
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}

fn udp_exchange(
    s: &UdpSocket,
    target: SocketAddr,
    connected: bool,
    seq: u64,
    deadline: Instant,
) -> Result<String, String> {
    let msg = seq.to_string();
    if connected {
        s.send(msg.as_bytes()).map_err(|e| classify(&e))?;
    } else {
        s.send_to(msg.as_bytes(), target)
            .map_err(|e| classify(&e))?;
    }
    let mut buf = [0u8; 512];
    loop {
        let (n, from) = s.recv_from(&mut buf).map_err(|e| timeout_kind(&e))?;
        // Replies must come from the address we sent to (the service address): that is what
        // the recvmsg translation and the reverse NAT guarantee.
        if from != target {
            return Err("reply_from_wrong_address".into());
        }
        match parse_reply(&String::from_utf8_lossy(&buf[..n]), seq) {
            Ok(name) => return Ok(name),
            // A late answer to an earlier, timed-out request: keep waiting for ours.
            Err(_) if Instant::now() < deadline => continue,
            Err(_) => return Err("timeout".into()),
        }
    }
}

fn udp_worker(spec: &Spec, target: SocketAddr, sh: &Shared) -> Tally {
    let mut t = Tally {
        hist: Some(new_hist()),
        ..Default::default()
    };
    let connected = !spec.unconnected;
    let mut sock: Option<UdpSocket> = None;
    while let Some((seq, due)) = sh.take() {
        sleep_until(due);
        let res = (|| {
            if spec.new_conn || sock.is_none() {
                sock = Some(udp_socket(target, connected, spec.timeout).map_err(|e| classify(&e))?);
            }
            let s = sock.as_ref().ok_or("closed")?;
            udp_exchange(s, target, connected, seq, Instant::now() + spec.timeout)
        })();
        // A socket that failed (aborted because its backend left, say) is replaced, as a
        // client would; one that only waited too long is kept (a late reply is skipped).
        if res.as_ref().is_err_and(|k| k != "timeout") {
            sock = None;
        }
        record(&mut t, sh, due, res);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_matched_to_their_request() {
        assert_eq!(parse_reply("be-1 42\n", 42), Ok("be-1".into()));
        assert_eq!(parse_reply("be-1 41", 42), Err("bad_reply".into()));
        assert_eq!(parse_reply("garbage", 1), Err("bad_reply".into()));
    }

    /// Open loop against a local echo server: every scheduled request is sent and answered,
    /// over TCP and UDP, and the backend's name is counted.
    #[test]
    fn open_loop_counts_every_request() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        thread::spawn(move || {
            rt.block_on(crate::tools::echo::serve(
                "local".into(),
                std::net::Ipv6Addr::UNSPECIFIED.into(),
                port,
            ))
        });
        thread::sleep(Duration::from_millis(100));
        let spec = Spec {
            target: format!("127.0.0.1:{port}"),
            rate: 500,
            duration: Duration::from_millis(400),
            proto: Proto::Tcp,
            connections: 1,
            new_conn: false,
            unconnected: false,
            timeout: Duration::from_secs(1),
            progress: false,
            closed: false,
        };
        let r = run(spec.clone()).unwrap();
        assert_eq!(r.sent, 200);
        assert_eq!(r.ok, 200, "{:?}", r.errors);
        assert_eq!(r.backends.get("local"), Some(&200));
        let u = run(Spec {
            proto: Proto::Udp,
            ..spec.clone()
        })
        .unwrap();
        assert_eq!(u.ok, 200, "{:?}", u.errors);
        let c = run(Spec {
            closed: true,
            duration: Duration::from_millis(200),
            ..spec
        })
        .unwrap();
        assert!(
            c.ok > 200,
            "closed loop runs back to back: {} in 200 ms",
            c.ok
        );
        assert_eq!(c.sent, c.ok + c.error_count());
    }
}
