//! `weir sandbox`: a whole node in network namespaces, load through its services, a report.
use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{bail, Context, Result};

use super::{
    loadtest::Report,
    sim::{guards, Options, Sim},
};

/// The Services the sandbox programs (and the tests start from).
pub const SERVICES: &str = include_str!("sandbox.yaml");

pub struct SandboxOptions {
    pub rate: u32,
    pub duration: Duration,
}

struct Run {
    title: &'static str,
    args: Vec<String>,
    socket_lb: bool,
    expect: Expect,
}

enum Expect {
    /// Every request answered, spread over all backends (each 20–47 %).
    Spread,
    /// Every request answered (kept-alive connections stay on the backend they got).
    AllAnswered,
    /// Every request answered by the same backend.
    OneBackend,
    /// Every request refused, none answered.
    Refused,
}

fn runs(rate: u32, dur: &str) -> Vec<Run> {
    let r = rate.to_string();
    let common = |target: &str, extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            target.to_string(),
            "--rate".into(),
            r.clone(),
            "--duration".into(),
            dur.into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    vec![
        Run {
            title: "TCP  IPv4  socket LB   new connection each",
            args: common("198.19.0.10:80", &["--new-conn"]),
            socket_lb: true,
            expect: Expect::Spread,
        },
        Run {
            title: "UDP  IPv4  socket LB   unconnected, new socket each",
            args: common(
                "198.19.0.10:53",
                &["--proto", "udp", "--unconnected", "--new-conn"],
            ),
            socket_lb: true,
            expect: Expect::Spread,
        },
        Run {
            title: "TCP  IPv6  socket LB   new connection each",
            args: common("[fd00:19::10]:80", &["--new-conn"]),
            socket_lb: true,
            expect: Expect::Spread,
        },
        Run {
            title: "TCP  IPv4  TC path     new connection each",
            args: common("198.19.0.10:80", &["--new-conn"]),
            socket_lb: false,
            expect: Expect::Spread,
        },
        Run {
            title: "UDP  IPv4  TC path     new socket each",
            args: common("198.19.0.10:53", &["--proto", "udp", "--new-conn"]),
            socket_lb: false,
            expect: Expect::Spread,
        },
        Run {
            title: "TCP  IPv6  TC path     new connection each",
            args: common("[fd00:19::10]:80", &["--new-conn"]),
            socket_lb: false,
            expect: Expect::Spread,
        },
        Run {
            title: "TCP  IPv4  TC path     Maglev service",
            args: common("198.19.0.11:80", &["--new-conn"]),
            socket_lb: false,
            expect: Expect::Spread,
        },
        Run {
            title: "TCP  IPv4  TC path     ClientIP affinity",
            args: common("198.19.0.12:80", &["--new-conn"]),
            socket_lb: false,
            expect: Expect::OneBackend,
        },
        Run {
            title: "TCP  IPv4  socket LB   8 kept-alive connections",
            args: common("198.19.0.10:80", &["--connections", "8"]),
            socket_lb: true,
            expect: Expect::AllAnswered,
        },
        Run {
            title: "TCP  IPv4  socket LB   service without endpoints",
            args: common("198.19.0.13:80", &["--new-conn", "--timeout", "500ms"]),
            socket_lb: true,
            expect: Expect::Refused,
        },
        Run {
            title: "TCP  IPv4  TC path     service without endpoints",
            args: common("198.19.0.13:80", &["--new-conn", "--timeout", "500ms"]),
            socket_lb: false,
            expect: Expect::Refused,
        },
    ]
}

