//! From the source's objects to the programmed data path: a full sync at the start, after a
//! relist, a Node change or an edit of the file source; otherwise only the Services the watch
//! events touched, rebuilt from the stores and written as changes. Each sync also writes this
//! node's podCIDRs for weir-cni and the per-Service report `weir status` reads, and records
//! itself for `/healthz` and `/metrics`.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime},
};

use crate::error::{Context, Result};
use tracing::{info, warn};

use super::KubeSource;
use crate::{
    admin::Observed,
    datapath::{ApplyStats, MapWriter, Programmer},
    model::{self, Objects},
};

/// What one sync did.
#[derive(Debug, Default)]
pub struct Synced {
    pub stats: ApplyStats,
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
    objs: &Objects,
    mut problems: Vec<model::Problem>,
    node: &model::NodeContext,
    programmer: &mut Programmer,
    w: &mut dyn MapWriter,
) -> Synced {
    let started = Instant::now();
    let m = model::build(objs, node);
    // The source's own problems (objects not read) come first; the model's follow.
    let unread = problems.len();
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
    let mut reports = m.reports(&st.failed());
    model::add_unread(&mut reports, &problems[..unread]);
    Synced {
        reports,
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

/// Where a node's syncs go besides the maps, and what a Kubernetes source's last sync left for
/// the next one.
#[derive(Debug, Default)]
pub struct Reconciler {
    /// This node's name: its `spec.podCIDRs` go to `pod_cidrs_file` for weir-cni, its labels
    /// and addresses to the model, its deletion to `/healthz`.
    pub node_name: Option<String>,
    pub pod_cidrs_file: PathBuf,
    /// Where each sync writes, per Service, whether it is programmed and why not.
    pub state_file: Option<PathBuf>,
    /// `namespace/name` of the cluster DNS Service when this node serves DNS itself.
    pub node_local_service: Option<String>,
    /// Every Service's frontends and report, as of the last sync of a Kubernetes source; None
    /// until the first, and after a relist (the next sync is a full one).
    incremental: Option<Incremental>,
    /// What the last [`Reconciler::step`] did.
    pub last: StepStats,
}

/// What one [`Reconciler::step`] did.
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

impl Reconciler {
    pub fn new(
        node_name: Option<String>,
        pod_cidrs_file: PathBuf,
        state_file: Option<PathBuf>,
        node_local_service: Option<String>,
    ) -> Self {
        Reconciler {
            node_name,
            pod_cidrs_file,
            state_file,
            node_local_service,
            incremental: None,
            last: StepStats::default(),
        }
    }

    /// Programs a snapshot of the objects, writes this node's podCIDRs for weir-cni, and
    /// records the sync for health and metrics. What a Kubernetes source's next step rebuilds
    /// incrementally starts from here again.
    pub fn sync_all(
        &mut self,
        objs: &Objects,
        problems: Vec<model::Problem>,
        programmer: &mut Programmer,
        maps: &mut dyn MapWriter,
        obs: &Observed,
    ) -> Result<Synced> {
        self.incremental = None;
        if let Some(node) = &self.node_name {
            match model::pod_cidrs(objs, node) {
                Some(cidrs) => write_pod_cidrs(&self.pod_cidrs_file, cidrs)?,
                None => {
                    warn!(node = %node, "this node is not in the source; no podCIDRs for weir-cni")
                }
            }
            obs.health
                .set_node_eligible(model::node_eligible(objs, node));
        }
        let ctx = node_context(self.node_name.as_deref(), &self.node_local_service, objs);
        let r = program_objects(objs, problems, &ctx, programmer, maps);
        let now = SystemTime::now();
        set_object_metrics(obs, &r.skipped, r.problems.len());
        obs.metrics.observe_programmed(objs, now);
        record_sync(r.took, programmer, obs, now);
        if let Some(f) = &self.state_file {
            write_atomically(f, &serde_json::to_vec_pretty(&r.reports)?)?;
        }
        Ok(r)
    }

    /// healthCheckNodePort → (Service, this node's ready endpoints), as of the last step.
    pub fn health_checks(&self) -> BTreeMap<u16, (String, usize)> {
        self.incremental
            .as_ref()
            .map(|i| i.health_checks.clone())
            .unwrap_or_default()
    }

    /// How many Services the incremental state keeps problems for (none until the first full
    /// sync): only those that have some, so that it does not grow with every Service seen.
    pub fn services_with_problems(&self) -> usize {
        self.incremental.as_ref().map_or(0, |i| i.problems.len())
    }

    /// One sync of what the watches changed since the last; call once every kind is listed.
    /// Returns how many Services were rebuilt alone, or None for a full sync.
    pub fn step(
        &mut self,
        k: &KubeSource,
        programmer: &mut Programmer,
        maps: &mut dyn MapWriter,
        obs: &Observed,
    ) -> Result<Option<usize>> {
        let started = Instant::now();
        let dirty = k.take_dirty();
        if self.incremental.is_some() && !dirty.all {
            self.last = StepStats {
                rebuilt: Some(dirty.services.len()),
                ..Default::default()
            };
            if !dirty.services.is_empty() {
                let (map_work, writes) =
                    self.sync_services(k, &dirty.services, programmer, maps, obs)?;
                self.last.map_work = map_work;
                self.last.writes = writes;
            }
            self.last.total = started.elapsed();
            return Ok(Some(dirty.services.len()));
        }
        let objs = k.objects();
        let r = self.sync_all(&objs, Vec::new(), programmer, maps, obs)?;
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

    /// Rebuilds and programs only these Services (`namespace/name`) from the stores.
    fn sync_services(
        &mut self,
        k: &KubeSource,
        services: &BTreeSet<String>,
        programmer: &mut Programmer,
        maps: &mut dyn MapWriter,
        obs: &Observed,
    ) -> Result<(Duration, usize)> {
        let started = Instant::now();
        let mut changed = model::Desired::new();
        let mut removed = Vec::new();
        let mut slices = Vec::new();
        let (node, local_service) = (self.node_name.as_deref(), &self.node_local_service);
        let Some(inc) = self.incremental.as_mut() else {
            return Ok((Duration::ZERO, 0));
        };
        for svc in services {
            let objs = k.objects_of(svc);
            let mut m = model::build(&objs, &node_context(node, local_service, &objs));
            log_model(&m.problems, &m.skipped);
            inc.skipped.remove(svc);
            for s in &m.skipped {
                inc.skipped.insert(s.service.clone(), s.reason.clone());
            }
            // Only Services with problems are kept: a deleted one leaves nothing behind.
            if m.problems.is_empty() {
                inc.problems.remove(svc);
            } else {
                inc.problems.insert(svc.clone(), m.problems.len());
            }
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
        for (name, e) in &st.failed() {
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
        if let Some(f) = &self.state_file {
            let all: Vec<&model::ServiceReport> = inc.reports.values().collect();
            write_atomically(f, &serde_json::to_vec_pretty(&all)?)?;
        }
        Ok((map_work, st.writes))
    }
}

/// The frontends and the report of each Service.
#[derive(Debug, Default)]
struct Incremental {
    by_service: model::ByService,
    /// Skipped Services, with why; problems by Service (`""`: of no Service).
    skipped: BTreeMap<String, String>,
    problems: BTreeMap<String, usize>,
    reports: BTreeMap<String, model::ServiceReport>,
    /// healthCheckNodePort → (Service, this node's ready endpoints).
    health_checks: BTreeMap<u16, (String, usize)>,
}

/// This node as the model sees it: its Node object, and the DNS Service it serves itself.
fn node_context(
    node: Option<&str>,
    node_local_service: &Option<String>,
    objs: &Objects,
) -> model::NodeContext {
    let mut ctx = model::NodeContext::of(objs, node);
    ctx.node_local_service = node_local_service.clone();
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

/// Writes the podCIDRs file weir-cni reads, atomically, when its content changes.
fn write_pod_cidrs(path: &Path, pod_cidrs: Vec<String>) -> Result<()> {
    let text = serde_json::to_string(&weir_cni_proto::PodCidrs { pod_cidrs })?;
    if fs::read_to_string(path).ok().as_deref() == Some(text.as_str()) {
        return Ok(());
    }
    write_atomically(path, text.as_bytes())?;
    info!(file = %path.display(), pod_cidrs = %text, "wrote the node's podCIDRs");
    Ok(())
}
