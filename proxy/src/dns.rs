//! The cluster DNS server, fed from the same objects as the data path: Kubernetes Services and
//! EndpointSlices become `weir_dns` Services, whose zone the embedded server answers from.
//! `weir dns` runs it alone with a file source; `weir agent --dns-listen` embeds it.
use std::{
    collections::BTreeMap,
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    sync::Arc,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};
use weir_dns::{Config as ZoneConfig, Endpoint, Handler, Kind, PodMode, Port, Service, Zone};

use crate::model::{self, Objects};

/// How the server runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Addresses to answer on, UDP and TCP each.
    pub listen: Vec<SocketAddr>,
    /// The cluster domain.
    pub domain: String,
    pub ttl: u32,
    pub pods: PodMode,
    /// Resolvers for names outside the cluster zone.
    pub upstreams: Vec<SocketAddr>,
    /// Stub domains: names under the suffix go to its resolver.
    pub stubs: Vec<(String, SocketAddr)>,
    /// `namespace/name` of the cluster DNS Service whose traffic the node's own server takes
    /// while it answers (the agent only; None: no node-local DNS).
    pub service: Option<String>,
}

impl Options {
    /// The address of each family the node-local redirection sends to: the first listen
    /// address of that family that is not a wildcard.
    pub fn local_addrs(&self) -> (Option<SocketAddr>, Option<SocketAddr>) {
        let pick = |v4: bool| {
            self.listen
                .iter()
                .find(|a| a.is_ipv4() == v4 && !a.ip().is_unspecified())
                .copied()
        };
        (pick(true), pick(false))
    }
}

/// Whether the server answers `dns-version.<domain>` TXT on its node-local address within
/// 200 ms (the liveness the lease rests on).
pub async fn probe(opts: &Options) -> bool {
    let (v4, v6) = opts.local_addrs();
    let (Some(addr), Ok(name)) = (
        v4.or(v6),
        hickory_name(&format!(
            "dns-version.{}.",
            opts.domain.trim_end_matches('.')
        )),
    ) else {
        return false;
    };
    weir_dns::server::probe(
        addr,
        &name,
        weir_dns::RecordType::TXT,
        Duration::from_millis(200),
    )
    .await
}

/// The node-local lease, its map opened once: the node's own server at the options'
/// addresses. The socket hooks read it for the `SVC_F_NODE_LOCAL` Service.
pub struct Lease {
    map: aya::maps::Array<aya::maps::MapData, weir_common::NodeLocal>,
    entry: weir_common::NodeLocal,
}

impl Lease {
    pub fn open(maps_dir: &Path, opts: &Options) -> Result<Lease> {
        let map = crate::maps::open_typed(maps_dir, weir_common::map_names::NODE_LOCAL)?;
        let (v4, v6) = opts.local_addrs();
        let entry = weir_common::NodeLocal {
            addr4: v4.map(|a| crate::addr::to_addr(a.ip())).unwrap_or_default(),
            addr6: v6.map(|a| crate::addr::to_addr(a.ip())).unwrap_or_default(),
            port: v4.or(v6).map(|a| a.port()).unwrap_or(0).to_be(),
            ..Default::default()
        };
        Ok(Lease { map, entry })
    }

    /// Valid `for_` from now; zero withdraws it at once.
    pub fn renew(&mut self, for_: Duration) -> Result<()> {
        let now_ns = crate::kernel_facts::clock_ns()?;
        self.entry.expires_ns = if for_.is_zero() {
            0
        } else {
            now_ns + for_.as_nanos() as u64
        };
        self.map
            .set(0, self.entry, 0)
            .with_context(|| format!("write {}", weir_common::map_names::NODE_LOCAL))
    }
}

impl Options {
    fn zone_config(&self) -> Result<ZoneConfig> {
        let mut domain = hickory_name(&self.domain)
            .with_context(|| format!("cluster domain {:?}", self.domain))?;
        domain.set_fqdn(true);
        Ok(ZoneConfig {
            domain,
            ttl: self.ttl,
            pods: self.pods,
        })
    }
}

fn hickory_name(s: &str) -> Result<weir_dns::Name> {
    weir_dns::Name::from_ascii(s).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `disabled`, `insecure` or `verified`, as CoreDNS's `pods` option.
pub fn parse_pod_mode(s: &str) -> Result<PodMode, String> {
    match s {
        "disabled" => Ok(PodMode::Disabled),
        "insecure" => Ok(PodMode::Insecure),
        "verified" => Ok(PodMode::Verified),
        _ => Err(format!("{s:?}: expected disabled, insecure or verified")),
    }
}

/// `IP` or `IP:PORT` (port 53 by default), IPv6 in brackets with a port.
pub fn parse_upstream(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 53))
        .map_err(|_| format!("{s:?}: expected IP or IP:PORT"))
}

/// `SUFFIX=IP[:PORT]`: names under SUFFIX go to that resolver.
pub fn parse_stub(s: &str) -> Result<(String, SocketAddr), String> {
    let (suffix, ip) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected SUFFIX=IP[:PORT]"))?;
    weir_dns::Name::from_ascii(suffix).map_err(|e| format!("{s:?}: {e}"))?;
    Ok((suffix.into(), parse_upstream(ip)?))
}