fn check(expect: &Expect, r: &Report) -> Result<(), String> {
    match expect {
        Expect::Spread => {
            if r.ok != r.sent {
                return Err(format!(
                    "{} of {} requests failed: {:?}",
                    r.sent - r.ok,
                    r.sent,
                    r.errors
                ));
            }
            let shares = r.shares();
            if shares.len() != 3 || shares.values().any(|s| !(20.0..=47.0).contains(s)) {
                return Err(format!("uneven spread over backends: {shares:?}"));
            }
            Ok(())
        }
        Expect::AllAnswered => {
            if r.ok != r.sent {
                return Err(format!(
                    "{} of {} requests failed: {:?}",
                    r.sent - r.ok,
                    r.sent,
                    r.errors
                ));
            }
            Ok(())
        }
        Expect::OneBackend => {
            if r.ok != r.sent || r.backends.len() != 1 {
                return Err(format!(
                    "expected one backend for all, got {:?}, errors {:?}",
                    r.backends, r.errors
                ));
            }
            Ok(())
        }
        Expect::Refused => {
            let refused = r.errors.get("refused").copied().unwrap_or(0);
            if r.ok != 0 || refused != r.sent {
                return Err(format!(
                    "expected every request refused, got {} ok, errors {:?}",
                    r.ok, r.errors
                ));
            }
            Ok(())
        }
    }
}

pub fn run(opts: SandboxOptions) -> Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    // Stopped by a signal, the sandbox stops its load, reports and removes what it made.
    guards::caller_handles_signals();
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("install signal handler")?;
    }
    let weir_bin = std::env::current_exe().context("find the weir binary")?;
    eprintln!(
        "weir sandbox: building a node (network namespaces, bpffs, cgroup, agent; pods through weir-cni ADD)..."
    );
    let sim = Sim::start(Options {
        weir_bin,
        backends: 3,
        socket_lb: true,
        services_yaml: SERVICES.into(),
        prefix: "sbx".into(),
    })?;
    let st = sim.status()?;
    println!(
        "node {}: client pod 198.18.1.10, backends be-1..be-3 (198.18.1.11-13, fd00:18::b-d)",
        sim.node.ns.name
    );
    for pod in &sim.node.pods {
        println!(
            "  pod {:<4} {} {:<13} {:<12} host side {} (weir-cni ADD; tc_from_pod attached before ADD returned)",
            pod.name, pod.ns.name, pod.ip4, pod.ip6, pod.host_if
        );
    }
    println!(
        "programmed {} frontends from the bundled services file:",
        st.services.len()
    );
    for s in &st.services {
        println!(
            "  {:<26} {:<7} -> {}",
            s.frontend,
            s.algorithm,
            if s.backends.is_empty() {
                "no endpoints (rejected)".into()
            } else {
                s.backends.join(", ")
            }
        );
    }
    println!();
    let dur = format!("{}ms", opts.duration.as_millis());
    let mut failures = Vec::new();
    println!(
        "{:<50} {:>11} {:>8} {:>8}  backends",
        "load (open loop)", "ok/sent", "p50 µs", "p99 µs"
    );
    for run in runs(opts.rate, &dur) {
        if stop.load(Ordering::Relaxed) {
            bail!("interrupted; everything the sandbox made has been removed");
        }
        eprintln!(
            "  running: {}",
            run.title.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        let args: Vec<&str> = run.args.iter().map(String::as_str).collect();
        let r = sim.loadtest(&args, run.socket_lb, true)?;
        let shares = r
            .shares()
            .iter()
            .map(|(k, v)| format!("{k} {v:.0}%"))
            .collect::<Vec<_>>()
            .join("  ");
        let errs = if r.errors.is_empty() {
            String::new()
        } else {
            format!("  errors {:?}", r.errors)
        };
        println!(
            "{:<50} {:>11} {:>8.0} {:>8.0}  {shares}{errs}",
            run.title,
            format!("{}/{}", r.ok, r.sent),
            r.latency.p50_us,
            r.latency.p99_us
        );
        if let Err(e) = check(&run.expect, &r) {
            failures.push(format!("{}: {e}", run.title));
        }
    }
    let st = sim.status()?;
    println!();
    println!("data path counters:");
    for (k, v) in st.counters.iter().filter(|(_, v)| **v > 0) {
        println!("  {k:<24} {v}");
    }
    println!("conntrack entries: {}", st.conntrack_entries);
    drop(sim);
    println!(
        "removed everything the sandbox made (pods through weir-cni DEL, namespaces, cgroup, bpffs, processes)"
    );
    if !failures.is_empty() {
        bail!(
            "the sandbox saw unexpected results:\n  {}",
            failures.join("\n  ")
        );
    }
    println!("all runs behaved as expected");
    Ok(())
}
