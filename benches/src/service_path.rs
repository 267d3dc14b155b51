//! `service-path` (B1 in RESULTS.md), the headline: new-connection rate and request/response latency through a ClusterIP with
//! N services in the node, side by side with the same services in kube-proxy's iptables and
//! nftables shapes, and plain routing to the pod as the floor. The probed service is the last
//! one. Client and server are pinned to the same CPU (cross-CPU wake-ups are dear on small VMs
//! and would drown the data path's cost).
use std::{
    fmt::Write,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use weir_common::PROTO_TCP;
use weir_proxy::{
    datapath::{AyaMaps, Datapath, PinDir, PodPrograms, Programmer},
    model::{Desired, Frontend, ServiceSpec},
    tools::loadtest::Report,
};
use weir_testkit::{tag, BpfMount, Cgroup, Node, NodeExt, Proc};

use crate::kube_rules::{self, Svc};

const CPU: &str = "0";
const RESTORE_LIMIT: Duration = Duration::from_secs(300);
/// Interleaved rounds for the floor and weir (medians are reported).
const ROUNDS: usize = 3;

/// The round whose connection rate is the median, with the median request latencies of all
/// rounds.
fn median(mut ps: Vec<&Point>) -> Point {
    let rate = |p: &&Point| p.crr.as_ref().map(|r| r.ok as f64).unwrap_or(0.0);
    ps.sort_by(|a, b| rate(a).total_cmp(&rate(b)));
    let mid = ps[ps.len() / 2];
    let mut rr = mid.rr.clone();
    if let Some(rr) = rr.as_mut() {
        let mut p50: Vec<f64> = ps
            .iter()
            .filter_map(|p| p.rr.as_ref().map(|r| r.latency.p50_us))
            .collect();
        let mut p99: Vec<f64> = ps
            .iter()
            .filter_map(|p| p.rr.as_ref().map(|r| r.latency.p99_us))
            .collect();
        p50.sort_by(f64::total_cmp);
        p99.sort_by(f64::total_cmp);
        rr.latency.p50_us = p50[p50.len() / 2];
        rr.latency.p99_us = p99[p99.len() / 2];
    }
    // Each round's note once (they differ only where a round saw errors).
    let mut notes: Vec<&str> = Vec::new();
    for n in ps.iter().map(|p| p.note.as_str()) {
        if !n.is_empty() && !notes.contains(&n) {
            notes.push(n);
        }
    }
    Point {
        n: mid.n,
        mode: mid.mode,
        crr: mid.crr.clone(),
        rr,
        note: format!(
            "median of {} interleaved rounds. {}",
            ps.len(),
            notes.join(" ")
        ),
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Floor,
    WeirSocket,
    WeirSocketPodPrograms,
    WeirTc,
    Iptables,
    Nftables,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Floor => "plain routing to the pod (floor)",
            Mode::WeirSocket => "weir, socket LB",
            Mode::WeirSocketPodPrograms => "weir, socket LB, pod programs kept",
            Mode::WeirTc => "weir, TC path",
            Mode::Iptables => "kube-proxy iptables shape",
            Mode::Nftables => "kube-proxy nftables shape",
        }
    }
}

struct Point {
    n: usize,
    mode: Mode,
    crr: Option<Report>,
    rr: Option<Report>,
    note: String,
}

fn services(n: usize) -> Vec<Svc> {
    (0..n)
        .map(|i| {
            let last = i + 1 == n;
            // Service i: 198.19.0.1 + i (port 80, then 81 past 65 535 addresses); the probed
            // (last) service's endpoint is the real backend pod.
            let idx = (i % 65_534) as u32;
            let vip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 1)) + idx);
            Svc {
                name: format!("bench/svc-{i}:http"),
                vip,
                port: 80 + (i / 65_534) as u16,
                endpoints: vec![if last {
                    Ipv4Addr::new(198, 18, 1, 11)
                } else {
                    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 64, 0)) + (i % 60_000) as u32)
                }],
                target_port: 8080,
            }
        })
        .collect()
}

