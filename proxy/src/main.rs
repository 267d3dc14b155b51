//! `weir`: the node agent and its tools.
use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use weir_proxy::{agent, echo, loadtest, sandbox, status, topo};

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

const DEFAULT_STATE_FILE: &str = "/run/weir/services.json";

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
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
    Agent {
        /// Where Services, EndpointSlices and the Node come from: `file:PATH` (multi-document
        /// YAML, reloaded when it changes), `kube` (in-cluster, else KUBECONFIG or
        /// ~/.kube/config) or `kube:KUBECONFIG`.
        #[arg(long)]
        source: agent::Source,
        /// A bpffs mount (mounted if it is not one).
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        /// cgroup v2 directory the socket-level hooks attach to (default: the cgroup v2 root).
        #[arg(long, conflicts_with = "no_socket_lb")]
        cgroup: Option<PathBuf>,
        /// Do not attach the socket-level hooks: every service packet takes the TC path.
        #[arg(long)]
        no_socket_lb: bool,
        /// What pod veths carry: `tc` (tc_from_pod and tc_to_pod: pod flows may take the
        /// per-packet path), `none` (no program: right only when every pod's processes are in
        /// --cgroup, such as kubepods.slice; replies of external flows are translated on the
        /// --netdev egress), or `auto`: none when the hooks sit on a cgroup v2 root, else tc.
        #[arg(long, value_enum, default_value = "auto")]
        pod_programs: PodProgramsArg,
        /// How translated service packets to a pod of this node reach it: `bpf` (handed
        /// straight into the pod by the program, skipping a second pass through the node's
        /// stack and so its netfilter FORWARD chain, as Cilium's host routing) or `kernel`
        /// (forwarded by the node's stack, where node rules such as an iptables NetworkPolicy
        /// implementation see them).
        #[arg(long, value_enum, default_value = "bpf")]
        host_routing: HostRoutingArg,
        /// Where container runtimes pin pod network namespaces: connected UDP sockets that the
        /// socket hooks sent to a backend which has left are aborted there (ECONNABORTED, so
        /// the application connects again), and in the agent's own namespace.
        #[arg(long, default_value = "/var/run/netns")]
        pod_netns_dir: PathBuf,
        /// Pod host-side veths: interfaces whose name starts with this (repeatable).
        #[arg(long, default_value = "weir")]
        pod_interface_prefix: Vec<String>,
        /// Node uplinks that get `tc_from_netdev` (repeatable).
        #[arg(long)]
        netdev: Vec<String>,
        /// Touch this file once the first sync is programmed.
        #[arg(long)]
        ready_file: Option<PathBuf>,
        /// Program once and exit (the data path stays programmed).
        #[arg(long)]
        once: bool,
        /// Unix socket weir-cni asks on to attach a new pod's program ("off": none).
        #[arg(long, default_value = weir_cni::config::DEFAULT_AGENT_SOCKET, value_parser = parse_path)]
        cni_socket: OptPath,
        /// This node's name; its spec.podCIDRs are written to --pod-cidrs-file for weir-cni.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Where the node's podCIDRs go for weir-cni's IPAM.
        #[arg(long, default_value = weir_cni::config::DEFAULT_POD_CIDRS_FILE)]
        pod_cidrs_file: PathBuf,
        /// Address of /healthz and /livez, as kube-proxy's ("off": not served).
        #[arg(long, default_value = "0.0.0.0:10256", value_parser = parse_bind)]
        healthz_bind_address: Bind,
        /// Address of the Prometheus /metrics, as kube-proxy's ("off": not served).
        #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_bind)]
        metrics_bind_address: Bind,
        /// How long a change may wait to be programmed before /healthz fails (kube-proxy:
        /// twice its sync period).
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        health_timeout: Duration,
        /// Where each sync writes, per Service, whether it is programmed and why not ("off":
        /// nowhere); `weir status` reads it.
        #[arg(long, default_value = DEFAULT_STATE_FILE, value_parser = parse_path)]
        state_file: OptPath,
        #[command(flatten)]
        dns: AgentDnsArgs,
    },
    /// Build a simulated node in network namespaces, run load through its services, report,
    /// and remove everything it made (also on Ctrl-C).
    #[command(after_help = "Examples:\n  \
        weir sandbox\n  \
        weir sandbox --rate 1000 --duration 5s\n  \
        weir sandbox --cleanup        # remove what a killed sandbox left behind")]
    Sandbox {
        /// Requests per second of each load run.
        #[arg(long, default_value_t = 300)]
        rate: u32,
        /// Length of each load run.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        duration: Duration,
        /// Only delete namespaces left by sandbox runs that were killed, then exit.
        #[arg(long)]
        cleanup: bool,
    },
    /// Open-loop constant-rate load against a service; latency corrected for coordinated
    /// omission, errors by kind, share of each backend.
    #[command(after_help = "Examples:\n  \
        weir loadtest 198.19.0.10:80 --rate 1000 --duration 10s\n  \
        weir loadtest 198.19.0.10:80 --rate 500 --duration 5s --new-conn\n  \
        weir loadtest [fd00:19::10]:53 --proto udp --rate 2000 --duration 5s --json\n  \
        weir loadtest 198.19.0.10:80 --closed --new-conn --connections 1 --duration 3s\n\n\
        The target must answer `<seq>` with `<name> <seq>` (see `weir echo-server`).")]
    Loadtest {
        /// host:port of the service (a ClusterIP or a name that resolves to one).
        target: String,
        #[arg(long, default_value_t = 100)]
        rate: u32,
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long, value_enum, default_value = "tcp")]
        proto: loadtest::Proto,
        /// Workers: persistent connections, or requests in flight with --new-conn.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Open a new connection (TCP) or socket (UDP) for every request.
        #[arg(long)]
        new_conn: bool,
        /// UDP: use sendto on an unconnected socket.
        #[arg(long)]
        unconnected: bool,
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        timeout: Duration,
        /// Print the report as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// No progress lines on stderr.
        #[arg(long)]
        quiet: bool,
        /// Closed loop: send each request as soon as the previous one is answered, for the
        /// whole duration (maximum rate; --rate is ignored).
        #[arg(long)]
        closed: bool,
        /// Pin the load generator to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Show what is programmed: services, backends, conntrack and counters.
    #[command(after_help = "Examples:\n  weir status\n  weir status --json --bpffs /run/weir/bpf")]
    Status {
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        #[arg(long)]
        json: bool,
        /// Conntrack entries to list.
        #[arg(long, default_value_t = 20)]
        conntrack: usize,
        /// The agent's per-Service report (see `weir agent --state-file`).
        #[arg(long, default_value = DEFAULT_STATE_FILE)]
        state_file: PathBuf,
    },
    /// Serve cluster DNS alone, its zone from a YAML file (the agent embeds the same server).
    #[command(after_help = "Examples:\n  \
        weir dns --source file:services.yaml --listen 127.0.0.1:5353\n  \
        weir dns --source file:svc.yaml --listen 198.18.0.53:53 --domain corp.internal --ttl 30\n  \
        weir dns --source file:svc.yaml --listen [::1]:53 --pods insecure --upstream 198.18.0.1\n  \
        weir dns --source file:svc.yaml --listen 127.0.0.1:53 --stub-domain corp.example=10.0.0.53\n\n\
        Names of the cluster domain are answered from the Services and EndpointSlices of the\n\
        file (the Kubernetes DNS specification, schema 1.1.0); others are relayed to the\n\
        upstream resolvers (default: the nameservers of /etc/resolv.conf).")]
    Dns {
        /// `file:PATH`: multi-document YAML of Services and EndpointSlices, reloaded when it
        /// changes.
        #[arg(long)]
        source: agent::Source,
        #[command(flatten)]
        dns: DnsArgs,
    },
    /// A TCP+UDP echo server that answers `<seq>` with `<name> <seq>`: a backend for tests.
    #[command(
        after_help = "Examples:\n  weir echo-server --name be-1 --port 8080\n  weir echo-server --name node --address 198.18.0.60 --port 9090"
    )]
    EchoServer {
        #[arg(long)]
        name: String,
        /// The address to listen on (`::`: every address, both families).
        #[arg(long, default_value = "::")]
        address: std::net::IpAddr,
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Pin the server to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
    },
}

