//! `weir agent`: loads the data path, programs services from the source and follows it, and
//! serves what sits beside it (weir-cni's socket, health and metrics, cluster DNS).
//!
//! One Service change travels: the source (`k8s::watch` or `k8s::file`) → `k8s::reconcile`,
//! which builds the `model` and hands the desired frontends to `datapath::Programmer` → the
//! pinned maps the eBPF programs read.
use std::{
    fs,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{
    admin::{healthcheck::HealthChecks, Health, Metrics, Observed},
    datapath::{
        ensure_bpffs, pin_dir, AyaMaps, Conntrack, Datapath, HostRouting, PodPrograms, Programmer,
        TcRole,
    },
    dns::{self, Options as DnsOptions},
    k8s::{client::kube_client, KubeSource, Reconciler, Source, PROXY_LABEL_SELECTOR},
    node::{
        cni,
        netns::is_cgroup_root,
        pods::{PodVeths, PodsWorker},
        sockterm::Terminator,
    },
};

mod sync;

use sync::SyncWorker;

#[derive(Clone, Debug)]
pub struct Config {
    pub source: Source,
    /// A bpffs mount; weir pins under `<bpffs>/weir`.
    pub bpffs: PathBuf,
    /// cgroup v2 directory for the socket-level hooks; None turns socket LB off.
    pub cgroup: Option<PathBuf>,
    /// What pod veths carry; None: decided from `cgroup` (none when it is a cgroup v2 root,
    /// whose hooks see every pod's sockets).
    pub pod_programs: Option<PodPrograms>,
    /// How translated packets to a pod of the node reach it.
    pub host_routing: HostRouting,
    /// Where the pods' network namespaces are pinned (`/var/run/netns`): connected UDP sockets
    /// of removed backends are aborted there and in the agent's own namespace.
    pub pod_netns_dir: Option<PathBuf>,
    /// Interfaces whose name starts with one of these are pod host-side veths.
    pub pod_if_prefixes: Vec<String>,
    pub netdevs: Vec<String>,
    /// Touched once the first sync is programmed.
    pub ready_file: Option<PathBuf>,
    pub once: bool,
    /// The socket `weir-cni` asks to attach the pod program on (None: no socket).
    pub cni_socket: Option<PathBuf>,
    /// This node's name: its `spec.podCIDRs` go to `pod_cidrs_file` for weir-cni's IPAM.
    pub node_name: Option<String>,
    pub pod_cidrs_file: PathBuf,
    /// `/healthz` and `/livez` (kube-proxy: 0.0.0.0:10256); None: not served.
    pub healthz_bind: Option<std::net::SocketAddr>,
    /// `/metrics` (kube-proxy: 127.0.0.1:10249); None: not served.
    pub metrics_bind: Option<std::net::SocketAddr>,
    /// How long a change may wait to be programmed before `/healthz` fails.
    pub health_timeout: Duration,
    /// Where each sync writes, per Service, whether it is programmed and why not (read by
    /// `weir status`).
    pub state_file: Option<PathBuf>,
    /// The embedded cluster DNS server (None: not served).
    pub dns: Option<DnsOptions>,
    /// Apply a file source that holds no Service (else refused: it would withdraw them all).
    pub allow_empty_source: bool,
}

/// How often the agent looks at its devices and its source.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How often the conntrack gauges are counted: a walk of both maps, read in batches (up to
/// 2 × `MAX_CT` entries), on a thread of its own.
const CT_GAUGE_INTERVAL: Duration = Duration::from_secs(15);

/// How long a renewal of the node-local DNS lease lasts: an agent that dies takes its node's
/// DNS traffic with it for at most this long.
const NODE_LOCAL_LEASE: Duration = Duration::from_secs(2);

/// Keeps `weir_map_entries` / `weir_map_capacity` of the conntrack maps (`conntrack_ipv4`,
/// `conntrack_ipv6`) up to date: a full map evicts its least recently used flows, which is
/// what an operator wants to see coming. The first count is made before this returns, so the
/// gauges are there from the first scrape.
fn start_conntrack_gauges(maps_dir: PathBuf, obs: Arc<Observed>) -> Result<()> {
    let ct = Conntrack::open(&maps_dir)?;
    let cap = weir_common::MAX_CT as i64;
    let count = move || match ct.counts() {
        Ok((v4, v6)) => {
            obs.metrics.set_map("conntrack_ipv4", v4 as i64, cap);
            obs.metrics.set_map("conntrack_ipv6", v6 as i64, cap);
        }
        Err(e) => warn!("conntrack gauges: {e:#}"),
    };
    count();
    std::thread::Builder::new()
        .name("weir-ct-gauges".into())
        .spawn(move || loop {
            std::thread::sleep(CT_GAUGE_INTERVAL);
            count();
        })
        .context("start the conntrack gauges' thread")?;
    Ok(())
}

pub async fn run(cfg: Config) -> Result<()> {
    ensure_bpffs(&cfg.bpffs)?;
    let mut dp = Datapath::load(pin_dir(&cfg.bpffs))?;
    if let Some(cg) = &cfg.cgroup {
        dp.attach_cgroup(cg)?;
        info!(cgroup = %cg.display(), "socket load balancing attached");
    }
    // The hooks on a cgroup v2 root see every pod's sockets: no pod packet is addressed to
    // a service, and pod veths go without programs (every packet between pods pays for one
    // that is there).
    let pod_programs = cfg.pod_programs.unwrap_or(
        if cfg.cgroup.as_ref().is_some_and(|cg| is_cgroup_root(cg)) {
            PodPrograms::None
        } else {
            PodPrograms::PerPacket
        },
    );
    dp.set_pod_programs(pod_programs);
    dp.set_host_routing(cfg.host_routing);
    info!(?pod_programs, host_routing = ?cfg.host_routing, "pod veth programs");
    // Uplinks first: with no pod programs, replies of external flows a pod serves are
    // translated on the uplink's egress, which must be in place before an earlier run's pod
    // programs come off (the first poll).
    for dev in &cfg.netdevs {
        dp.attach_tc(dev, TcRole::FromNetdev)?;
        dp.attach_tc(dev, TcRole::ToNetdev)?;
        info!(dev = %dev, "attached tc_from_netdev and tc_to_netdev");
    }
    let maps = AyaMaps::open(&dp.pins().maps())?;
    let programmer = Programmer::adopt(&maps)?;
    // Connected UDP sockets exist only where the hooks balance sockets.
    let terminator = match &cfg.cgroup {
        Some(_) => Some(Terminator::start(
            &dp.pins().maps(),
            cfg.pod_netns_dir.clone(),
        )?),
        None => None,
    };
    let adopted = programmer.programmed_frontends().count();
    if adopted > 0 {
        info!(
            frontends = adopted,
            "adopted what a previous run programmed"
        );
    }
    let maps_dir = dp.pins().maps();
    let mut pods = PodVeths::new(dp, cfg.pod_if_prefixes.clone(), cfg.cni_socket.is_some());
    // The first poll before the first sync: the devices of pods made while no agent ran get
    // this run's programs, and an upgrade's conntrack migration finishes.
    pods.poll(POLL_INTERVAL);
    let pods = PodsWorker::spawn(pods, POLL_INTERVAL)?;
    // Whether the first sync is programmed (weir-cni's ping asks).
    let ready = Arc::new(AtomicBool::new(false));
    if let Some(p) = &cfg.cni_socket {
        cni::serve(cni::listen(p)?, pods.clone(), ready.clone());
    }
    let kube = match &cfg.source {
        Source::Kube { kubeconfig } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            info!("watching the Kubernetes API");
            // DNS serves headless Services too, whose slices kube-proxy's selector leaves out.
            let selector = if cfg.dns.is_some() {
                None
            } else {
                Some(PROXY_LABEL_SELECTOR)
            };
            // `pods verified` answers for pods the API has: watch them (only then).
            let pods = cfg
                .dns
                .as_ref()
                .is_some_and(|o| o.pods == weir_dns::PodMode::Verified);
            Some(KubeSource::start_with(
                client,
                cfg.node_name.as_deref(),
                selector,
                pods,
            ))
        }
        Source::File(_) => None,
    };
    let obs = Arc::new(Observed {
        health: Health::new(cfg.health_timeout),
        metrics: Metrics::new(),
    });
    obs.health.queued(SystemTime::now());
    if let Some(a) = cfg.healthz_bind {
        crate::admin::serve(a, "/healthz and /livez", "healthz", obs.clone()).await?;
    }
    if let Some(a) = cfg.metrics_bind {
        start_conntrack_gauges(maps_dir.clone(), obs.clone())?;
        crate::admin::serve(a, "/metrics", "metrics", obs.clone()).await?;
    }
    let mut last_probe = None;
    // The node-local lease, when this node takes its pods' DNS Service traffic.
    let mut lease = match cfg.dns.as_ref().filter(|o| o.service.is_some()) {
        Some(opts) => Some(dns::Lease::open(&maps_dir, opts)?),
        None => None,
    };
    let (dns, dns_feed) = match &cfg.dns {
        Some(opts) => {
            let h = Arc::new(dns::handler(opts)?);
            dns::serve_on_own_thread(opts, h.clone())?;
            obs.metrics.set_dns(h.clone());
            let feed = dns::ZoneFeed::start(h.clone(), opts.clone(), obs.clone())?;
            (Some(h), Some(feed))
        }
        None => (None, None),
    };
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let sync = SyncWorker::spawn(
        sync::Parts {
            allow_empty_source: cfg.allow_empty_source,
            objects: match (&cfg.source, &kube) {
                (_, Some(k)) => sync::Objects::Kube(k.clone()),
                (Source::File(path), None) => sync::Objects::File(path.clone()),
                (Source::Kube { .. }, None) => unreachable!("a Kubernetes source has its stores"),
            },
            reconciler: Reconciler::new(
                cfg.node_name.clone(),
                cfg.pod_cidrs_file.clone(),
                cfg.state_file.clone(),
                cfg.dns.as_ref().and_then(|d| d.service.clone()),
            ),
            programmer,
            maps,
            obs: obs.clone(),
            dns_feed,
            terminator,
        },
        done_tx,
    )?;
    let mut health_checks = HealthChecks::new(obs.clone());
    let mut watch_errors = 0;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = async {
            match &kube {
                Some(k) => k.progress.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {
                pods.poll();
                if kube.is_none() {
                    // The worker syncs the file if it changed.
                    sync.trigger();
                }
                if let Some(k) = &kube {
                    let e = k.progress.errors.load(Ordering::Relaxed);
                    obs.metrics.watch_errors.inc_by(e - watch_errors);
                    watch_errors = e;
                }
                // The node-local DNS lease, renewed while the server answers a query of its
                // own.
                if let (Some(h), Some(opts), Some(lease)) = (&dns, &cfg.dns, lease.as_mut()) {
                    if h.ready() && last_probe.is_none_or(|t: Instant| t.elapsed() >= POLL_INTERVAL) {
                        last_probe = Some(Instant::now());
                        if dns::probe(opts).await {
                            if let Err(e) = lease.renew(NODE_LOCAL_LEASE) {
                                warn!("DNS lease: {e:#}");
                            }
                        } else {
                            warn!("DNS: the node's server does not answer; its lease is not renewed");
                        }
                    }
                }
            }
            Some(synced) = done.recv() => {
                if let Some(table) = &synced.health_checks {
                    health_checks.serve(table);
                }
                if !ready.swap(true, Ordering::AcqRel) {
                    if let Some(f) = &cfg.ready_file {
                        fs::write(f, b"ready\n").with_context(|| format!("write {}", f.display()))?;
                    }
                }
                if cfg.once {
                    return Ok(());
                }
            }
            _ = changed => {
                obs.health.queued(SystemTime::now());
                sync.trigger();
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Links and maps stay pinned: the data path keeps serving while the agent is away. Its
    // DNS server does not: DNS traffic goes to the Service's backends from now on.
    if let Some(lease) = lease.as_mut() {
        if let Err(e) = lease.renew(Duration::ZERO) {
            warn!("DNS lease: {e:#}");
        }
    }
    info!("stopping; the data path stays programmed");
    Ok(())
}