fn desired(svcs: &[Svc]) -> Desired {
    svcs.iter()
        .map(|s| {
            (
                Frontend {
                    ip: s.vip.into(),
                    port: s.port,
                    proto: PROTO_TCP,
                    scope: weir_common::SCOPE_ALL,
                },
                ServiceSpec {
                    name: s.name.clone(),
                    backends: s
                        .endpoints
                        .iter()
                        .map(|e| SocketAddr::from((*e, s.target_port)))
                        .collect(),
                    ..Default::default()
                },
            )
        })
        .collect()
}

pub(crate) fn run_limited(mut cmd: Command, input: &Path, what: &str) -> Result<Duration> {
    let started = Instant::now();
    let mut child = cmd
        .stdin(std::fs::File::open(input)?)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {what}"))?;
    loop {
        if let Some(st) = child.try_wait()? {
            if !st.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                bail!(
                    "{what} failed ({st}): {}",
                    err.lines().take(5).collect::<Vec<_>>().join(" / ")
                );
            }
            return Ok(started.elapsed());
        }
        if started.elapsed() > RESTORE_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish in {} s", RESTORE_LIMIT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Bench<'a> {
    weir: &'a Path,
    node: &'a Node,
    cgroup: &'a Cgroup,
    secs: f64,
}

