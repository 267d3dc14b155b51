//! Health and metrics, as kube-proxy serves them.
//!
//! - `/healthz` and `/livez` (default `0.0.0.0:10256`): kube-proxy's `ProxierHealthServer`.
//!   Healthy unless a change has waited longer than the health timeout without being
//!   programmed; `/healthz` is also unhealthy while this node is being deleted (a deletion
//!   timestamp, or the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint), so load
//!   balancers stop sending to it. 200 or 503 with kube-proxy's JSON body.
//! - `/metrics` (default `127.0.0.1:10249`): Prometheus text. `kubeproxy_network_programming_
//!   duration_seconds` is kube-proxy's: from an EndpointSlice's
//!   `endpoints.kubernetes.io/last-change-trigger-time` to the end of the sync that programmed
//!   it; `kubeproxy_sync_proxy_rules_duration_seconds` is the time of each sync; weir adds the
//!   objects not programmed by reason and the fill of its maps.
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{exponential_buckets, linear_buckets, Histogram},
    },
    registry::Registry,
};
use tracing::{info, warn};

use crate::model::Objects;

/// The annotation the EndpointSlice controller sets to when the change that produced the
/// slice happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
const AUTOSCALER_DELETE_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

#[derive(Debug, Default)]
struct HealthState {
    last_updated: Option<SystemTime>,
    oldest_pending: Option<SystemTime>,
    node_eligible: bool,
}

/// kube-proxy's proxier health: queued changes against programmed ones.
#[derive(Debug)]
pub struct Health {
    state: Mutex<HealthState>,
    timeout: Duration,
}

