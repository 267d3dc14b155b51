//! `dns` (B5 in RESULTS.md): cluster DNS throughput, latency and memory: `weir dns` beside Knot DNS (authoritative)
//! and unbound (local data) serving the same records, in one run on this machine.
//!
//! The zone: services in 100 namespaces, 80 % with a cluster IP and a named port, 20 % headless
//! with 15 endpoint pods each (named, one named port). Knot's zone file and unbound's local data
//! are written from weir's own zone, record for record (PTR records aside: the query mix has
//! none). Each server runs pinned to CPU 1 with one worker thread; `dnsperf` runs in a pod
//! namespace pinned to CPU 0 and sends over the pod's veth. The query mix is half hits (A of a
//! service, A of a headless service, SRV) and half the misses a pod's search path makes
//! (`<svc>.<ns>.svc.cluster.local.<ns>.svc.cluster.local`, NXDOMAIN).
//!
//! Throughput: dnsperf with at most 64 queries outstanding for the run's length, so a server
//! is driven to what it can do; the loss it reports is shown. Latency: a second run at half of
//! that rate, each reply's latency from dnsperf's verbose output. Memory: the server's resident
//! set with the zone, less the same server with an empty zone, per object (service or pod).
use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use weir_testkit::{tag, Netns, Node, NodeExt, Proc, RunDir};

use crate::results;

const NAMESPACES: usize = 100;
const PODS_PER_HEADLESS: usize = 15;

struct Server {
    label: &'static str,
    addr: &'static str,
}

const WEIR: Server = Server {
    label: "weir dns",
    addr: "198.18.0.53",
};
const KNOT: Server = Server {
    label: "Knot DNS (authoritative)",
    addr: "198.18.0.54",
};
const UNBOUND: Server = Server {
    label: "unbound (local-data)",
    addr: "198.18.0.56",
};

/// Services and EndpointSlices in the source format; (services, pods).
fn objects(services: usize) -> (String, usize, usize) {
    let mut y = String::new();
    let mut pods = 0;
    for i in 0..services {
        let ns = format!("ns-{}", i % NAMESPACES);
        if i % 5 == 4 {
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: {ns}}}\n\
                 spec: {{clusterIP: None, ports: [{{name: http, port: 8080}}]}}\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: svc-{i}-1, namespace: {ns}, labels: {{kubernetes.io/service-name: svc-{i}}}}}\n\
                 addressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:\n"
            );
            for _ in 0..PODS_PER_HEADLESS {
                let ip = 0xc612_8000u32 + pods as u32; // 198.18.128.0 on
                let o = ip.to_be_bytes();
                let _ = writeln!(
                    y,
                    "- {{addresses: [{}.{}.{}.{}], hostname: pod-{pods}}}",
                    o[0], o[1], o[2], o[3]
                );
                pods += 1;
            }
        } else {
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: {ns}}}\n\
                 spec: {{clusterIP: 198.19.{}.{}, ports: [{{name: http, port: 80}}]}}\n",
                i / 256,
                i % 256
            );
        }
    }
    (y, services, pods)
}

/// The zone weir builds from `yaml`, as zone-file lines (PTR records left out).
/// Also returns how long weir took to build the zone from the parsed objects (what the agent
/// does after a change), the best of 3.
fn zone_lines(yaml: &str) -> Result<(Vec<String>, Duration)> {
    let (objs, problems) =
        weir_proxy::model::parse_stream(yaml).map_err(|p| anyhow::anyhow!("{p}"))?;
    if !problems.is_empty() {
        bail!("b5: the generated objects have problems: {problems:?}");
    }
    let mut best = Duration::MAX;
    let mut zone = None;
    for _ in 0..3 {
        let t = Instant::now();
        let z = weir_dns::Zone::build(
            weir_dns::Config::default(),
            &weir_proxy::dns::services(&objs),
        );
        best = best.min(t.elapsed());
        zone = Some(z);
    }
    let zone = zone.context("built")?;
    Ok((
        zone.records()
            .filter(|r| r.record_type() != weir_dns::RecordType::PTR)
            .map(|r| r.to_string())
            .collect(),
        best,
    ))
}