impl Bench<'_> {
    fn load(&self, target: &str, socket_lb: bool, new_conn: bool) -> Result<Report> {
        let pod = self.node.pod("cli").context("client pod")?;
        let mut cmd = pod.ns.command(self.weir)?;
        if socket_lb {
            self.cgroup.adopt(&mut cmd)?;
        }
        cmd.args([
            "loadtest",
            target,
            "--closed",
            "--connections",
            "1",
            "--cpu",
            CPU,
            "--json",
            "--quiet",
            "--timeout",
            "2s",
        ])
        .args(["--duration", &format!("{}ms", (self.secs * 1000.0) as u64)]);
        if new_conn {
            cmd.arg("--new-conn");
        }
        let out = cmd.output().context("run weir loadtest")?;
        if !out.status.success() {
            bail!(
                "loadtest {target}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Report::from_json(&out.stdout)
    }

    fn point(&self, n: usize, mode: Mode, target: &str, socket_lb: bool, note: String) -> Point {
        eprintln!("b1: N={n:<6} {:<34} ...", mode.label());
        let mut crr = self.load(target, socket_lb, true);
        // A request that timed out (2 s) in a 3 s figure ruins it; it happens to the floor
        // too, now and then, so it is the machine's, not the path's: measured again, once,
        // and the note says so.
        let mut note = note;
        if let Ok(r) = &crr {
            if r.error_count() > 0 {
                note += &format!(" connections measured again after {:?}.", r.errors);
                crr = self.load(target, socket_lb, true);
            }
        }
        let rr = self.load(target, socket_lb, false);
        for (what, r) in [("connections", &crr), ("requests", &rr)] {
            match r {
                Err(e) => note += &format!(" {what}: {e:#}."),
                Ok(r) if r.error_count() > 0 => {
                    note += &format!(" {what}: {} errors {:?}.", r.error_count(), r.errors)
                }
                _ => {}
            }
        }
        Point {
            n,
            mode,
            crr: crr.ok(),
            rr: rr.ok(),
            note: note.trim().to_string(),
        }
    }
}

fn run_n(weir: &Path, n: usize, secs: f64) -> Result<Vec<Point>> {
    let t = format!("b{}", tag());
    let dir = Path::new("/run").join(format!("weir-{t}"));
    let mut node = Node::create(&t)?;
    node.add_pod("cli", 10)?;
    node.add_pod("be-1", 11)?;
    let bpffs = BpfMount::create(&dir.join("bpffs"))?;
    let cgroup = Cgroup::create(&format!("weir-{t}"))?;
    let be = node.pod("be-1").context("backend pod")?;
    let mut echo_cmd = be.ns.command(weir)?;
    echo_cmd
        .args([
            "echo-server",
            "--name",
            "be-1",
            "--port",
            "8080",
            "--cpu",
            CPU,
        ])
        .stdout(Stdio::null());
    let _echo = Proc::spawn("echo be-1", echo_cmd)?;
    std::thread::sleep(Duration::from_millis(200));

    let svcs = services(n);
    let last = svcs.last().context("no services")?;
    let target = format!("{}:{}", last.vip, last.port);
    let b = Bench {
        weir,
        node: &node,
        cgroup: &cgroup,
        secs,
    };
    let mut points = Vec::new();
    // weir: the agent's loader and programmer, in the node namespace. The floor and weir are
    // measured in interleaved rounds (programs detached for the floor, re-attached after, the
    // pinned maps adopted) and reported as medians: run-to-run noise on these VMs is as large
    // as the 5 % latency target.
    let pins = PinDir(bpffs.path.join("weir"));
    let ifs: Vec<String> = node.pods.iter().map(|p| p.host_if.clone()).collect();
    // The pod veths' programs as the agent sets them: none when the socket hooks sit on the
    // cgroup v2 root (every pod is hooked), else tc_from_pod on ingress and tc_to_pod on
    // egress (clsact filters); the veths recorded as pods', as the agent records them.
    let attach = |program: Option<Desired>, pod_programs: PodPrograms| -> Result<Duration> {
        let (p2, cg, ifs) = (pins.clone(), cgroup.path.clone(), ifs.clone());
        node.ns.run(move || -> Result<Duration> {
            let mut dp = Datapath::load(p2.clone())?;
            dp.set_pod_programs(pod_programs);
            for i in &ifs {
                dp.attach_pod_tc(i)?;
                // As the agent records them: translated packets go straight into the pod.
                let index = nix::net::if_::if_nametoindex(i.as_str())?;
                dp.add_pod_dev(i, index)?;
            }
            dp.attach_cgroup(&cg)?;
            let Some(want) = program else {
                return Ok(Duration::ZERO);
            };
            let mut maps = AyaMaps::open(&p2.maps())?;
            let mut prog = Programmer::adopt(&maps)?;
            let started = Instant::now();
            let st = prog.apply(&want, &mut maps);
            if !st.errors.is_empty() {
                bail!(
                    "programming {} services: {:?}",
                    want.len(),
                    &st.errors[..st.errors.len().min(3)]
                );
            }
            Ok(started.elapsed())
        })?
    };
    // Everything off: the cgroup links (pinned) and the pod filters (the devices' own).
    let detach = || -> Result<()> {
        pins.detach_all()?;
        let (p2, ifs) = (pins.clone(), ifs.clone());
        node.ns.run(move || -> Result<()> {
            for i in &ifs {
                weir_proxy::datapath::detach_pod_tc(&p2, i)?;
            }
            Ok(())
        })?
    };
    let took = attach(Some(desired(&svcs)), PodPrograms::PerPacket)?;
    detach()?;
    let note = format!(
        "{n} services programmed in {:.0} ms.",
        took.as_secs_f64() * 1000.0
    );
    // kube-proxy, nftables mode: in the node namespace for its own rounds only, loaded again
    // for each. Unhooking it (its base chains deleted) is not enough: its NAT chains keep
    // conntrack on in the namespace, and on the AMD machine the floor and the socket LB rows
    // (connections made straight to the pod) then stalled on SYN timeouts, 2-22/s.
    let nft_in = |what: &str, rules: &str| -> Result<Duration> {
        let file = dir.join(format!("{what}.nft"));
        std::fs::write(&file, rules)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.ns.name, "nft", "-f", "-"]);
        run_limited(cmd, &file, "nft -f")
    };
    let nft_rules = kube_rules::nftables(&svcs);
    let nft_note = match nft_in("nftables", &nft_rules) {
        Ok(d) => nft_in("delete", kube_rules::NFTABLES_DELETE)
            .map(|_| format!("nft -f of {n} services took {:.1} s.", d.as_secs_f64())),
        Err(e) => Err(e),
    };
    let mut rounds: Vec<Vec<Point>> = Vec::new();
    for _ in 0..ROUNDS {
        let mut r = vec![b.point(n, Mode::Floor, "198.18.1.11:8080", false, String::new())];
        // Socket LB as on a node whose hooks see every pod; the TC path as on one without hooks.
        attach(None, PodPrograms::None)?;
        r.push(b.point(n, Mode::WeirSocket, &target, true, note.clone()));
        attach(None, PodPrograms::PerPacket)?;
        r.push(b.point(n, Mode::WeirTc, &target, false, note.clone()));
        detach()?;
        if let Ok(note) = &nft_note {
            nft_in("nftables", &nft_rules)?;
            r.push(b.point(n, Mode::Nftables, &target, false, note.clone()));
            nft_in("delete", kube_rules::NFTABLES_DELETE)?;
        }
        rounds.push(r);
    }
    for i in 0..rounds[0].len() {
        points.push(median(rounds.iter().map(|r| &r[i]).collect()));
    }
    if let Err(e) = &nft_note {
        points.push(Point {
            n,
            mode: Mode::Nftables,
            crr: None,
            rr: None,
            note: format!("not measured: {e:#}"),
        });
    }
    // The socket hooks with the pod programs still on the veths, as on a node whose hooks sit
    // on a cgroup below the root: what the programs cost packets that need none of them.
    attach(None, PodPrograms::PerPacket)?;
    points.push(b.point(n, Mode::WeirSocketPodPrograms, &target, true, String::new()));
    detach()?;

    // kube-proxy, iptables mode.
    let ipt = dir.join("iptables.rules");
    std::fs::write(&ipt, kube_rules::iptables(&svcs))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &node.ns.name, "iptables-restore"]);
    match run_limited(cmd, &ipt, "iptables-restore") {
        Ok(d) => {
            let note = format!(
                "iptables-restore of {} rules took {:.1} s.",
                n * 5 + 23,
                d.as_secs_f64()
            );
            points.push(b.point(n, Mode::Iptables, &target, false, note));
        }
        Err(e) => points.push(Point {
            n,
            mode: Mode::Iptables,
            crr: None,
            rr: None,
            note: format!("not measured: {e:#}"),
        }),
    }
    let mut flush = Command::new("ip");
    flush.args(["netns", "exec", &node.ns.name, "iptables-restore"]);
    let empty = dir.join("empty.rules");
    std::fs::write(&empty, "*nat\nCOMMIT\n*filter\nCOMMIT\n")?;
    run_limited(flush, &empty, "iptables flush")?;

    drop(_echo);
    drop(cgroup);
    drop(bpffs);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(points)
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "—".into())
}