/// The agent's embedded DNS server: off unless `--dns-listen` is given.
#[derive(clap::Args, Debug)]
struct AgentDnsArgs {
    /// Serve cluster DNS on this address, UDP and TCP (repeatable; none: no DNS server).
    #[arg(long)]
    dns_listen: Vec<std::net::SocketAddr>,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    dns_domain: String,
    /// TTL of the DNS answers, in seconds.
    #[arg(long, default_value_t = 5)]
    dns_ttl: u32,
    /// Pod records: disabled, insecure, or verified (only for addresses pods have; watches Pods).
    #[arg(long, default_value = "disabled", value_parser = weir_proxy::dns::parse_pod_mode)]
    dns_pods: weir_dns::PodMode,
    /// Resolver for names outside the cluster domain (repeatable; default: /etc/resolv.conf).
    #[arg(long, value_parser = weir_proxy::dns::parse_upstream)]
    dns_upstream: Vec<std::net::SocketAddr>,
    /// Stub domain: names under SUFFIX go to this resolver, SUFFIX=IP[:PORT] (repeatable).
    #[arg(long, value_parser = weir_proxy::dns::parse_stub)]
    dns_stub_domain: Vec<(String, std::net::SocketAddr)>,
    /// The cluster DNS Service (NAMESPACE/NAME) whose queries from this node's pods go to this
    /// server while it answers, and to the Service's endpoints when it does not ("off": never).
    #[arg(long, default_value = "kube-system/kube-dns")]
    dns_service: String,
}