/// dnsperf's input: half hits, half search-path misses, in a fixed pseudo-random order.
fn queries(services: usize, n: usize) -> String {
    let mut out = String::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for k in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = (x % services as u64) as usize;
        let ns = format!("ns-{}", i % NAMESPACES);
        let name = format!("svc-{i}.{ns}.svc.cluster.local");
        let _ = match k % 10 {
            0..=3 => writeln!(out, "{name} A"),
            4 => writeln!(out, "_http._tcp.{name} SRV"),
            _ => writeln!(out, "{name}.{ns}.svc.cluster.local A"),
        };
    }
    out
}

/// A server process pinned to CPU 1, in the node namespace.
fn spawn_pinned(node: &Node, name: &str, args: &[&str]) -> Result<Proc> {
    let mut cmd = node.ns.command("taskset")?;
    cmd.args(["-c", "1"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc::spawn(name, cmd)
}

/// Waits until `addr` answers a query for a name of the zone.
fn wait_answering(client: &Netns, addr: &str, probe: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = client
            .command("dig")?
            .args([
                &format!("@{addr}"),
                "+short",
                "+time=1",
                "+tries=1",
                probe,
                "A",
            ])
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("b5: {addr} does not answer {probe}");
        }
        thread::sleep(Duration::from_millis(200));
    }
}

struct Measured {
    qps: f64,
    lost_pct: f64,
    p50_us: f64,
    p99_us: f64,
    rss_per_object_b: f64,
    rss_empty_kib: u64,
    rss_loaded_kib: u64,
}

