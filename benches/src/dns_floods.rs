//! `dns-floods` (B5F in RESULTS.md): `weir dns` under the floods of issue 22, each beside the
//! same server with no flood (the baseline, in the same run): its memory before, at the peak and
//! after, and the latency of cluster-name queries a pod keeps asking meanwhile.
//!
//! The server runs alone on CPU 1 with its limits as shipped; its upstream is a socket that never
//! answers. A probe pod asks a cluster name 500 times a second (each query waits up to 1 s) for
//! the flood's length; a second pod floods:
//! - **responses and garbage**: forged DNS responses and unparsable queries, 20 000 a second;
//! - **forwards to a silent upstream**: 10 000 distinct outside names a second;
//! - **forwards into itself**: the same against a server that is its own upstream;
//! - **slow TCP**: 2 000 connections that announce 65 535 bytes and send ten.
//!
//! Resident set sampled every 100 ms; "after" is 5 s after the flood stopped.
use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use weir_testkit::{
    probe::{dns_message, http_get, metric, proc_status_kib},
    tag, Netns, Node, NodeExt, Proc, RunDir,
};

use crate::results;

const SERVER: &str = "198.18.0.53";
const LOOPING: &str = "198.18.0.54";
const SILENT: &str = "198.18.0.62";
const PROBE_NAME: &str = "svc-1.demo.svc.cluster.local";

#[derive(Clone, Copy)]
enum Flood {
    None,
    Garbage,
    Forwards,
    Slowloris,
}

/// Sends `flood` at `to` from `ns` for `secs`, bounded: a rate, never more.
fn flood(ns: &Netns, kind: Flood, to: SocketAddr, secs: u64) -> Result<u64> {
    ns.run(move || -> u64 {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut sent = 0u64;
        match kind {
            Flood::None => thread::sleep(Duration::from_secs(secs)),
            Flood::Garbage | Flood::Forwards => {
                let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
                    return 0;
                };
                let _ = s.set_nonblocking(true);
                let per_ms = if matches!(kind, Flood::Garbage) {
                    20
                } else {
                    10
                };
                let mut tick = Instant::now();
                while Instant::now() < end {
                    for _ in 0..per_ms {
                        let id = sent as u16;
                        let m = match kind {
                            Flood::Garbage if sent.is_multiple_of(2) => {
                                dns_message(id, PROBE_NAME, true)
                            }
                            Flood::Garbage => {
                                vec![(id >> 8) as u8, id as u8, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 9]
                            }
                            _ => dns_message(id, &format!("n{sent}.example.org"), false),
                        };
                        let _ = s.send_to(&m, to);
                        sent += 1;
                    }
                    // Replies are read and thrown away, as a client that does not care would.
                    let mut buf = [0u8; 512];
                    while s.recv(&mut buf).is_ok() {}
                    tick += Duration::from_millis(1);
                    if let Some(d) = tick.checked_duration_since(Instant::now()) {
                        thread::sleep(d);
                    }
                }
            }
            Flood::Slowloris => {
                let mut held = Vec::new();
                for _ in 0..2000 {
                    if let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_millis(500)) {
                        let _ = c.write_all(&[0xff, 0xff, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
                        held.push(c);
                        sent += 1;
                    }
                    if Instant::now() >= end {
                        break;
                    }
                }
                if let Some(d) = end.checked_duration_since(Instant::now()) {
                    thread::sleep(d);
                }
            }
        }
        sent
    })
    .context("flood")
}

struct Probe {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    lost: usize,
    asked: usize,
}

/// Asks the cluster name every 2 ms for `secs`, each waiting up to 1 s.
fn probe(ns: &Netns, to: SocketAddr, secs: u64) -> Result<Probe> {
    let lat = ns
        .run(move || -> Vec<Option<f64>> {
            let mut out = Vec::new();
            let Ok(s) = UdpSocket::bind("0.0.0.0:0") else {
                return out;
            };
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let end = Instant::now() + Duration::from_secs(secs);
            let mut tick = Instant::now();
            let mut id: u16 = 0;
            while Instant::now() < end {
                id = id.wrapping_add(1);
                let t0 = Instant::now();
                let _ = s.send_to(&dns_message(id, PROBE_NAME, false), to);
                let mut buf = [0u8; 512];
                let got = loop {
                    match s.recv(&mut buf) {
                        Ok(n) if n >= 2 && buf[..2] == id.to_be_bytes() => break true,
                        Ok(_) => continue,
                        Err(_) => break false,
                    }
                };
                out.push(got.then(|| t0.elapsed().as_secs_f64() * 1000.0));
                tick += Duration::from_millis(2);
                if let Some(d) = tick.checked_duration_since(Instant::now()) {
                    thread::sleep(d);
                }
            }
            out
        })
        .context("probe")?;
    let asked = lat.len();
    let mut ok: Vec<f64> = lat.into_iter().flatten().collect();
    if ok.is_empty() {
        bail!("dns-floods: the probe got no answer");
    }
    ok.sort_by(f64::total_cmp);
    let pct = |p: f64| ok[((ok.len() as f64 * p) as usize).min(ok.len() - 1)];
    Ok(Probe {
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: ok[ok.len() - 1],
        lost: asked - ok.len(),
        asked,
    })
}

