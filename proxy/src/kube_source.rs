//! The Kubernetes API as a source: one watch per kind (Services, EndpointSlices, this Node)
//! feeding reflector stores. The stores are the one cache of the agent: the data path is built
//! from their snapshot, and the DNS server reads the same stores.
//!
//! kube-runtime's watcher lists, then watches; on `410 Gone` or a broken watch it lists again
//! (the store swaps to the new list atomically at its end, so objects deleted while the watch
//! was down go away), and API errors are retried with backoff. The agent programs nothing
//! before every kind has been listed once: a partial view would remove what a previous run
//! programmed.
use std::{
    fmt::Debug,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{
        reflector::{self, Store},
        watcher::{self, watcher},
        WatchStreamExt,
    },
    Api, Client, Resource,
};
use serde::de::DeserializeOwned;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::model::{Objects, SERVICE_NAME_LABEL};

/// What the watches have seen, shared with their tasks.
#[derive(Debug, Default)]
pub struct Progress {
    /// A change arrived in any store.
    pub changed: Notify,
    /// Each kind has completed its first list.
    listed: [AtomicBool; 3],
    /// Errors of the watches (failed lists, broken watches, `410 Gone`), all kinds.
    pub errors: AtomicU64,
    /// Events applied to the stores, all kinds.
    pub events: AtomicU64,
    /// What changed since the last [`KubeSource::take_dirty`].
    dirty: std::sync::Mutex<Dirty>,
}

/// What the watches changed: some Services (`namespace/name`, for a Service or one of its
/// EndpointSlices), or everything (a relist, a Node change, the start).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dirty {
    pub all: bool,
    pub services: std::collections::BTreeSet<String>,
}

impl Progress {
    fn mark(&self, key: Option<String>) {
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        match key {
            Some(k) if !d.all => {
                d.services.insert(k);
            }
            Some(_) => {}
            None => {
                d.all = true;
                d.services.clear();
            }
        }
    }
}

impl Progress {
    /// Whether every kind has been listed once.
    pub fn synced(&self) -> bool {
        self.listed.iter().all(|l| l.load(Ordering::Acquire))
    }
}

/// The three stores and their watches' progress.
#[derive(Clone)]
pub struct KubeSource {
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
    pub nodes: Store<Node>,
    pub progress: Arc<Progress>,
}

/// kube-proxy's selector: objects handed to another proxy, and headless services' objects,
/// are not watched at all.
pub const PROXY_LABEL_SELECTOR: &str =
    "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless";

impl KubeSource {
    /// Starts the watches on the current tokio runtime. `node` is this node's name: only its
    /// Node object is watched. Services and EndpointSlices are watched with kube-proxy's label
    /// selector.
    pub fn start(client: Client, node: Option<&str>) -> KubeSource {
        Self::start_with(client, node, Some(PROXY_LABEL_SELECTOR))
    }

    /// The same with this label selector, or none: cluster DNS needs every Service and slice,
    /// headless ones included (the model skips what the data path must not program).
    pub fn start_with(client: Client, node: Option<&str>, selector: Option<&str>) -> KubeSource {
        let progress = Arc::new(Progress::default());
        progress.mark(None);
        let (services, w) = reflector::store();
        let cfg = match selector {
            Some(s) => watcher::Config::default().labels(s),
            None => watcher::Config::default(),
        };
        let svc_key = |s: &Service| Some(key(&s.metadata, s.metadata.name.as_deref()));
        spawn_watch(
            Api::<Service>::all(client.clone()),
            cfg.clone(),
            w,
            0,
            &progress,
            svc_key,
        );
        let (slices, w) = reflector::store();
        let slice_key = |s: &EndpointSlice| {
            let owner = s
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            // A slice without a Service label programs nothing; any key will do.
            Some(key(&s.metadata, owner.map(String::as_str)))
        };
        spawn_watch(
            Api::<EndpointSlice>::all(client.clone()),
            cfg,
            w,
            1,
            &progress,
            slice_key,
        );
        let (nodes, w) = reflector::store();
        match node {
            Some(name) => {
                let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
                spawn_watch(
                    Api::<Node>::all(client),
                    cfg,
                    w,
                    2,
                    &progress,
                    |_: &Node| None,
                );
            }
            None => {
                // No node name: no Node to watch, nothing to wait for.
                drop(w);
                progress.listed[2].store(true, Ordering::Release);
            }
        }
        KubeSource {
            services,
            slices,
            nodes,
            progress,
        }
    }

    /// The objects to program, once every kind has been listed; before that, none: a partial
    /// view would remove what a previous run programmed.
    pub fn synced_objects(&self) -> Option<Objects> {
        self.progress.synced().then(|| self.objects())
    }

    /// Takes what changed since the last call.
    pub fn take_dirty(&self) -> Dirty {
        std::mem::take(
            &mut *self
                .progress
                .dirty
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// The objects of one Service (`namespace/name`): the Service if it exists, its
    /// EndpointSlices, and the Node. Scans the slices (no index yet).
    pub fn objects_of(&self, service: &str) -> Objects {
        let (ns, name) = service.split_once('/').unwrap_or(("", service));
        let svc = self
            .services
            .get(&reflector::ObjectRef::new(name).within(ns));
        Objects {
            services: svc.into_iter().collect(),
            slices: self
                .slices
                .state()
                .into_iter()
                .filter(|s| {
                    s.metadata.namespace.as_deref() == Some(ns)
                        && s.metadata
                            .labels
                            .as_ref()
                            .and_then(|l| l.get(SERVICE_NAME_LABEL))
                            .is_some_and(|n| n == name)
                })
                .collect(),
            nodes: self.nodes.state(),
        }
    }

    /// The objects as the stores hold them now (shared, not copied).
    pub fn objects(&self) -> Objects {
        Objects {
            services: self.services.state(),
            slices: self.slices.state(),
            nodes: self.nodes.state(),
        }
    }
}

fn key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    name: Option<&str>,
) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        name.unwrap_or_default()
    )
}

/// `key_of` names the Service an object's change touches; None: everything.
fn spawn_watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    writer: reflector::store::Writer<K>,
    slot: usize,
    progress: &Arc<Progress>,
    key_of: fn(&K) -> Option<String>,
) where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let progress = progress.clone();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, cfg).default_backoff().reflect(writer));
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    // A (re)list: objects may have gone without an event.
                    progress.mark(None);
                    if !progress.listed[slot].swap(true, Ordering::AcqRel) {
                        info!(kind = %kind, "listed");
                    }
                    progress.changed.notify_one();
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(watcher::Event::Apply(o) | watcher::Event::Delete(o)) => {
                    progress.mark(key_of(&o));
                    progress.events.fetch_add(1, Ordering::Relaxed);
                    progress.changed.notify_one();
                }
                Err(e) => {
                    progress.errors.fetch_add(1, Ordering::Relaxed);
                    warn!(kind = %kind, "watch: {e}; retrying");
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};

    #[test]
    fn the_selector_excludes_the_labels_the_model_skips() {
        assert_eq!(
            PROXY_LABEL_SELECTOR,
            format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}")
        );
    }
}