pub fn run(weir: &Path, quick: bool) -> Result<String> {
    let (ns, secs): (&[usize], f64) = if quick {
        (&[1, 1000], 1.0)
    } else {
        (&[1, 1000, 10_000, 100_000], 3.0)
    };
    let mut all = Vec::new();
    for &n in ns {
        all.extend(run_n(weir, n, secs)?);
    }
    // Rows in a fixed order per N (Mode's), whatever order they were measured in.
    all.sort_by_key(|p| (p.n, p.mode as u8));
    let rate = |p: &Point| p.crr.as_ref().map(|r| r.ok as f64 / r.duration_s);
    let find = |n: usize, m: Mode| all.iter().find(|p| p.n == n && p.mode == m);
    let mut o = String::new();
    let _ = writeln!(
        o,
        "## B1: ClusterIP connection rate and latency against the number of services\n"
    );
    let _ = writeln!(o, "Machine: {}\n", crate::results::machine());
    let _ = writeln!(
        o,
        "One client pod, one backend pod, a node namespace between them (veth, routed). N services with one endpoint \
         each; the probed service is the last one written. `weir loadtest --closed --connections 1`, client and server \
         pinned to CPU {CPU}, {secs:.0} s per figure: *connections* opens a new TCP connection per request (1 request, \
         1 reply, close), *requests* reuses one connection. Latency is per request (connect included for connections). \
         Baselines are the same services written in kube-proxy's iptables shape (iptables {}, the nf_tables backend) \
         and nftables shape, in the same node namespace, in the same run. The floor, weir and nftables rows are medians \
         of {ROUNDS} interleaved rounds: weir's programs are detached and kube-proxy's nftables table deleted while the \
         others are measured (loaded again for each of its rounds: with only its base chains deleted, its NAT chains \
         kept conntrack on in the node namespace, and connections made straight to the pod stalled). The iptables rows are measured \
         once, after the rounds, and so is *socket LB, pod programs kept*. Pod veths carry what the agent gives them: \
         nothing with the socket hooks on the cgroup v2 root (*socket LB*: every pod's sockets are balanced at \
         `connect`), `tc_from_pod` and `tc_to_pod` otherwise (*pod programs kept*: hooks on a cgroup below the root; \
         *TC path*: no hooks). No uplink is on this path, so `tc_to_netdev` is not either.\n",
        iptables_version()
    );
    let _ = writeln!(o, "| N | data path | connections/s | × floor | conn p50 / p99 µs | request p50 / p99 µs | notes |\n|---|---|---|---|---|---|---|");
    for p in &all {
        let floor = find(p.n, Mode::Floor).and_then(rate);
        let r = rate(p);
        let ratio = match (r, floor) {
            (Some(r), Some(f)) if f > 0.0 => format!("{:.2}", r / f),
            _ => "—".into(),
        };
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} / {} | {} / {} | {} |",
            p.n,
            p.mode.label(),
            fmt_opt(r, 0),
            ratio,
            fmt_opt(p.crr.as_ref().map(|r| r.latency.p50_us), 1),
            fmt_opt(p.crr.as_ref().map(|r| r.latency.p99_us), 1),
            fmt_opt(p.rr.as_ref().map(|r| r.latency.p50_us), 2),
            fmt_opt(p.rr.as_ref().map(|r| r.latency.p99_us), 2),
            p.note
        );
    }
    // Targets.
    let _ = writeln!(o, "\nTargets:\n");
    let w1 = find(1, Mode::WeirSocket).and_then(rate);
    for m in [Mode::WeirSocket, Mode::WeirTc] {
        let w1 = find(1, m).and_then(rate);
        let wmax = ns
            .iter()
            .rev()
            .find_map(|n| find(*n, m).and_then(rate).map(|r| (*n, r)));
        if let (Some(a), Some((n, b))) = (w1, wmax) {
            let _ = writeln!(
                o,
                "- {}: connection rate at N={n} is {:.1} % of N=1 (target: within 10 %): {}",
                m.label(),
                b / a * 100.0,
                if b >= a * 0.9 { "met" } else { "NOT met" }
            );
        }
    }
    let _ = w1;
    for &n in ns {
        for m in [Mode::WeirSocket, Mode::WeirTc] {
            let w = find(n, m).and_then(rate);
            let ipt = find(n, Mode::Iptables).and_then(rate);
            let nft = find(n, Mode::Nftables).and_then(rate);
            let cmp = |x: Option<f64>| x.and_then(|x| w.map(|w| w / x));
            let verdict = |r: Option<f64>, want: f64| match r {
                Some(r) if r >= want => "met",
                Some(_) => "NOT met",
                None => "not measured",
            };
            let ipt_target = if n == 10_000 {
                format!(" (target ≥ 2×: {})", verdict(cmp(ipt), 2.0))
            } else {
                String::new()
            };
            let _ = writeln!(
                o,
                "- N={n}, {}: {} × iptables shape{ipt_target}, {} × nftables shape (target ≥ 1×: {})",
                m.label(),
                fmt_opt(cmp(ipt), 2),
                fmt_opt(cmp(nft), 2),
                verdict(cmp(nft), 1.0)
            );
        }
        let floor = find(n, Mode::Floor).and_then(|p| p.rr.as_ref().map(|r| r.latency.p50_us));
        for m in [Mode::WeirSocket, Mode::WeirTc] {
            let w = find(n, m).and_then(|p| p.rr.as_ref().map(|r| r.latency.p50_us));
            if let (Some(w), Some(f)) = (w, floor) {
                let _ = writeln!(
                    o,
                    "- N={n}, {}: request p50 {:+.1} % against plain routing (target: within 5 %): {}",
                    m.label(),
                    (w / f - 1.0) * 100.0,
                    if w <= f * 1.05 { "met" } else { "NOT met" }
                );
            }
        }
    }
    Ok(o)
}

pub(crate) fn iptables_version() -> String {
    Command::new("iptables")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .trim_start_matches("iptables ")
                .to_string()
        })
        .unwrap_or_default()
}