/// The server's `weir_dns_*` counter `name`, from its metrics port (0 when absent).
fn counter(ns: &Netns, metrics: SocketAddr, name: &str) -> f64 {
    http_get(ns, metrics, "/metrics")
        .and_then(|text| metric(&text, name))
        .unwrap_or(0.0)
}

pub fn run(weir: &std::path::Path, quick: bool) -> Result<String> {
    let secs = if quick { 5 } else { 15 };
    let t = format!("b5f{}", tag());
    let dir = RunDir::create(&format!("/run/weir-{t}"))?;
    let mut node = Node::create(&t)?;
    for a in [SERVER, LOOPING, SILENT] {
        node.ns
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
    }
    node.add_pod("cli", 10)?;
    node.add_pod("atk", 11)?;
    let mut zone = String::new();
    for i in 0..100 {
        let _ = write!(
            zone,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: demo}}\n\
             spec: {{clusterIP: 198.19.1.{i}, ports: [{{port: 80}}]}}\n"
        );
    }
    fs::write(dir.0.join("zone.yaml"), zone)?;
    // The silent upstream: a socket that never reads.
    let _silent = node
        .ns
        .run(|| UdpSocket::bind(format!("{SILENT}:53")))
        .context("silent upstream")??;
    let server = |listen: &str, upstream: &str| -> Result<Proc> {
        let mut cmd = node.ns.command("taskset")?;
        cmd.args(["-c", "1"])
            .arg(weir)
            .args(["dns", "--source"])
            .arg(format!("file:{}", dir.0.join("zone.yaml").display()))
            .args(["--listen", &format!("{listen}:53")])
            .args(["--metrics", &format!("{listen}:9153")])
            .args(["--upstream", upstream])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let p = Proc::spawn("weir dns", cmd)?;
        let cli = &node.pod("cli").context("cli")?.ns;
        let to: SocketAddr = format!("{listen}:53").parse()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while probe_once(cli, to).is_none() {
            if Instant::now() > deadline {
                bail!("dns-floods: weir dns on {listen} never answered");
            }
            thread::sleep(Duration::from_millis(100));
        }
        Ok(p)
    };
    let cases: [(&str, Flood, &str, &str, &str); 5] = [
        ("none (baseline)", Flood::None, SERVER, SILENT, ""),
        (
            "responses and garbage, 20 000/s",
            Flood::Garbage,
            SERVER,
            SILENT,
            "weir_dns_dropped_total",
        ),
        (
            "forwards to a silent upstream, 10 000/s",
            Flood::Forwards,
            SERVER,
            SILENT,
            "weir_dns_forwards_refused_total",
        ),
        (
            "forwards into itself, 10 000/s",
            Flood::Forwards,
            LOOPING,
            LOOPING,
            "weir_dns_forwards_refused_total",
        ),
        (
            "slow TCP, 2 000 connections",
            Flood::Slowloris,
            SERVER,
            SILENT,
            "weir_dns_tcp_refused_total",
        ),
    ];
    let cli = &node.pod("cli").context("cli")?.ns;
    let atk = &node.pod("atk").context("atk")?.ns;
    let mut rows = Vec::new();
    for (label, kind, listen, upstream, count) in cases {
        eprintln!("dns-floods: {label}...");
        let p = server(listen, &format!("{upstream}:53"))?;
        let pid = p.child.id();
        thread::sleep(Duration::from_millis(500));
        let before = proc_status_kib(pid, "VmRSS").unwrap_or(0);
        let to: SocketAddr = format!("{listen}:53").parse()?;
        let metrics: SocketAddr = format!("{listen}:9153").parse()?;
        let (fl, pr) = thread::scope(|sc| {
            let fl = sc.spawn(|| flood(atk, kind, to, secs));
            let pr = sc.spawn(|| probe(cli, to, secs));
            let mut peak = before;
            while !fl.is_finished() {
                peak = peak.max(proc_status_kib(pid, "VmRSS").unwrap_or(0));
                thread::sleep(Duration::from_millis(100));
            }
            (
                fl.join()
                    .map_err(|_| anyhow::anyhow!("flood panicked"))
                    .and_then(|r| r)
                    .map(|n| (n, peak)),
                pr.join()
                    .map_err(|_| anyhow::anyhow!("probe panicked"))
                    .and_then(|r| r),
            )
        });
        let (sent, peak) = fl?;
        let pr = pr?;
        let mut peak = peak;
        let settle = Instant::now() + Duration::from_secs(5);
        while Instant::now() < settle {
            peak = peak.max(proc_status_kib(pid, "VmRSS").unwrap_or(0));
            thread::sleep(Duration::from_millis(100));
        }
        let after = proc_status_kib(pid, "VmRSS").unwrap_or(0);
        let refused = if count.is_empty() {
            0.0
        } else {
            counter(&node.ns, metrics, count)
        };
        drop(p);
        rows.push((label, sent, before, peak, after, pr, count, refused));
    }

    let mut o = String::new();
    let _ = writeln!(o, "## B5F: cluster DNS under floods\n");
    let _ = writeln!(o, "Machine: {}\n", results::machine());
    let _ = writeln!(
        o,
        "`weir dns` (100 services) alone on CPU 1, its upstream a socket that never answers (or, for the loop, \
         itself). For {secs} s a pod floods it while another asks a cluster name every 2 ms (1 s timeout); the \
         first row is the same with no flood. Resident set sampled every 100 ms; \"after\" is 5 s after the flood. \
         Limits as shipped (`weir dns --help`).\n"
    );
    let _ = writeln!(
        o,
        "| flood | sent | RSS before → peak → after (MiB) | probe p50 / p99 / max (ms) | probe lost | refused or dropped (counter) |\n|---|---|---|---|---|---|"
    );
    let base_p99 = rows.first().map(|r| r.5.p99_ms).unwrap_or(f64::NAN);
    let mut worst_peak = 0u64;
    let mut worst_p99 = 0f64;
    let mut worst_return = 0f64;
    for (label, sent, before, peak, after, pr, count, refused) in &rows {
        worst_peak = worst_peak.max(*peak);
        worst_p99 = worst_p99.max(pr.p99_ms);
        worst_return = worst_return.max(*after as f64 / (*before).max(1) as f64);
        let _ = writeln!(
            o,
            "| {label} | {sent} | {:.1} → {:.1} → {:.1} | {:.2} / {:.2} / {:.1} | {} of {} | {} |",
            *before as f64 / 1024.0,
            *peak as f64 / 1024.0,
            *after as f64 / 1024.0,
            pr.p50_ms,
            pr.p99_ms,
            pr.max_ms,
            pr.lost,
            pr.asked,
            if count.is_empty() {
                "–".to_string()
            } else {
                format!("{refused:.0} ({})", count.trim_start_matches("weir_dns_"))
            }
        );
    }
    let _ = writeln!(
        o,
        "\nTargets: RSS below 64 MiB under every flood: {} (worst peak {:.1} MiB); back near its baseline after: \
         worst after/before {:.2}; cluster-name p99 under 5 ms meanwhile: {} (worst {:.2} ms, {:.2} ms with no flood).",
        if worst_peak < 64 * 1024 { "met" } else { "NOT met" },
        worst_peak as f64 / 1024.0,
        worst_return,
        if worst_p99 < 5.0 { "met" } else { "NOT met" },
        worst_p99,
        base_p99
    );
    Ok(o)
}

/// One query for the probe name, 300 ms to answer.
fn probe_once(ns: &Netns, to: SocketAddr) -> Option<()> {
    ns.run(move || {
        let s = UdpSocket::bind("0.0.0.0:0").ok()?;
        s.set_read_timeout(Some(Duration::from_millis(300))).ok()?;
        s.send_to(&dns_message(1, PROBE_NAME, false), to).ok()?;
        let mut buf = [0u8; 512];
        s.recv(&mut buf).ok().map(|_| ())
    })
    .ok()
    .flatten()
}