impl AgentDnsArgs {
    fn options(self) -> Option<weir_proxy::dns::Options> {
        if self.dns_listen.is_empty() {
            return None;
        }
        let service = (self.dns_service != "off").then_some(self.dns_service);
        Some(weir_proxy::dns::Options {
            service,
            ..DnsArgs {
                listen: self.dns_listen,
                domain: self.dns_domain,
                ttl: self.dns_ttl,
                pods: self.dns_pods,
                upstream: self.dns_upstream,
                stub_domain: self.dns_stub_domain,
            }
            .options()
        })
    }
}

/// The DNS server's options (`weir dns`).
#[derive(clap::Args, Debug)]
struct DnsArgs {
    /// Address to answer DNS on, UDP and TCP (repeatable).
    #[arg(long = "listen", default_value = "127.0.0.1:53")]
    listen: Vec<std::net::SocketAddr>,
    /// The cluster domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// TTL of the answers, in seconds.
    #[arg(long, default_value_t = 5)]
    ttl: u32,
    /// Pod records (`a-b-c-d.<ns>.pod.<domain>`): disabled, insecure, or verified (only the
    /// addresses of the Pods in the source file).
    #[arg(long, default_value = "disabled", value_parser = weir_proxy::dns::parse_pod_mode)]
    pods: weir_dns::PodMode,
    /// Resolver for names outside the cluster domain, IP or IP:PORT (repeatable; default: the
    /// nameservers of /etc/resolv.conf).
    #[arg(long, value_parser = weir_proxy::dns::parse_upstream)]
    upstream: Vec<std::net::SocketAddr>,
    /// Stub domain: names under SUFFIX go to this resolver, SUFFIX=IP[:PORT] (repeatable).
    #[arg(long, value_parser = weir_proxy::dns::parse_stub)]
    stub_domain: Vec<(String, std::net::SocketAddr)>,
}