/// The handler these options describe: upstreams and stub domains.
pub fn handler(opts: &Options) -> Result<Handler> {
    let mut h = Handler::new(opts.upstreams.clone());
    let mut stubs: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    for (suffix, r) in &opts.stubs {
        stubs.entry(suffix.clone()).or_default().push(*r);
    }
    for (suffix, resolvers) in stubs {
        let mut n = hickory_name(&suffix).with_context(|| format!("stub domain {suffix:?}"))?;
        n.set_fqdn(true);
        h = h.with_stub(n, resolvers);
    }
    Ok(h)
}

/// The `nameserver` lines of a resolv.conf (the node's own resolvers).
pub fn resolv_conf_upstreams(path: &Path) -> Vec<SocketAddr> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// A Service's or a slice's port (protocol TCP unless given); None without a valid number.
fn port(name: &Option<String>, protocol: &Option<String>, number: Option<i32>) -> Option<Port> {
    Some(Port {
        name: name.clone().unwrap_or_default(),
        protocol: protocol.clone().unwrap_or_else(|| "TCP".into()),
        port: u16::try_from(number?).ok()?,
    })
}

/// The DNS view of every Service in `objs`: ClusterIP Services by their cluster IPs, headless
/// ones by their endpoints (ready, or all with `publishNotReadyAddresses`), ExternalName ones
/// by their target. Unlike the data path, DNS serves Services whatever their proxy labels.
pub fn services(objs: &Objects) -> Vec<Service> {
    let mut slices: BTreeMap<(&str, &str), Vec<&k8s_openapi::api::discovery::v1::EndpointSlice>> =
        BTreeMap::new();
    for s in &objs.slices {
        let ns = s.metadata.namespace.as_deref().unwrap_or("default");
        if let Some(svc) = s
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(model::SERVICE_NAME_LABEL))
        {
            slices.entry((ns, svc.as_str())).or_default().push(s);
        }
    }
    let mut out = Vec::new();
    for svc in &objs.services {
        let (Some(name), Some(spec)) = (svc.metadata.name.as_deref(), svc.spec.as_ref()) else {
            continue;
        };
        let ns = svc.metadata.namespace.as_deref().unwrap_or("default");
        let ports: Vec<Port> = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|p| port(&p.name, &p.protocol, Some(p.port)))
            .collect();
        let kind = if spec.type_.as_deref() == Some("ExternalName") {
            match &spec.external_name {
                Some(t) => Kind::ExternalName(t.clone()),
                None => continue,
            }
        } else if spec.cluster_ip.as_deref() == Some("None") {
            let publish_all = spec.publish_not_ready_addresses == Some(true);
            let mut eps = Vec::new();
            for s in slices.get(&(ns, name)).into_iter().flatten() {
                if !matches!(s.address_type.as_str(), "IPv4" | "IPv6") {
                    continue;
                }
                let slice_ports: Vec<Port> = s
                    .ports
                    .iter()
                    .flatten()
                    .filter_map(|p| port(&p.name, &p.protocol, p.port))
                    .collect();
                for e in s.endpoints.iter().flatten() {
                    let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                    eps.push(Endpoint {
                        ips: e.addresses.iter().filter_map(|a| a.parse().ok()).collect(),
                        hostname: e.hostname.clone(),
                        ready: ready || publish_all,
                        ports: slice_ports.clone(),
                    });
                }
            }
            Kind::Headless(eps)
        } else {
            let ips: Vec<IpAddr> = spec
                .cluster_ips
                .iter()
                .flatten()
                .chain(spec.cluster_ip.iter())
                .filter_map(|ip| ip.parse().ok())
                .collect();
            let mut uniq = Vec::new();
            for ip in ips {
                if !uniq.contains(&ip) {
                    uniq.push(ip);
                }
            }
            if uniq.is_empty() {
                continue;
            }
            Kind::ClusterIp(uniq)
        };
        out.push(Service {
            namespace: ns.into(),
            name: name.into(),
            kind,
            ports,
        });
    }
    out
}

/// The pods `pods verified` answers for: those with addresses, not being deleted (CoreDNS
/// drops a terminating pod from its index the same way).
pub fn pods(objs: &Objects) -> Vec<weir_dns::Pod> {
    objs.pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            let mut ips: Vec<IpAddr> = status
                .pod_ips
                .iter()
                .flatten()
                .map(|a| a.ip.as_str())
                .chain(status.pod_ip.as_deref())
                .filter_map(|ip| ip.parse().ok())
                .collect();
            ips.sort();
            ips.dedup();
            (!ips.is_empty()).then(|| weir_dns::Pod {
                namespace: p
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into()),
                ips,
            })
        })
        .collect()
}

