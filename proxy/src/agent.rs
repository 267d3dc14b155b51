//! `weir agent`: loads the data path, programs services from the source, follows it.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use tracing::{info, warn};

use weir_cni::agent::{Reply, Request};

use crate::{
    kube_source::KubeSource,
    loader::{ensure_bpffs, Datapath, HostRouting, PinDir, PodPrograms, TcRole},
    maps::AyaMaps,
    model,
    observe::{Health, Metrics, Observed},
    program::Programmer,
};

/// Where Services, EndpointSlices and the Node come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// Multi-document YAML, reloaded when it changes.
    File(PathBuf),
    /// The Kubernetes API: in-cluster config, or this kubeconfig (else `KUBECONFIG` or
    /// `~/.kube/config`).
    Kube { kubeconfig: Option<PathBuf> },
}

impl std::str::FromStr for Source {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("file:") {
            return Ok(Source::File(p.into()));
        }
        if s == "kube" {
            return Ok(Source::Kube { kubeconfig: None });
        }
        if let Some(p) = s.strip_prefix("kube:") {
            return Ok(Source::Kube {
                kubeconfig: Some(p.into()),
            });
        }
        Err(format!(
            "{s:?}: expected file:PATH, kube (in-cluster or default kubeconfig) or kube:KUBECONFIG"
        ))
    }
}

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
    pub dns: Option<crate::dns::Options>,
}

impl Config {
    /// Programs `source` for the node `node_name`, and nothing else: no socket hooks, no
    /// devices, no CNI socket, no HTTP servers, no report file. For tests and benches that
    /// drive the agent's sync steps themselves; the podCIDRs go to `pod_cidrs_file`.
    pub fn bare(source: Source, node_name: &str, pod_cidrs_file: PathBuf) -> Config {
        Config {
            source,
            bpffs: PathBuf::new(),
            cgroup: None,
            pod_programs: None,
            host_routing: HostRouting::Bpf,
            pod_netns_dir: None,
            pod_if_prefixes: vec![],
            netdevs: vec![],
            ready_file: None,
            once: false,
            cni_socket: None,
            node_name: Some(node_name.into()),
            pod_cidrs_file,
            healthz_bind: None,
            metrics_bind: None,
            health_timeout: Duration::from_secs(60),
            state_file: None,
            dns: None,
        }
    }
}

/// A cgroup v2 root has no `cgroup.type` (every other cgroup has one), wherever it is mounted.
fn is_cgroup_root(cg: &Path) -> bool {
    cg.is_dir() && !cg.join("cgroup.type").exists()
}

pub fn pin_dir(bpffs: &Path) -> PinDir {
    PinDir(bpffs.join("weir"))
}