impl DnsArgs {
    fn options(self) -> weir_proxy::dns::Options {
        weir_proxy::dns::Options {
            listen: self.listen,
            domain: self.domain,
            ttl: self.ttl,
            pods: self.pods,
            upstreams: if self.upstream.is_empty() {
                weir_proxy::dns::resolv_conf_upstreams(std::path::Path::new("/etc/resolv.conf"))
            } else {
                self.upstream
            },
            stubs: self.stub_domain,
            service: None,
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: log files stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weir: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A path, or none ("off").
#[derive(Clone, Debug)]
struct OptPath(Option<PathBuf>);

fn parse_path(s: &str) -> Result<OptPath, String> {
    Ok(OptPath(
        (s != "off" && !s.is_empty()).then(|| PathBuf::from(s)),
    ))
}

/// `weir agent --pod-programs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum PodProgramsArg {
    Auto,
    Tc,
    None,
}

/// `weir agent --host-routing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum HostRoutingArg {
    Bpf,
    Kernel,
}

/// A listen address, or none.
#[derive(Clone, Copy, Debug)]
struct Bind(Option<std::net::SocketAddr>);

fn parse_bind(s: &str) -> Result<Bind, String> {
    if s == "off" || s.is_empty() {
        return Ok(Bind(None));
    }
    s.parse()
        .map(|a| Bind(Some(a)))
        .map_err(|e| format!("{s:?}: {e} (an address such as 0.0.0.0:10256, or off)"))
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Agent {
            source,
            bpffs,
            cgroup,
            no_socket_lb,
            pod_programs,
            host_routing,
            pod_netns_dir,
            pod_interface_prefix,
            netdev,
            ready_file,
            once,
            cni_socket,
            node_name,
            pod_cidrs_file,
            healthz_bind_address,
            metrics_bind_address,
            health_timeout,
            state_file,
            dns,
        } => {
            init_tracing();
            let cgroup = if no_socket_lb {
                None
            } else {
                Some(match cgroup {
                    Some(c) => c,
                    None => topo::cgroup2_root()?,
                })
            };
            if cgroup.is_none() && pod_programs == PodProgramsArg::None {
                anyhow::bail!("--pod-programs none needs the socket hooks: every pod's flows would go untranslated with --no-socket-lb");
            }
            let cfg = agent::Config {
                source,
                bpffs,
                cgroup,
                pod_programs: match pod_programs {
                    PodProgramsArg::Auto => None,
                    PodProgramsArg::Tc => Some(weir_proxy::loader::PodPrograms::PerPacket),
                    PodProgramsArg::None => Some(weir_proxy::loader::PodPrograms::None),
                },
                host_routing: match host_routing {
                    HostRoutingArg::Bpf => weir_proxy::loader::HostRouting::Bpf,
                    HostRoutingArg::Kernel => weir_proxy::loader::HostRouting::Kernel,
                },
                pod_netns_dir: Some(pod_netns_dir),
                pod_if_prefixes: pod_interface_prefix,
                netdevs: netdev,
                ready_file,
                once,
                cni_socket: cni_socket.0,
                node_name,
                pod_cidrs_file,
                healthz_bind: healthz_bind_address.0,
                metrics_bind: metrics_bind_address.0,
                health_timeout,
                state_file: state_file.0,
                dns: dns.options(),
            };
            runtime()?.block_on(agent::run(cfg))
        }
        Cmd::Sandbox {
            rate,
            duration,
            cleanup,
        } => {
            if cleanup {
                let gone = topo::sweep("sbx")?;
                println!(
                    "removed {} leftover namespaces: {}",
                    gone.len(),
                    gone.join(" ")
                );
                return Ok(());
            }
            sandbox::run(sandbox::SandboxOptions { rate, duration })
        }
        Cmd::Loadtest {
            target,
            rate,
            duration,
            proto,
            connections,
            new_conn,
            unconnected,
            timeout,
            json,
            quiet,
            closed,
            cpu,
        } => {
            if let Some(c) = cpu {
                topo::pin_to_cpu(c)?;
            }
            let spec = loadtest::Spec {
                target,
                rate,
                duration,
                proto,
                connections,
                new_conn,
                unconnected,
                timeout,
                progress: !quiet,
                closed,
            };
            let report = loadtest::run(spec)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Cmd::Status {
            bpffs,
            json,
            conntrack,
            state_file,
        } => {
            let mut st = status::read(&agent::pin_dir(&bpffs).maps(), conntrack)?;
            st.by_service = status::read_reports(&state_file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", status::render(&st));
            }
            Ok(())
        }
        Cmd::Dns { source, dns } => {
            init_tracing();
            let agent::Source::File(path) = source else {
                anyhow::bail!("weir dns reads a file source (file:PATH); the agent embeds the server for the Kubernetes API");
            };
            runtime()?.block_on(weir_proxy::dns::run_standalone(&path, dns.options()))
        }
        Cmd::EchoServer {
            name,
            address,
            port,
            cpu,
        } => {
            if let Some(c) = cpu {
                topo::pin_to_cpu(c)?;
            }
            runtime()?.block_on(echo::serve(name, address, port))
        }
    }
}
