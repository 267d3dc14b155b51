//! Loop detection, as CoreDNS's `loop` plugin does it: each upstream is sent a query for a
//! random name; one that comes back to this server means the upstream forwards here, and it is
//! not used while it does.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use hickory_proto::rr::{LowerName, Name, RecordType};
use tracing::{error, info};

use super::{query, random_u64, relay, Handler, UPSTREAM_TIMEOUT};

/// How often an upstream found looping is probed again (it is used again once it stops).
const LOOP_RECHECK: Duration = Duration::from_secs(30);
/// The zone of the loop probes' names (random labels under it; CoreDNS's `loop` does the same).
const LOOP_PROBE_ZONE: &str = "weir-loop-check.";

/// Loop detection: the probe names in flight (each sent to one upstream), and the upstreams
/// whose probe came back to this server.
#[derive(Debug, Default)]
pub(super) struct Loops {
    pub(super) pending: AtomicUsize,
    /// Each probe's upstream, and whether it came back.
    pub(super) probes: Mutex<HashMap<LowerName, (SocketAddr, bool)>>,
    pub(super) looping: Mutex<HashSet<SocketAddr>>,
}

impl Handler {
    /// The upstreams found looping, now.
    pub(super) fn looping(&self) -> Vec<SocketAddr> {
        self.loops
            .looping
            .lock()
            .map(|l| l.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Whether `up` is found looping (a forward skips it).
    pub(super) fn is_looping(&self, up: &SocketAddr) -> bool {
        self.stats.upstreams_looping.load(Ordering::Relaxed) > 0
            && self.loops.looping.lock().is_ok_and(|l| l.contains(up))
    }

    /// Whether `name` is one of our loop probes, back through an upstream: its upstream is
    /// marked looping (and logged, the first time).
    pub(super) fn probe_came_back(&self, name: &LowerName) -> bool {
        if self.loops.pending.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let Some(up) = self.loops.probes.lock().ok().and_then(|mut p| {
            let (up, back) = p.get_mut(name)?;
            *back = true;
            Some(*up)
        }) else {
            return false;
        };
        self.stats.upstream_loops.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.loops.looping.lock() {
            if l.insert(up) {
                self.stats
                    .upstreams_looping
                    .store(l.len() as u64, Ordering::Relaxed);
                error!(
                    upstream = %up,
                    "DNS upstream {up} forwards queries back to this server (a loop): not used \
                     while it does; names it would resolve get SERVFAIL. Check --upstream and \
                     the node's resolv.conf"
                );
            }
        }
        true
    }

    /// Every distinct resolver (upstreams and stub domains').
    pub(super) fn resolvers(&self) -> Vec<SocketAddr> {
        let mut all: Vec<SocketAddr> = self.upstreams.clone();
        for (_, r) in &self.stubs {
            all.extend(r);
        }
        all.sort();
        all.dedup();
        all
    }

    /// Sends each resolver of `which` a query for a name of its own that nobody else asks
    /// (CoreDNS's `loop` plugin does the same): a resolver that forwards it back to this server
    /// is marked looping (see `probe_came_back`); one whose probe does not come back is not,
    /// or no longer.
    pub async fn check_loops(self: &Arc<Self>, which: &[SocketAddr]) {
        let mut probes = tokio::task::JoinSet::new();
        let mut sent = Vec::new();
        for up in which {
            let Ok(name) = Name::from_ascii(format!(
                "{:016x}.{:016x}.{LOOP_PROBE_ZONE}",
                random_u64(),
                random_u64()
            )) else {
                continue;
            };
            if let Ok(mut p) = self.loops.probes.lock() {
                p.insert(LowerName::new(&name), (*up, false));
                self.loops.pending.store(p.len(), Ordering::Relaxed);
            }
            let (up, q) = (*up, query(&name, RecordType::HINFO));
            probes.spawn(async move {
                let _ = tokio::time::timeout(UPSTREAM_TIMEOUT, relay(up, &q)).await;
            });
            sent.push(LowerName::new(&name));
        }
        while probes.join_next().await.is_some() {}
        let mut quiet = Vec::new();
        if let Ok(mut p) = self.loops.probes.lock() {
            for name in &sent {
                if let Some((up, false)) = p.remove(name) {
                    quiet.push(up);
                }
            }
            self.loops.pending.store(p.len(), Ordering::Relaxed);
        }
        if let Ok(mut l) = self.loops.looping.lock() {
            for up in quiet {
                if l.remove(&up) {
                    info!(upstream = %up, "DNS upstream {up} no longer forwards back here: used again");
                }
            }
            self.stats
                .upstreams_looping
                .store(l.len() as u64, Ordering::Relaxed);
        }
    }

    /// Probes every resolver now, then the looping ones every `LOOP_RECHECK`, for ever.
    pub async fn watch_loops(self: Arc<Self>) {
        let all = self.resolvers();
        if all.is_empty() {
            return;
        }
        self.check_loops(&all).await;
        loop {
            tokio::time::sleep(LOOP_RECHECK).await;
            let looping = self.looping();
            if !looping.is_empty() {
                self.check_loops(&looping).await;
            }
        }
    }
}