/// The interfaces of the agent's network namespace, by (name, index).
fn interfaces() -> BTreeSet<(String, u32)> {
    nix::net::if_::if_nameindex()
        .map(|l| {
            l.iter()
                .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    fs::metadata(p)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct Synced {
    pub stats: crate::program::ApplyStats,
    pub frontends: usize,
    /// Services not programmed, with why.
    pub skipped: BTreeMap<String, String>,
    /// Objects (or parts) that could not be used.
    pub problems: Vec<model::Problem>,
    /// Per Service: programmed or not, and why.
    pub reports: Vec<model::ServiceReport>,
    /// Every Service's frontends, held or not (what was programmed is what they hold).
    pub claims: model::Claims,
    pub took: Duration,
    /// Of which the map writer's apply.
    pub apply_took: Duration,
    /// healthCheckNodePort → (Service, this node's ready endpoints).
    pub health_checks: BTreeMap<u16, (String, usize)>,
}

/// Builds the model from `objs` and programs the difference. Problems with single objects
/// are logged and skipped; the rest is programmed.
pub fn program_objects(
    objs: &model::Objects,
    mut problems: Vec<model::Problem>,
    node: &model::NodeContext,
    programmer: &mut Programmer,
    w: &mut dyn crate::maps::MapWriter,
) -> Synced {
    let started = Instant::now();
    let m = model::build(objs, node);
    problems.extend(m.problems.iter().cloned());
    log_model(&problems, &m.skipped);
    let applying = Instant::now();
    let st = programmer.apply(&m.desired, w);
    let apply_took = applying.elapsed();
    for e in &st.errors {
        warn!("{e}");
    }
    info!(
        frontends = m.desired.len(),
        changed = st.services_changed,
        removed = st.services_removed,
        backends_added = st.backends_added,
        backends_removed = st.backends_removed,
        udp_flows_purged = st.flows_purged,
        writes = st.writes,
        took_us = started.elapsed().as_micros() as u64,
        "programmed"
    );
    let skipped = m
        .skipped
        .iter()
        .map(|s| (s.service.clone(), s.reason.clone()))
        .collect();
    Synced {
        reports: m.reports(&st.failed),
        frontends: m.desired.len(),
        health_checks: m.health_checks.clone(),
        claims: m.claims,
        stats: st,
        skipped,
        problems,
        took: started.elapsed(),
        apply_took,
    }
}

/// Programs a snapshot of the objects, writes this node's podCIDRs for weir-cni, and
/// records the sync for health and metrics.
fn sync(
    cfg: &Config,
    objs: &model::Objects,
    problems: Vec<model::Problem>,
    programmer: &mut Programmer,
    maps: &mut dyn crate::maps::MapWriter,
    obs: &Observed,
) -> Result<Synced> {
    if let Some(node) = &cfg.node_name {
        match model::pod_cidrs(objs, node) {
            Some(cidrs) => write_pod_cidrs(&cfg.pod_cidrs_file, cidrs)?,
            None => warn!(node = %node, "this node is not in the source; no podCIDRs for weir-cni"),
        }
        obs.health
            .set_node_eligible(crate::observe::node_eligible(objs, node));
    }
    let r = program_objects(objs, problems, &node_context(cfg, objs), programmer, maps);
    let now = SystemTime::now();
    let m = &obs.metrics;
    set_object_metrics(obs, &r.skipped, r.problems.len());
    m.observe_programmed(objs, now);
    record_sync(r.took, programmer, obs, now);
    if let Some(f) = &cfg.state_file {
        write_atomically(f, &serde_json::to_vec_pretty(&r.reports)?)?;
    }
    Ok(r)
}

/// This node as the model sees it: its Node object, and the DNS Service it serves itself.
fn node_context(cfg: &Config, objs: &model::Objects) -> model::NodeContext {
    let mut ctx = model::NodeContext::of(objs, cfg.node_name.as_deref());
    ctx.node_local_service = cfg.dns.as_ref().and_then(|d| d.service.clone());
    ctx
}

fn log_model(problems: &[model::Problem], skipped: &[model::Skipped]) {
    for p in problems {
        warn!(object = %p.object, "skipped: {}", p.message);
    }
    for s in skipped {
        info!(service = %s.service, reason = %s.reason, "not programmed");
    }
}

/// The gauges of what is not programmed: services by reason, and problems.
fn set_object_metrics(obs: &Observed, skipped: &BTreeMap<String, String>, problems: usize) {
    let mut by_reason = BTreeMap::new();
    for reason in skipped.values() {
        *by_reason.entry(reason.clone()).or_insert(0) += 1;
    }
    obs.metrics.set_skipped(&by_reason);
    obs.metrics.problems.set(problems as i64);
}

/// Metrics and health after any sync.
fn record_sync(took: Duration, programmer: &Programmer, obs: &Observed, now: SystemTime) {
    let m = &obs.metrics;
    m.sync_duration.observe(took.as_secs_f64());
    m.last_sync.set(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64(),
    );
    let f = programmer.fill();
    m.set_map(
        "services",
        f.service_slots as i64,
        weir_common::MAX_SERVICE_SLOTS as i64,
    );
    m.set_map(
        "backends",
        f.backends as i64,
        weir_common::MAX_BACKENDS as i64,
    );
    m.set_map(
        "maglev",
        f.maglev_services as i64,
        weir_common::MAX_MAGLEV_SERVICES as i64,
    );
    obs.health.updated(now);
}

/// Programs what the Kubernetes watches changed: everything at the start, after a relist or a
/// Node change; otherwise only the Services the events touched, rebuilt from the stores and
/// written as changes.
#[derive(Default)]
pub struct KubeSync {
    incremental: Option<Incremental>,
    /// What the last step did.
    pub last: StepStats,
}

/// What one [`KubeSync::step`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepStats {
    /// Services rebuilt alone; None: a full sync.
    pub rebuilt: Option<usize>,
    /// Time in the map writer's apply (diff and writes).
    pub map_work: Duration,
    /// The whole step: model, apply, metrics, report.
    pub total: Duration,
    pub writes: usize,
}

impl KubeSync {
    /// healthCheckNodePort → (Service, this node's ready endpoints), as of the last step.
    pub fn health_checks(&self) -> BTreeMap<u16, (String, usize)> {
        self.incremental
            .as_ref()
            .map(|i| i.health_checks.clone())
            .unwrap_or_default()
    }

    /// One sync of what changed since the last; call once every kind is listed. Returns how
    /// many Services were rebuilt alone, or None for a full sync.
    pub fn step(
        &mut self,
        cfg: &Config,
        k: &KubeSource,
        programmer: &mut Programmer,
        maps: &mut dyn crate::maps::MapWriter,
        obs: &Observed,
    ) -> Result<Option<usize>> {
        let started = Instant::now();
        let dirty = k.take_dirty();
        if let Some(inc) = self.incremental.as_mut().filter(|_| !dirty.all) {
            self.last = StepStats {
                rebuilt: Some(dirty.services.len()),
                ..Default::default()
            };
            if !dirty.services.is_empty() {
                let (map_work, writes) =
                    sync_services(cfg, k, &dirty.services, inc, programmer, maps, obs)?;
                self.last.map_work = map_work;
                self.last.writes = writes;
            }
            self.last.total = started.elapsed();
            return Ok(Some(dirty.services.len()));
        }
        let objs = k.objects();
        self.incremental = None;
        let r = sync(cfg, &objs, Vec::new(), programmer, maps, obs)?;
        self.last = StepStats {
            rebuilt: None,
            map_work: r.apply_took,
            total: started.elapsed(),
            writes: r.stats.writes,
        };
        let mut problems: BTreeMap<String, usize> = BTreeMap::new();
        for p in &r.problems {
            *problems
                .entry(model::service_of(&p.object).unwrap_or_default().to_string())
                .or_insert(0) += 1;
        }
        self.incremental = Some(Incremental {
            health_checks: r.health_checks,
            skipped: r.skipped,
            problems,
            by_service: model::ByService::new(r.claims),
            reports: r
                .reports
                .into_iter()
                .map(|r| (r.service.clone(), r))
                .collect(),
        });
        Ok(None)
    }
}

/// The frontends and the report of each Service.
#[derive(Default)]
struct Incremental {
    by_service: model::ByService,
    /// Skipped Services, with why; problems by Service (`""`: of no Service).
    skipped: BTreeMap<String, String>,
    problems: BTreeMap<String, usize>,
    reports: BTreeMap<String, model::ServiceReport>,
    /// healthCheckNodePort → (Service, this node's ready endpoints).
    health_checks: BTreeMap<u16, (String, usize)>,
}

/// Rebuilds and programs only these Services (`namespace/name`) from the stores.
fn sync_services(
    cfg: &Config,
    k: &KubeSource,
    services: &std::collections::BTreeSet<String>,
    inc: &mut Incremental,
    programmer: &mut Programmer,
    maps: &mut dyn crate::maps::MapWriter,
    obs: &Observed,
) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let mut changed = crate::program::Desired::new();
    let mut removed = Vec::new();
    let mut slices = Vec::new();
    for svc in services {
        let objs = k.objects_of(svc);
        let mut m = model::build(&objs, &node_context(cfg, &objs));
        log_model(&m.problems, &m.skipped);
        inc.skipped.remove(svc);
        for s in &m.skipped {
            inc.skipped.insert(s.service.clone(), s.reason.clone());
        }
        inc.problems.insert(svc.clone(), m.problems.len());
        inc.health_checks.retain(|_, (s, _)| s != svc);
        inc.health_checks.extend(m.health_checks.clone());
        inc.reports.remove(svc);
        for r in m.reports(&[]) {
            inc.reports.insert(r.service.clone(), r);
        }
        let (c, r, lost) = inc.by_service.replace(svc, m.claims.remove(svc));
        if let Some(report) = inc.reports.get_mut(svc).filter(|_| !lost.is_empty()) {
            for (fe, holder) in &lost {
                report.frontends.retain(|f| *f != fe.to_string());
                report.problems.push(format!(
                    "{fe} is also a frontend of Service {holder}, which is older and keeps it"
                ));
            }
            report.state = if report.frontends.is_empty() {
                "not programmed"
            } else {
                "partly programmed"
            }
            .into();
        }
        for (fe, holder) in lost {
            warn!(service = %svc, frontend = %fe, held_by = %holder, "frontend claimed by an older Service");
        }
        changed.extend(c);
        removed.extend(r);
        slices.extend(objs.slices);
    }
    let applying = Instant::now();
    let st = programmer.apply_changes(&changed, &removed, maps);
    let map_work = applying.elapsed();
    for e in &st.errors {
        warn!("{e}");
    }
    for (name, e) in &st.failed {
        if let Some(r) = inc.reports.get_mut(model::service_of_port(name)) {
            r.problems.push(e.clone());
            r.state = "partly programmed".into();
        }
    }
    let took = started.elapsed();
    info!(
        services = services.len(),
        changed = st.services_changed,
        removed = st.services_removed,
        backends_added = st.backends_added,
        backends_removed = st.backends_removed,
        udp_flows_purged = st.flows_purged,
        writes = st.writes,
        took_us = took.as_micros() as u64,
        "programmed (incremental)"
    );
    let now = SystemTime::now();
    obs.metrics.observe_some(&slices, now);
    set_object_metrics(obs, &inc.skipped, inc.problems.values().sum());
    record_sync(took, programmer, obs, now);
    if let Some(f) = &cfg.state_file {
        let all: Vec<&model::ServiceReport> = inc.reports.values().collect();
        write_atomically(f, &serde_json::to_vec_pretty(&all)?)?;
    }
    Ok((map_work, st.writes))
}

/// Replaces `path` with `data` through a temporary file and a rename: readers see the old or
/// the new content, never half of it.
fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).with_context(|| format!("write {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// Reads the source file and programs it.
fn sync_file(
    cfg: &Config,
    path: &Path,
    programmer: &mut Programmer,
    maps: &mut AyaMaps,
    obs: &Observed,
    dns: Option<&crate::dns::ZoneFeed>,
) -> Result<Synced> {
    let text =
        fs::read_to_string(path).with_context(|| format!("read source {}", path.display()))?;
    let (objs, problems) = model::parse_stream(&text).map_err(|p| {
        anyhow::anyhow!(
            "source {}: {p}; nothing of it applied, what is programmed stays",
            path.display()
        )
    })?;
    if let Some(feed) = dns {
        let snapshot = objs.clone();
        feed.rebuild(Box::new(move || snapshot));
    }
    sync(cfg, &objs, problems, programmer, maps, obs)
}

/// A client from this kubeconfig, else from the pod's service account (in-cluster), else from
/// `KUBECONFIG` or `~/.kube/config`.
async fn kube_client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("read kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .with_context(|| format!("use kubeconfig {}", p.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("find the Kubernetes API: no in-cluster config and no kubeconfig")?,
    };
    kube::Client::try_from(config).context("build the Kubernetes client")
}

/// Writes the podCIDRs file weir-cni reads, atomically, when its content changes.
fn write_pod_cidrs(path: &Path, pod_cidrs: Vec<String>) -> Result<()> {
    let text = serde_json::to_string(&weir_cni::config::PodCidrs { pod_cidrs })?;
    if fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    write_atomically(path, text.as_bytes())?;
    info!(file = %path.display(), pod_cidrs = %text, "wrote the node's podCIDRs");
    Ok(())
}

/// How often the agent looks at its devices and its source.
const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How often the conntrack gauges are counted: a walk of both maps, read in batches (up to
/// 2 × `MAX_CT` entries), on a thread of its own.
const CT_GAUGE_INTERVAL: Duration = Duration::from_secs(15);

/// Keeps `weir_map_entries` / `weir_map_capacity` of the conntrack maps (`conntrack_ipv4`,
/// `conntrack_ipv6`) up to date: a full map evicts its least recently used flows, which is
/// what an operator wants to see coming. The first count is made before this returns, so the
/// gauges are there from the first scrape.
fn start_conntrack_gauges(maps_dir: PathBuf, obs: Arc<Observed>) -> Result<()> {
    let ct = crate::maps::Conntrack::open(&maps_dir)?;
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

/// How long a renewal of the node-local DNS lease lasts: an agent that dies takes its node's
/// DNS traffic with it for at most this long.
const NODE_LOCAL_LEASE: Duration = Duration::from_secs(2);

/// The pod devices the agent has attached `tc_from_pod` to, by (name, index).
type Attached = BTreeSet<(String, u32)>;

/// Attaches `tc_from_pod` to a pod device, found by polling or named by weir-cni.
fn attach_pod(
    dp: &mut Datapath,
    attached: &mut Attached,
    dev: (String, u32),
    by: &str,
) -> Result<()> {
    let started = Instant::now();
    dp.attach_pod_tc(&dev.0)
        .with_context(|| format!("attach the pod programs to {}", dev.0))?;
    let took_us = started.elapsed().as_micros() as u64;
    // With either setting of pod programs, translated packets to the pod are handed straight
    // into it (unless --host-routing kernel, where this records nothing).
    if let Err(e) = dp.add_pod_dev(&dev.0, dev.1) {
        warn!(dev = %dev.0, "packets to this pod take the node's stack: {e:#}");
    }
    if dp.pod_programs() == PodPrograms::None {
        info!(dev = %dev.0, index = dev.1, by, took_us, "pod veth without programs (socket LB)");
    } else {
        info!(dev = %dev.0, index = dev.1, by, took_us, "attached tc_from_pod");
    }
    attached.insert(dev);
    Ok(())
}

/// Forgets the pod veths the agent had attached that `gone` says are gone (two map calls
/// each: this is on weir-cni's DEL).
fn forget_pod_devs(
    dp: &mut Datapath,
    attached: &mut Attached,
    gone: impl Fn(&(String, u32)) -> bool,
) {
    for dev in attached.iter().filter(|d| gone(d)) {
        if let Err(e) = dp.forget_pod_dev(dev.1) {
            warn!(dev = %dev.0, "{e:#}");
        }
    }
    attached.retain(|d| !gone(d));
}

/// Answers one request of weir-cni (see `weir_cni::agent`).
fn answer(req: Request, dp: &mut Datapath, attached: &mut Attached, ready: bool) -> Reply {
    match req {
        Request::Ping if ready => Reply::ok(),
        Request::Ping => Reply::err("the first sync is not programmed yet"),
        Request::Attach { ifname, ifindex } => {
            let dev = (ifname.clone(), ifindex);
            if !interfaces().contains(&dev) {
                return Reply::err(format!("no device {ifname} with index {ifindex}"));
            }
            if attached.contains(&dev) {
                return Reply::ok();
            }
            match attach_pod(dp, attached, dev, "weir-cni") {
                Ok(()) => Reply::ok(),
                Err(e) => Reply::err(format!("{e:#}")),
            }
        }
        Request::Check { ifname, ifindex } => {
            if !interfaces().contains(&(ifname.clone(), ifindex)) {
                return Reply::err(format!("no device {ifname} with index {ifindex}"));
            }
            match dp.pod_tc_attached(&ifname) {
                Ok(true) => Reply::ok(),
                Ok(false) if dp.pod_programs() == PodPrograms::None => Reply::err(format!(
                    "tc_from_pod or tc_to_pod of an earlier run is still on {ifname} (index {ifindex}); this agent puts none on pod veths"
                )),
                Ok(false) => Reply::err(format!(
                    "this agent's tc_from_pod and tc_to_pod do not both run on {ifname} (index {ifindex})"
                )),
                Err(e) => Reply::err(format!("{e:#}")),
            }
        }
        Request::Detach { ifname } => {
            // weir-cni deletes the device before it says so: its pin is one of a device that
            // is gone, which prune releases.
            forget_pod_devs(dp, attached, |(n, _)| *n == ifname);
            if let Err(e) = dp.pins().prune_tc() {
                warn!("prune links: {e:#}");
            }
            Reply::ok()
        }
    }
}

async fn serve_one(
    stream: tokio::net::UnixStream,
    dp: &mut Datapath,
    attached: &mut Attached,
    ready: bool,
) -> Result<()> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let mut s = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_line(&mut line))
        .await
        .context("weir-cni request timed out")??;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(req) => answer(req, dp, attached, ready),
        Err(e) => Reply::err(format!("bad request {line:?}: {e}")),
    };
    let mut out = serde_json::to_string(&reply)?;
    out.push('\n');
    s.get_mut().write_all(out.as_bytes()).await?;
    Ok(())
}