/// dnsperf from the client pod, pinned to CPU 0; its report.
fn dnsperf(client: &Netns, addr: &str, qfile: &Path, secs: u32, extra: &[&str]) -> Result<String> {
    let out = client
        .command("taskset")?
        .args(["-c", "0", "dnsperf", "-s", addr, "-d"])
        .arg(qfile)
        .args(["-l", &secs.to_string(), "-t", "2"])
        .args(extra)
        .output()
        .context("run dnsperf")?;
    if !out.status.success() {
        bail!(
            "dnsperf against {addr}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(report: &str, prefix: &str) -> Option<f64> {
    report
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn measure(client: &Netns, s: &Server, qfile: &Path, secs: u32) -> Result<(f64, f64, f64, f64)> {
    eprintln!("b5: {} throughput...", s.label);
    let r = dnsperf(client, s.addr, qfile, secs, &["-q", "64"])?;
    let qps = field(&r, "Queries per second:").context("dnsperf: no qps")?;
    let sent = field(&r, "Queries sent:").unwrap_or(0.0);
    let lost = field(&r, "Queries lost:").unwrap_or(0.0);
    eprintln!("b5: {} latency at half that rate...", s.label);
    let half = format!("{}", (qps / 2.0) as u64);
    let v = dnsperf(
        client,
        s.addr,
        qfile,
        secs.min(5),
        &["-q", "64", "-Q", &half, "-v"],
    )?;
    // Verbose lines: "> NOERROR name type 0.000123" (the latency in seconds last).
    let mut lat: Vec<f64> = v
        .lines()
        .filter(|l| l.starts_with('>'))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    if lat.is_empty() {
        bail!("dnsperf -v printed no latencies");
    }
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] * 1e6;
    Ok((
        qps,
        if sent > 0.0 { lost / sent * 100.0 } else { 0.0 },
        pct(0.50),
        pct(0.99),
    ))
}

pub fn run(weir: &Path, quick: bool) -> Result<String> {
    let (services, secs) = if quick { (1_000, 3) } else { (10_000, 10) };
    let t = format!("b5{}", tag());
    let dir = RunDir::create(&format!("/run/weir-{t}"))?;
    let mut node = Node::create(&t)?;
    for a in [WEIR.addr, KNOT.addr, UNBOUND.addr] {
        node.ns
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
    }
    node.add_pod("cli", 10)?;
    let client = &node.pod("cli").context("client pod")?.ns;

    eprintln!("b5: generating {services} services...");
    let (yaml, n_svc, n_pods) = objects(services);
    let objects_n = (n_svc + n_pods) as f64;
    let (lines, build_took) = zone_lines(&yaml)?;
    let d = &dir.0;
    fs::write(d.join("zone.yaml"), &yaml)?;
    fs::write(d.join("empty.yaml"), "")?;
    let qfile = d.join("queries.txt");
    fs::write(&qfile, queries(services, 100_000))?;
    // Knot: the records as a zone file (SOA first, and an NS it requires).
    let mut zf = String::from("$ORIGIN cluster.local.\n");
    let soa: Vec<&String> = lines.iter().filter(|l| l.contains(" SOA ")).collect();
    for l in soa.iter().chain(
        lines
            .iter()
            .filter(|l| !l.contains(" SOA "))
            .collect::<Vec<_>>()
            .iter(),
    ) {
        zf += l;
        zf.push('\n');
    }
    zf +=
        "cluster.local. 5 IN NS ns.dns.cluster.local.\nns.dns.cluster.local. 5 IN A 198.18.0.54\n";
    fs::write(d.join("cluster.local.zone"), &zf)?;
    let knot_conf = |zone: bool| {
        format!(
            "server:\n  listen: {}@53\n  rundir: {dir}\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\n\
             database:\n  storage: {dir}/knotdb\n\
             log:\n  - target: stderr\n    any: error\n{}",
            KNOT.addr,
            if zone {
                format!(
                    "zone:\n  - domain: cluster.local\n    file: {}/cluster.local.zone\n    zonefile-load: whole\n    journal-content: none\n",
                    d.display()
                )
            } else {
                String::new()
            },
            dir = d.display()
        )
    };
    fs::write(d.join("knot.conf"), knot_conf(true))?;
    fs::write(d.join("knot-empty.conf"), knot_conf(false))?;
    // unbound: the records as local data of a static zone.
    let unbound_conf = |data: bool| {
        let mut c = format!(
            "server:\n  interface: {}\n  port: 53\n  num-threads: 1\n  do-daemonize: no\n  chroot: \"\"\n  username: \"\"\n\
             directory: \"{dir}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  access-control: 0.0.0.0/0 allow\n\
             do-ip6: no\n  module-config: \"iterator\"\n  local-zone: \"cluster.local.\" static\n",
            UNBOUND.addr,
            dir = d.display()
        );
        if data {
            for l in &lines {
                let _ = writeln!(c, "  local-data: \"{}\"", l.replace('"', "\\\""));
            }
        }
        c
    };
    fs::write(d.join("unbound.conf"), unbound_conf(true))?;
    fs::write(d.join("unbound-empty.conf"), unbound_conf(false))?;

    let weir_s = weir.to_string_lossy().to_string();
    let src = |f: &str| format!("file:{}", d.join(f).display());
    let weir_args = |f: &str| {
        vec![
            weir_s.clone(),
            "dns".into(),
            "--source".into(),
            src(f),
            "--listen".into(),
            format!("{}:53", WEIR.addr),
            "--upstream".into(),
            "198.18.0.59".into(),
        ]
    };
    let knot_args = |f: &str| {
        vec![
            "knotd".to_string(),
            "-c".into(),
            d.join(f).display().to_string(),
        ]
    };
    let unbound_args = |f: &str| {
        vec![
            "unbound".to_string(),
            "-d".into(),
            "-c".into(),
            d.join(f).display().to_string(),
        ]
    };
    type Args = Vec<String>;
    let runs: [(&Server, Args, Args); 3] = [
        (&WEIR, weir_args("zone.yaml"), weir_args("empty.yaml")),
        (&KNOT, knot_args("knot.conf"), knot_args("knot-empty.conf")),
        (
            &UNBOUND,
            unbound_args("unbound.conf"),
            unbound_args("unbound-empty.conf"),
        ),
    ];
    let probe = "svc-0.ns-0.svc.cluster.local";
    let mut rows = Vec::new();
    for (s, full, empty) in runs {
        // Resident set with an empty zone, then with the zone.
        let base = {
            let argv: Vec<&str> = empty.iter().map(String::as_str).collect();
            let p = spawn_pinned(&node, s.label, &argv)?;
            thread::sleep(Duration::from_millis(1500));
            let kib = rss_of_server(&p)?;
            drop(p);
            thread::sleep(Duration::from_millis(300));
            kib
        };
        let argv: Vec<&str> = full.iter().map(String::as_str).collect();
        let p = spawn_pinned(&node, s.label, &argv)?;
        wait_answering(client, s.addr, probe)?;
        let loaded = rss_of_server(&p)?;
        let (qps, lost_pct, p50_us, p99_us) = measure(client, s, &qfile, secs)?;
        drop(p);
        thread::sleep(Duration::from_millis(300));
        rows.push((
            s.label,
            Measured {
                qps,
                lost_pct,
                p50_us,
                p99_us,
                rss_per_object_b: (loaded.saturating_sub(base)) as f64 * 1024.0 / objects_n,
                rss_empty_kib: base,
                rss_loaded_kib: loaded,
            },
        ));
    }

    let mut o = String::new();
    let _ = writeln!(o, "## B5: cluster DNS throughput, latency and memory\n");
    let _ = writeln!(o, "Machine: {}\n", results::machine());
    let _ = writeln!(
        o,
        "{n_svc} services in {NAMESPACES} namespaces (80 % with a cluster IP, 20 % headless with {PODS_PER_HEADLESS} named pods \
         each: {n_pods} pods), {} records; Knot's zone file and unbound's local data are written from weir's zone record for \
         record (PTR aside). Each server alone on CPU 1 with one worker; dnsperf on CPU 0 in a pod namespace, over its veth, \
         {secs} s per run. Queries: 40 % A of a service, 10 % SRV, 50 % search-path misses (NXDOMAIN). Throughput with at most \
         64 queries outstanding; latency percentiles at half the measured rate; memory: resident set with the zone less \
         with an empty one, per object ({n_svc} services + {n_pods} pods). Building the zone from the objects (what \
         the agent does after a change) takes {:.0} ms.\n",
        lines.len(),
        build_took.as_secs_f64() * 1000.0
    );
    let _ = writeln!(
        o,
        "| server | queries/s | × Knot | lost | p50 µs | p99 µs | RSS empty → with zone (MiB) | bytes per object |\n|---|---|---|---|---|---|---|---|"
    );
    let knot_qps = rows
        .iter()
        .find(|(l, _)| *l == KNOT.label)
        .map(|(_, m)| m.qps)
        .unwrap_or(f64::NAN);
    for (label, m) in &rows {
        let _ = writeln!(
            o,
            "| {label} | {:.0} | {:.2} | {:.3} % | {:.0} | {:.0} | {:.1} → {:.1} | {:.0} |",
            m.qps,
            m.qps / knot_qps,
            m.lost_pct,
            m.p50_us,
            m.p99_us,
            m.rss_empty_kib as f64 / 1024.0,
            m.rss_loaded_kib as f64 / 1024.0,
            m.rss_per_object_b
        );
    }
    if let Some((_, w)) = rows.iter().find(|(l, _)| *l == WEIR.label) {
        let _ = writeln!(
            o,
            "\nTargets: ≥ 50 000 queries/s per core: {} ({:.0}); p99 under 1 ms: {} ({:.0} µs); ≥ half of Knot's rate: {} \
             ({:.2}); less memory per object than CoreDNS's 0.86 KB: {} ({:.0} B).",
            if w.qps >= 50_000.0 { "met" } else { "NOT met" },
            w.qps,
            if w.p99_us < 1000.0 { "met" } else { "NOT met" },
            w.p99_us,
            if w.qps >= knot_qps / 2.0 { "met" } else { "NOT met" },
            w.qps / knot_qps,
            if w.rss_per_object_b < 860.0 { "met" } else { "NOT met" },
            w.rss_per_object_b
        );
    }
    Ok(o)
}

/// The resident set of the server `taskset` started (its only child after exec: the same pid).
fn rss_of_server(p: &Proc) -> Result<u64> {
    weir_testkit::probe::proc_status_kib(p.child.id(), "VmRSS").context("VmRSS")
}