impl Health {
    /// `timeout`: how long a change may wait to be programmed (kube-proxy: twice its sync
    /// period, 60 s by default).
    pub fn new(timeout: Duration) -> Self {
        Health {
            state: Mutex::new(HealthState {
                node_eligible: true,
                ..Default::default()
            }),
            timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change arrived that is not programmed yet.
    pub fn queued(&self, now: SystemTime) {
        let mut s = self.lock();
        s.oldest_pending.get_or_insert(now);
    }

    /// Everything queued so far is programmed.
    pub fn updated(&self, now: SystemTime) {
        let mut s = self.lock();
        s.last_updated = Some(now);
        s.oldest_pending = None;
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    /// (healthy, last update, node eligible) at `now`.
    pub fn check(&self, now: SystemTime) -> (bool, Option<SystemTime>, bool) {
        let s = self.lock();
        let late = s
            .oldest_pending
            .is_some_and(|t| now.duration_since(t).unwrap_or_default() >= self.timeout);
        (!late, s.last_updated, s.node_eligible)
    }
}

/// Whether kube-proxy would call this node eligible for traffic: not being deleted.
pub fn node_eligible(objs: &Objects, node: &str) -> bool {
    let Some(n) = objs
        .nodes
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some(node))
    else {
        return true;
    };
    let tainted = n
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|t| t.iter().any(|t| t.key == AUTOSCALER_DELETE_TAINT));
    n.metadata.deletion_timestamp.is_none() && !tainted
}

fn rfc3339(t: Option<SystemTime>) -> String {
    use k8s_openapi::jiff::Timestamp;
    match t.and_then(|t| Timestamp::try_from(t).ok()) {
        Some(ts) => ts.to_string(),
        None => "0001-01-01T00:00:00Z".into(),
    }
}

/// The body and status of `/healthz` (with the node's eligibility) or `/livez` (without).
pub fn health_response(h: &Health, with_node: bool, now: SystemTime) -> (StatusCode, String) {
    let (healthy, last, eligible) = h.check(now);
    let healthy = healthy && (eligible || !with_node);
    // kube-proxy reports "now" as the last update while healthy, as its older releases did.
    let last = if healthy { Some(now) } else { last };
    let body = if with_node {
        format!(
            "{{\"lastUpdated\": {:?},\"currentTime\": {:?}, \"nodeEligible\": {eligible}}}",
            rfc3339(last),
            rfc3339(Some(now))
        )
    } else {
        format!(
            "{{\"lastUpdated\": {:?},\"currentTime\": {:?}}}",
            rfc3339(last),
            rfc3339(Some(now))
        )
    };
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

type Labels = Vec<(String, String)>;

/// The agent's metrics.
pub struct Metrics {
    registry: Registry,
    pub network_programming: Histogram,
    pub sync_duration: Histogram,
    pub last_sync: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub skipped: Family<Labels, Gauge>,
    pub problems: Gauge,
    pub map_entries: Family<Labels, Gauge>,
    pub map_capacity: Family<Labels, Gauge>,
    pub watch_errors: Counter,
    pub healthz: Family<Labels, Counter>,
    /// From an EndpointSlice change to the DNS zone that answers it.
    pub dns_programming: Histogram,
    /// The trigger time last seen per EndpointSlice (namespace/name), by the data path and
    /// by DNS.
    seen: Mutex<BTreeMap<String, String>>,
    dns_seen: Mutex<BTreeMap<String, String>>,
    /// The embedded DNS server, whose counters `/metrics` shows.
    dns: std::sync::OnceLock<std::sync::Arc<weir_dns::Handler>>,
    started: SystemTime,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        // kube-proxy's buckets: 0.25 s steps to 0.5 s, 1 s steps to 59 s, 5 s to 115 s, 30 s
        // steps to 300 s.
        let buckets: Vec<f64> = linear_buckets(0.25, 0.25, 2)
            .chain(linear_buckets(1.0, 1.0, 59))
            .chain(linear_buckets(60.0, 5.0, 12))
            .chain(linear_buckets(120.0, 30.0, 7))
            .collect();
        let m = Metrics {
            network_programming: Histogram::new(buckets),
            sync_duration: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            last_sync: Gauge::default(),
            skipped: Family::default(),
            problems: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            watch_errors: Counter::default(),
            healthz: Family::default(),
            dns_programming: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            seen: Mutex::new(BTreeMap::new()),
            dns_seen: Mutex::new(BTreeMap::new()),
            dns: std::sync::OnceLock::new(),
            started: SystemTime::now(),
            registry: Registry::default(),
        };
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice change (its last-change-trigger-time) to the end of the sync that programmed it",
            m.network_programming.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "Time of one sync: model build and map writes",
            m.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the last sync ended (Unix seconds)",
            m.last_sync.clone(),
        );
        registry.register(
            "weir_objects_skipped",
            "Services not programmed, by reason",
            m.skipped.clone(),
        );
        registry.register(
            "weir_object_problems",
            "Objects or parts of objects that could not be used in the last sync",
            m.problems.clone(),
        );
        registry.register(
            "weir_map_entries",
            "Entries the agent keeps in each map",
            m.map_entries.clone(),
        );
        registry.register(
            "weir_map_capacity",
            "Maximum entries of each map",
            m.map_capacity.clone(),
        );
        registry.register(
            "weir_watch_errors",
            "Failed lists and broken watches of the Kubernetes API",
            m.watch_errors.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Answers of /healthz by HTTP code",
            m.healthz.clone(),
        );
        registry.register(
            "weir_dns_programming_duration_seconds",
            "From an EndpointSlice change (its last-change-trigger-time) to the DNS zone that answers it",
            m.dns_programming.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Records, after a sync that ended at `now`, how long each EndpointSlice change it
    /// programmed took from its trigger time. Trigger times from before the agent started are
    /// not counted (kube-proxy skips them too): they measure the agent's absence.
    pub fn observe_programmed(&self, objs: &Objects, now: SystemTime) {
        self.observe(&objs.slices, now, true)
    }

    /// The same for a DNS zone built from `objs` at `now`.
    pub fn observe_dns(&self, objs: &Objects, now: SystemTime) {
        let mut seen = self.dns_seen.lock().unwrap_or_else(|p| p.into_inner());
        observe_into(
            &objs.slices,
            now,
            self.started,
            &mut seen,
            true,
            &self.dns_programming,
        );
    }

    /// Shows the counters of this DNS server in `/metrics`.
    pub fn set_dns(&self, h: std::sync::Arc<weir_dns::Handler>) {
        let _ = self.dns.set(h);
    }

    /// The same for some slices only (an incremental sync): the others are left as seen.
    pub fn observe_some(
        &self,
        slices: &[std::sync::Arc<k8s_openapi::api::discovery::v1::EndpointSlice>],
        now: SystemTime,
    ) {
        self.observe(slices, now, false)
    }

    fn observe(
        &self,
        slices: &[std::sync::Arc<k8s_openapi::api::discovery::v1::EndpointSlice>],
        now: SystemTime,
        all: bool,
    ) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        observe_into(
            slices,
            now,
            self.started,
            &mut seen,
            all,
            &self.network_programming,
        );
    }

    /// Replaces the skipped-by-reason gauges with this sync's counts.
    pub fn set_skipped(&self, reasons: &BTreeMap<String, i64>) {
        self.skipped.clear();
        for (r, n) in reasons {
            self.skipped
                .get_or_create(&vec![("reason".into(), r.clone())])
                .set(*n);
        }
    }

    pub fn set_map(&self, map: &str, entries: i64, capacity: i64) {
        let l = vec![("map".to_string(), map.to_string())];
        self.map_entries.get_or_create(&l).set(entries);
        self.map_capacity.get_or_create(&l).set(capacity);
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        if let Some(h) = self.dns.get() {
            // Before the OpenMetrics end marker.
            let dns = h.stats.render();
            match out.rfind("# EOF") {
                Some(i) => out.insert_str(i, &dns),
                None => out.push_str(&dns),
            }
        }
        out
    }
}

/// Observes in `hist`, for each slice whose trigger time is new to `seen`, the time from it to
/// `now`; trigger times from before `started` are not counted (they measure the agent's
/// absence). `all`: `slices` are every slice (the others are forgotten).
fn observe_into(
    slices: &[std::sync::Arc<k8s_openapi::api::discovery::v1::EndpointSlice>],
    now: SystemTime,
    started: SystemTime,
    seen: &mut BTreeMap<String, String>,
    all: bool,
    hist: &Histogram,
) {
    let mut next = if all { BTreeMap::new() } else { seen.clone() };
    for s in slices {
        let Some(t) = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
        else {
            continue;
        };
        let key = format!(
            "{}/{}",
            s.metadata.namespace.as_deref().unwrap_or_default(),
            s.metadata.name.as_deref().unwrap_or_default()
        );
        if seen.get(&key) != Some(t) {
            if let Ok(ts) = t.parse::<k8s_openapi::jiff::Timestamp>() {
                let at = SystemTime::from(ts);
                if at >= started {
                    let d = now.duration_since(at).unwrap_or_default();
                    hist.observe(d.as_secs_f64());
                }
            }
        }
        next.insert(key, t.clone());
    }
    *seen = next;
}

/// What the HTTP servers answer from.
pub struct Observed {
    pub health: Health,
    pub metrics: Metrics,
}

fn respond(code: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r.headers_mut().insert(
        "X-Content-Type-Options",
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

fn route(o: &Observed, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let now = SystemTime::now();
    match req.uri().path() {
        p @ ("/healthz" | "/livez") => {
            let (code, body) = health_response(&o.health, p == "/healthz", now);
            if p == "/healthz" {
                o.metrics
                    .healthz
                    .get_or_create(&vec![("code".into(), code.as_u16().to_string())])
                    .inc();
            }
            respond(code, "application/json", body)
        }
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            o.metrics.render(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves `/healthz`, `/livez` and `/metrics` on `addr` until the runtime stops. Binds now,
/// so that a port already taken is an error at start.
pub async fn serve(addr: SocketAddr, what: &'static str, o: Arc<Observed>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen for {what} on {addr}"))?;
    info!(%addr, "serving {what}");
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("{what}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let o = o.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let r = route(&o, &req);
                    async move { Ok::<_, std::convert::Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_follows_kube_proxy() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let h = Health::new(Duration::from_secs(60));
        // Starting: nothing queued, healthy.
        assert_eq!(health_response(&h, true, t0).0, StatusCode::OK);
        h.queued(t0);
        // A queued change that is not late yet.
        assert_eq!(
            health_response(&h, true, t0 + Duration::from_secs(59)).0,
            StatusCode::OK
        );
        // Late: unhealthy, and it says when the last update was.
        let (code, body) = health_response(&h, true, t0 + Duration::from_secs(60));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            body,
            "{\"lastUpdated\": \"0001-01-01T00:00:00Z\",\"currentTime\": \"2027-01-15T08:01:00Z\", \"nodeEligible\": true}"
        );
        h.updated(t0 + Duration::from_secs(61));
        assert_eq!(
            health_response(&h, true, t0 + Duration::from_secs(62)).0,
            StatusCode::OK
        );
        // The node is being deleted: /healthz fails, /livez does not.
        h.set_node_eligible(false);
        let now = t0 + Duration::from_secs(63);
        let (code, body) = health_response(&h, true, now);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.ends_with("\"nodeEligible\": false}"), "{body}");
        let (code, body) = health_response(&h, false, now);
        assert_eq!(code, StatusCode::OK);
        assert_eq!(
            body,
            "{\"lastUpdated\": \"2027-01-15T08:01:03Z\",\"currentTime\": \"2027-01-15T08:01:03Z\"}"
        );
    }

    #[test]
    fn a_node_being_deleted_is_not_eligible() {
        let yaml =
            |extra: &str| format!("apiVersion: v1\nkind: Node\nmetadata: {{name: n1{extra}}}\n");
        let (objs, _) = crate::model::parse_yaml(&yaml(""));
        assert!(node_eligible(&objs, "n1"));
        let (objs, _) =
            crate::model::parse_yaml(&yaml(", deletionTimestamp: \"2026-11-25T00:00:00Z\""));
        assert!(!node_eligible(&objs, "n1"));
        let (objs, _) = crate::model::parse_yaml(
            "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\nspec: {taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]}\n",
        );
        assert!(!node_eligible(&objs, "n1"));
    }

    #[test]
    fn network_programming_counts_each_trigger_time_once_and_not_before_start() {
        let m = Metrics::new();
        let at = |t: SystemTime| {
            k8s_openapi::jiff::Timestamp::try_from(t)
                .unwrap()
                .to_string()
        };
        let slice = |name: &str, t: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
                 metadata: {{name: {name}, namespace: d, annotations: {{{TRIGGER_TIME_ANNOTATION}: \"{t}\"}}}}\n"
            )
        };
        let start = m.started;
        let old = at(start - Duration::from_secs(3600));
        let new = at(start + Duration::from_millis(10));
        let text = format!("{}---\n{}", slice("a", &old), slice("b", &new));
        let (objs, p) = crate::model::parse_yaml(&text);
        assert!(p.is_empty(), "{p:?}");
        m.observe_programmed(&objs, start + Duration::from_millis(510));
        m.observe_programmed(&objs, start + Duration::from_millis(900));
        let out = m.render();
        assert!(
            out.contains("kubeproxy_network_programming_duration_seconds_count 1\n"),
            "{out}"
        );
        assert!(
            out.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"0.5\"} 1\n"),
            "{out}"
        );
    }
}
