//! The agent's Prometheus metrics, served on `/metrics`. `kubeproxy_network_programming_
//! duration_seconds` is kube-proxy's: from an EndpointSlice's
//! `endpoints.kubernetes.io/last-change-trigger-time` to the end of the sync that programmed
//! it; `kubeproxy_sync_proxy_rules_duration_seconds` is the time of each sync; weir adds the
//! objects not programmed by reason and the fill of its maps.
use std::{collections::BTreeMap, sync::Mutex, time::SystemTime};

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

use crate::model::Objects;

/// The annotation the EndpointSlice controller sets to when the change that produced the
/// slice happened.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

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
    /// Connections an admin server closed at once, being past its limit, by server.
    pub admin_refused: Family<Labels, Counter>,
    /// Versions of the file source refused (empty, not YAML) or not yet readable.
    pub source_refused: Family<Labels, Counter>,
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
            admin_refused: Family::default(),
            source_refused: Family::default(),
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
            "weir_admin_connections_refused",
            "Connections to /healthz, /metrics or a healthCheckNodePort closed at once for being past the server's limit",
            m.admin_refused.clone(),
        );
        registry.register(
            "weir_source_refused",
            "Versions of the file source not applied, by reason (empty, invalid)",
            m.source_refused.clone(),
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
    pub fn observe_some(&self, slices: &[std::sync::Arc<crate::model::Slice>], now: SystemTime) {
        self.observe(slices, now, false)
    }

    fn observe(&self, slices: &[std::sync::Arc<crate::model::Slice>], now: SystemTime, all: bool) {
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

    /// The counter of file-source versions not applied for `reason`.
    pub fn source_refused(&self, reason: &str) -> Counter {
        self.source_refused
            .get_or_create(&vec![("reason".to_string(), reason.to_string())])
            .clone()
    }

    /// The counter of connections `server` refuses (see `admin::server`).
    pub fn admin_refused(&self, server: &str) -> Counter {
        self.admin_refused
            .get_or_create(&vec![("server".to_string(), server.to_string())])
            .clone()
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
    slices: &[std::sync::Arc<crate::model::Slice>],
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

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
