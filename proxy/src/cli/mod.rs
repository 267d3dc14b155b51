//! The `weir` command line: one file per subcommand, each its flags and how they become a run.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

mod agent;
mod dns;
mod echo;
mod loadtest;
mod sandbox;
mod status;

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "weir: an eBPF Kubernetes service data plane (kube-proxy replacement)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Where the agent reports each Service, and where `weir status` reads it.
const DEFAULT_STATE_FILE: &str = "/run/weir/services.json";

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: load the eBPF programs and program services from a source.
    #[command(after_help = "Examples:\n  \
        weir agent --source kube --node-name $NODE_NAME --netdev eth0\n  \
        weir agent --source kube:/etc/kubernetes/kubeconfig --netdev eth0\n  \
        weir agent --source file:/etc/weir/services.yaml\n  \
        weir agent --source file:svc.yaml --bpffs /run/weir/bpf --cgroup /sys/fs/cgroup --netdev eth0\n  \
        weir agent --source file:svc.yaml --no-socket-lb --pod-interface-prefix lxc\n  \
        weir agent --source kube --node-name $NODE_NAME --dns-listen 169.254.20.10:53\n  \
        weir agent --source kube --node-name $NODE_NAME --netdev eth0 --host-routing kernel\n\n\
        The agent pins its maps and links under <bpffs>/weir; when it stops, the data path keeps\n\
        serving, and the next agent adopts it without dropping established flows.")]
    Agent(Box<agent::Args>),
    /// Build a simulated node in network namespaces, run load through its services, report,
    /// and remove everything it made (also on Ctrl-C).
    #[command(after_help = "Examples:\n  \
        weir sandbox\n  \
        weir sandbox --rate 1000 --duration 5s\n  \
        weir sandbox --cleanup        # remove what a killed sandbox left behind")]
    Sandbox(sandbox::Args),
    /// Open-loop constant-rate load against a service; latency corrected for coordinated
    /// omission, errors by kind, share of each backend.
    #[command(after_help = "Examples:\n  \
        weir loadtest 198.19.0.10:80 --rate 1000 --duration 10s\n  \
        weir loadtest 198.19.0.10:80 --rate 500 --duration 5s --new-conn\n  \
        weir loadtest [fd00:19::10]:53 --proto udp --rate 2000 --duration 5s --json\n  \
        weir loadtest 198.19.0.10:80 --closed --new-conn --connections 1 --duration 3s\n\n\
        The target must answer `<seq>` with `<name> <seq>` (see `weir echo-server`).")]
    Loadtest(loadtest::Args),
    /// Show what is programmed: services, backends, conntrack and counters.
    #[command(after_help = "Examples:\n  weir status\n  weir status --json --bpffs /run/weir/bpf")]
    Status(status::Args),
    /// Serve cluster DNS alone, its zone from a YAML file (the agent embeds the same server).
    #[command(after_help = dns::after_help())]
    Dns(dns::Args),
    /// A TCP+UDP echo server that answers `<seq>` with `<name> <seq>`: a backend for tests.
    #[command(
        after_help = "Examples:\n  weir echo-server --name be-1 --port 8080\n  weir echo-server --name node --address 198.18.0.60 --port 9090"
    )]
    EchoServer(echo::Args),
}

/// Parses the command line and runs the command; errors are printed with their causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Agent(a) => agent::run(*a),
        Cmd::Sandbox(a) => sandbox::run(a),
        Cmd::Loadtest(a) => loadtest::run(a),
        Cmd::Status(a) => status::run(a),
        Cmd::Dns(a) => dns::run(a),
        Cmd::EchoServer(a) => echo::run(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e:#}");
            ExitCode::FAILURE
        }
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 5s or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s or m)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: log files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

/// A path, or none ("off").
#[derive(Clone, Debug)]
pub struct OptPath(pub Option<PathBuf>);

pub fn parse_path(s: &str) -> Result<OptPath, String> {
    Ok(OptPath(
        (s != "off" && !s.is_empty()).then(|| PathBuf::from(s)),
    ))
}

/// A listen address, or none.
#[derive(Clone, Copy, Debug)]
pub struct Bind(pub Option<std::net::SocketAddr>);

pub fn parse_bind(s: &str) -> Result<Bind, String> {
    if s == "off" || s.is_empty() {
        return Ok(Bind(None));
    }
    s.parse()
        .map(|a| Bind(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (an address such as 0.0.0.0:10256, or off)"))
}