fn listen(path: &Path) -> Result<tokio::net::UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // A socket left by an earlier agent: nobody answers on it any more.
    let _ = fs::remove_file(path);
    tokio::net::UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))
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
    let mut maps = AyaMaps::open(&dp.pins().maps())?;
    let mut programmer = Programmer::adopt(&maps)?;
    // Connected UDP sockets exist only where the hooks balance sockets.
    let terminator = match &cfg.cgroup {
        Some(_) => Some(crate::sockterm::Terminator::start(
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
    // Pod devices by (name, index): one re-created under an old name is a new device.
    let mut attached = Attached::new();
    let listener = match &cfg.cni_socket {
        Some(p) => Some(listen(p)?),
        None => None,
    };
    let mut last = None;
    let kube = match &cfg.source {
        Source::Kube { kubeconfig } => {
            let client = kube_client(kubeconfig.as_deref()).await?;
            info!("watching the Kubernetes API");
            // DNS serves headless Services too, whose slices kube-proxy's selector leaves out.
            let selector = if cfg.dns.is_some() {
                None
            } else {
                Some(crate::kube_source::PROXY_LABEL_SELECTOR)
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
    // A change arrived that is not programmed yet.
    let mut kube_dirty = true;
    let mut kube_sync = KubeSync::default();
    let obs = Arc::new(Observed {
        health: Health::new(cfg.health_timeout),
        metrics: Metrics::new(),
    });
    obs.health.queued(SystemTime::now());
    if let Some(a) = cfg.healthz_bind {
        crate::observe::serve(a, "/healthz and /livez", obs.clone()).await?;
    }
    if let Some(a) = cfg.metrics_bind {
        start_conntrack_gauges(dp.pins().maps(), obs.clone())?;
        crate::observe::serve(a, "/metrics", obs.clone()).await?;
    }
    let mut dns_feed = None;
    let mut last_probe = None;
    // The node-local lease, when this node takes its pods' DNS Service traffic.
    let mut lease = match cfg.dns.as_ref().filter(|o| o.service.is_some()) {
        Some(opts) => Some(crate::dns::Lease::open(&dp.pins().maps(), opts)?),
        None => None,
    };
    let dns = match &cfg.dns {
        Some(opts) => {
            let h = Arc::new(crate::dns::handler(opts)?);
            crate::dns::serve_on_own_thread(opts, h.clone())?;
            obs.metrics.set_dns(h.clone());
            dns_feed = Some(crate::dns::ZoneFeed::start(
                h.clone(),
                opts.clone(),
                obs.clone(),
            )?);
            Some(h)
        }
        None => None,
    };
    let mut health_checks = crate::healthcheck::HealthChecks::default();
    let mut watch_errors = 0;
    let mut ready = false;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // When each present device was first seen. With a CNI socket, a new pod device is left to
    // weir-cni, whose ADD is about to ask for it: the poll attaches only devices nobody asked
    // for within a poll interval (made without the plugin). Without a socket, and on the first
    // poll (devices made while the agent was away), it attaches at once.
    let mut first_seen: BTreeMap<(String, u32), Instant> = BTreeMap::new();
    let mut first_poll = true;
    loop {
        let present = interfaces();
        first_seen.retain(|dev, _| present.contains(dev));
        for dev in &present {
            first_seen.entry(dev.clone()).or_insert_with(Instant::now);
        }
        if attached.iter().any(|dev| !present.contains(dev)) {
            forget_pod_devs(&mut dp, &mut attached, |dev| !present.contains(dev));
            match dp.pins().prune_tc() {
                Ok(gone) => {
                    for pin in gone {
                        info!(pin = %pin.display(), "released the link of a device that is gone");
                    }
                }
                Err(e) => warn!("prune links: {e:#}"),
            }
        }
        for dev in &present {
            let ifname = &dev.0;
            let settled = listener.is_none()
                || first_poll
                || first_seen
                    .get(dev)
                    .is_some_and(|t| t.elapsed() >= POLL_INTERVAL);
            if settled
                && !attached.contains(dev)
                && cfg
                    .pod_if_prefixes
                    .iter()
                    .any(|p| ifname.starts_with(p.as_str()))
            {
                if let Err(e) = attach_pod(&mut dp, &mut attached, dev.clone(), "poll") {
                    warn!(dev = %ifname, "{e:#}");
                }
            }
        }
        if first_poll {
            // The pod devices are all attached again: what an earlier run recorded of others
            // is of devices gone while no agent ran.
            let keep = match dp.host_routing() {
                HostRouting::Bpf => attached.iter().map(|(_, index)| *index).collect(),
                HostRouting::Kernel => Default::default(),
            };
            if let Err(e) = dp.retain_pod_devs(&keep) {
                warn!("{e:#}");
            }
            // Every program of an earlier run is replaced now: the flows it tracked since
            // the load in an earlier conntrack layout are copied too, and those maps go.
            match dp.finish_ct_migration() {
                Ok(0) => {}
                Ok(n) => info!(flows = n, "conntrack entries of an earlier layout copied"),
                Err(e) => warn!("{e:#}"),
            }
        }
        first_poll = false;
        let synced = match (&cfg.source, &kube) {
            (Source::File(path), _) => {
                let now = stamp(path);
                let due = now != last;
                if due {
                    obs.health.queued(SystemTime::now());
                    // Tried once per version of the file: a broken one is reported once, and
                    // stays pending (so /healthz fails after the health timeout) until fixed.
                    last = now;
                    match sync_file(
                        &cfg,
                        path,
                        &mut programmer,
                        &mut maps,
                        &obs,
                        dns_feed.as_ref(),
                    ) {
                        Ok(r) => health_checks.serve(&r.health_checks),
                        Err(e) => warn!("{e:#}"),
                    }
                }
                due
            }
            (Source::Kube { .. }, Some(k)) if kube_dirty && k.progress.synced() => {
                kube_dirty = false;
                if let Err(e) = kube_sync.step(&cfg, k, &mut programmer, &mut maps, &obs) {
                    warn!("{e:#}");
                }
                health_checks.serve(&kube_sync.health_checks());
                // The zone from the same stores, rebuilt on the DNS thread.
                if let Some(feed) = &dns_feed {
                    let k = k.clone();
                    feed.rebuild(Box::new(move || k.objects()));
                }
                true
            }
            _ => false,
        };
        let gone = programmer.take_udp_backends_gone();
        if let Some(t) = &terminator {
            t.submit(gone);
        }
        if synced && !ready {
            ready = true;
            if let Some(f) = &cfg.ready_file {
                fs::write(f, b"ready\n").with_context(|| format!("write {}", f.display()))?;
            }
        }
        if let Some(k) = &kube {
            let e = k.progress.errors.load(std::sync::atomic::Ordering::Relaxed);
            obs.metrics.watch_errors.inc_by(e - watch_errors);
            watch_errors = e;
        }
        // The node-local DNS lease, renewed while the server answers a query of its own; at
        // most once a poll interval (a burst of CNI requests loops faster).
        if let (Some(h), Some(opts), Some(lease)) = (&dns, &cfg.dns, lease.as_mut()) {
            if h.ready() && last_probe.is_none_or(|t: Instant| t.elapsed() >= POLL_INTERVAL) {
                last_probe = Some(Instant::now());
                if crate::dns::probe(opts).await {
                    if let Err(e) = lease.renew(NODE_LOCAL_LEASE) {
                        warn!("DNS lease: {e:#}");
                    }
                } else {
                    warn!("DNS: the node's server does not answer; its lease is not renewed");
                }
            }
        }
        if cfg.once && ready {
            return Ok(());
        }
        let changed = async {
            match &kube {
                Some(k) => k.progress.changed.notified().await,
                None => std::future::pending().await,
            }
        };
        let accept = async {
            match &listener {
                Some(l) => l.accept().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            conn = accept => {
                match conn {
                    Ok((stream, _)) => {
                        if let Err(e) = serve_one(stream, &mut dp, &mut attached, ready).await {
                            warn!("weir-cni socket: {e:#}");
                        }
                    }
                    Err(e) => warn!("weir-cni socket: accept: {e}"),
                }
                // Serve the next request before the next poll: ADDs come in bursts.
                continue;
            }
            _ = changed => {
                kube_dirty = true;
                obs.health.queued(SystemTime::now());
            }
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
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

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_cgroup_v2_root_has_no_type() {
        let Ok(root) = crate::topo::cgroup2_root() else {
            return; // no cgroup v2 here: nothing to tell apart
        };
        assert!(super::is_cgroup_root(&root), "{}", root.display());
        let child = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .find(|e| e.path().join("cgroup.procs").exists());
        if let Some(c) = child {
            assert!(!super::is_cgroup_root(&c.path()), "{}", c.path().display());
        }
        assert!(!super::is_cgroup_root(std::path::Path::new("/nonexistent")));
    }
}