/// Builds the zone of `objs` and serves it from now on.
pub fn update(h: &Handler, opts: &Options, objs: &Objects) -> Result<usize> {
    let pods = if opts.pods == PodMode::Verified {
        pods(objs)
    } else {
        Vec::new()
    };
    let zone = Zone::build_with_pods(opts.zone_config()?, &services(objs), &pods);
    let n = zone.record_count;
    h.set_zone(zone);
    Ok(n)
}

/// Binds UDP and TCP on every listen address and answers there from `h` in the background.
pub async fn serve(opts: &Options, h: Arc<Handler>) -> Result<()> {
    opts.zone_config()?;
    if opts.listen.is_empty() {
        bail!("DNS: no address to listen on");
    }
    for a in &opts.listen {
        let udp = tokio::net::UdpSocket::bind(a)
            .await
            .with_context(|| format!("DNS: bind UDP {a}"))?;
        let tcp = tokio::net::TcpListener::bind(a)
            .await
            .with_context(|| format!("DNS: bind TCP {a}"))?;
        let (h1, h2) = (h.clone(), h.clone());
        let a = *a;
        tokio::spawn(async move {
            if let Err(e) = weir_dns::server::serve_udp(Arc::new(udp), h1).await {
                warn!(listen = %a, "DNS over UDP stopped: {e}");
            }
        });
        tokio::spawn(async move {
            if let Err(e) = weir_dns::server::serve_tcp(tcp, h2).await {
                warn!(listen = %a, "DNS over TCP stopped: {e}");
            }
        });
        info!(listen = %a, "serving cluster DNS (UDP and TCP)");
    }
    Ok(())
}

/// Serves `h` on a thread of its own (with its own runtime), so that a long sync of the
/// agent never holds a query up; returns once the sockets are bound.
pub fn serve_on_own_thread(opts: &Options, h: Arc<Handler>) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = opts.clone();
    std::thread::Builder::new()
        .name("weir-dns".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::anyhow!("DNS: start a runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let bound = serve(&opts, h).await;
                let failed = bound.is_err();
                let _ = tx.send(bound);
                if !failed {
                    std::future::pending::<()>().await;
                }
            });
        })
        .context("DNS: start its thread")?;
    rx.recv().context("DNS: its thread ended")?
}

/// What a zone is rebuilt from: a snapshot of the objects, taken when the rebuild starts.
pub type Snapshot = Box<dyn FnOnce() -> Objects + Send>;

/// The agent's zone builder: a thread of its own rebuilds the zone after changes, so that a
/// rebuild (0.1 s at 10 000 services and 30 000 pods) never holds up the data path. Of a burst
/// of changes, only the latest is built.
pub struct ZoneFeed {
    tx: std::sync::mpsc::Sender<Snapshot>,
}

impl ZoneFeed {
    pub fn start(
        h: Arc<Handler>,
        opts: Options,
        obs: Arc<crate::observe::Observed>,
    ) -> Result<ZoneFeed> {
        let (tx, rx) = std::sync::mpsc::channel::<Snapshot>();
        std::thread::Builder::new()
            .name("weir-dns-zone".into())
            .spawn(move || {
                while let Ok(mut snap) = rx.recv() {
                    while let Ok(newer) = rx.try_recv() {
                        snap = newer;
                    }
                    let objs = snap();
                    match update(&h, &opts, &objs) {
                        Ok(_) => obs.metrics.observe_dns(&objs, std::time::SystemTime::now()),
                        Err(e) => warn!("DNS: {e:#}"),
                    }
                }
            })
            .context("DNS: start the zone builder")?;
        Ok(ZoneFeed { tx })
    }

    /// Asks for a rebuild from this snapshot (taken on the builder's thread).
    pub fn rebuild(&self, snapshot: Snapshot) {
        let _ = self.tx.send(snapshot);
    }
}

/// `weir dns`: the server alone, its zone from a YAML file, rebuilt when the file changes.
pub async fn run_standalone(source: &Path, opts: Options) -> Result<()> {
    let h = Arc::new(handler(&opts)?);
    serve(&opts, h.clone()).await?;
    if opts.upstreams.is_empty() {
        warn!("no upstream resolvers: names outside the cluster zone get SERVFAIL");
    }
    let mut last = None;
    loop {
        let stamp = crate::agent::stamp(source);
        if stamp != last {
            last = stamp;
            match fs::read_to_string(source)
                .with_context(|| format!("read {}", source.display()))
                .and_then(|text| {
                    model::parse_stream(&text)
                        .map_err(|p| anyhow::anyhow!("{}: {p}", source.display()))
                }) {
                Ok((objs, problems)) => {
                    for p in problems {
                        warn!("{p}");
                    }
                    let n = update(&h, &opts, &objs)?;
                    let services = objs.services.len();
                    drop(objs);
                    // The parse's garbage back to the system: the zone is what stays.
                    // SAFETY: malloc_trim only releases free heap memory.
                    unsafe { libc::malloc_trim(0) };
                    info!(
                        services,
                        records = n,
                        "zone rebuilt from {}",
                        source.display()
                    );
                }
                Err(e) => warn!("{e:#}; the zone served stays"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
