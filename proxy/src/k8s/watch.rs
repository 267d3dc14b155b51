//! The Kubernetes API as a source: one watch per kind (Services, EndpointSlices, this Node, and
//! Pods for cluster DNS's `pods verified`) feeding reflector stores. The stores are the one
//! cache of the agent: the data path is built from their snapshot, and the DNS server reads
//! the same stores.
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
use k8s_openapi::api::core::v1::{Node, Pod, PodStatus, Service};
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

use super::slice_index::{key, service_of_slice, SliceIndex};
use crate::model::Objects;
use crate::model::Slice;

/// What the watches have seen, shared with their tasks.
#[derive(Debug, Default)]
pub struct Progress {
    /// A change arrived in any store.
    pub changed: Notify,
    /// Each kind has completed its first list (Services, slices, Node, Pods).
    listed: [AtomicBool; 4],
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

/// What an object's change touches in the data path.
#[derive(Debug)]
enum Touch {
    /// This Service (`namespace/name`).
    Service(String),
    /// Everything (a relist of a kind the data path reads, the Node as the model reads it).
    All,
    /// Nothing: a Pod, a relist of Pods (only cluster DNS reads them), a Node heartbeat.
    Nothing,
}

/// What an event of a kind keyed by Service touches: the Service `service` gives of an object
/// applied or deleted, everything at the end of a relist (objects may have gone without an
/// event), nothing while the relist runs.
fn by_service<K>(e: &watcher::Event<K>, service: impl Fn(&K) -> String) -> Touch {
    match e {
        watcher::Event::Apply(o) | watcher::Event::Delete(o) => Touch::Service(service(o)),
        watcher::Event::InitDone => Touch::All,
        watcher::Event::Init | watcher::Event::InitApply(_) => Touch::Nothing,
    }
}

/// What events of this node's Node touch: everything when what the model reads of it
/// (`model::node_view`) changed, and nothing otherwise. The kubelet's status updates
/// (conditions, heartbeats, capacity) are most Node events, and need no resync. `seen` is the
/// view last programmed; a relist notes the view it brings (its end resyncs all anyway), and a
/// deletion or a relist without the Node forgets it, so that the next Node is a change.
fn node_touch(seen: &mut Option<u64>, e: &watcher::Event<Node>) -> Touch {
    match e {
        watcher::Event::Init => {
            *seen = None;
            Touch::Nothing
        }
        watcher::Event::InitApply(n) => {
            *seen = Some(crate::model::node_view(n));
            Touch::Nothing
        }
        watcher::Event::InitDone => Touch::All,
        watcher::Event::Apply(n) => {
            let view = Some(crate::model::node_view(n));
            if std::mem::replace(seen, view) == view {
                Touch::Nothing
            } else {
                Touch::All
            }
        }
        watcher::Event::Delete(_) => {
            *seen = None;
            Touch::All
        }
    }
}

impl Progress {
    fn mark(&self, touch: Touch) {
        let mut d = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        match touch {
            Touch::Service(k) if !d.all => {
                d.services.insert(k);
            }
            Touch::Service(_) | Touch::Nothing => {}
            Touch::All => {
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

/// The stores and their watches' progress.
#[derive(Clone)]
pub struct KubeSource {
    pub services: Store<Service>,
    /// EndpointSlices, with what weir reads of them ([`Slice`]).
    pub slices: Store<Slice>,
    pub nodes: Store<Node>,
    /// Pods, stripped to what DNS reads (namespace, name, deletion, addresses); None unless
    /// watched.
    pub pods: Option<Store<Pod>>,
    pub progress: Arc<Progress>,
    /// The slices of each Service, so that rebuilding one Service reads its own slices only.
    slice_index: Arc<SliceIndex>,
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
        Self::start_with(client, node, Some(PROXY_LABEL_SELECTOR), false)
    }

    /// The same with this label selector, or none: cluster DNS needs every Service and slice,
    /// headless ones included (the model skips what the data path must not program); and
    /// with a watch of every Pod that has an address when `pods` (cluster DNS's
    /// `pods verified`).
    pub fn start_with(
        client: Client,
        node: Option<&str>,
        selector: Option<&str>,
        pods: bool,
    ) -> KubeSource {
        let progress = Arc::new(Progress::default());
        progress.mark(Touch::All);
        let (services, w) = reflector::store();
        let cfg = match selector {
            Some(s) => watcher::Config::default().labels(s),
            None => watcher::Config::default(),
        };
        spawn_watch(
            Api::<Service>::all(client.clone()),
            cfg.clone(),
            w,
            0,
            &progress,
            |e| {
                by_service(e, |s: &Service| {
                    key(&s.metadata, s.metadata.name.as_deref())
                })
            },
        );
        let (slices, w) = reflector::store();
        let slice_index = Arc::new(SliceIndex::default());
        let index = slice_index.clone();
        spawn_watch(
            Api::<Slice>::all(client.clone()),
            cfg,
            w,
            1,
            &progress,
            move |e| {
                index.event(e);
                by_service(e, service_of_slice)
            },
        );
        let (nodes, w) = reflector::store();
        match node {
            Some(name) => {
                let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
                spawn_watch(Api::<Node>::all(client.clone()), cfg, w, 2, &progress, {
                    let mut seen = None;
                    move |e| node_touch(&mut seen, e)
                });
            }
            None => {
                // No node name: no Node to watch, nothing to wait for.
                drop(w);
                progress.listed[2].store(true, Ordering::Release);
            }
        }
        let pods = if pods {
            let (store, w) = reflector::store();
            // CoreDNS's selector: a pod without an address has no record.
            let cfg = watcher::Config::default().fields("status.podIP!=");
            spawn_watch(
                Api::<Pod>::all(client),
                cfg,
                w,
                3,
                &progress,
                |_: &watcher::Event<Pod>| Touch::Nothing,
            );
            Some(store)
        } else {
            progress.listed[3].store(true, Ordering::Release);
            None
        };
        KubeSource {
            services,
            slices,
            nodes,
            pods,
            progress,
            slice_index,
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
    /// EndpointSlices (from the index), and the Node.
    pub fn objects_of(&self, service: &str) -> Objects {
        let (ns, name) = service.split_once('/').unwrap_or(("", service));
        let svc = self
            .services
            .get(&reflector::ObjectRef::new(name).within(ns));
        let slices = self
            .slice_index
            .slices_of(service)
            .iter()
            .filter_map(|s| {
                let (sns, sname) = s.split_once('/')?;
                let o = self
                    .slices
                    .get(&reflector::ObjectRef::new(sname).within(sns))?;
                // Filed under this Service when the event came; check it still is.
                (service_of_slice(&o) == service).then_some(o)
            })
            .collect();
        Objects {
            services: svc.into_iter().collect(),
            slices,
            nodes: self.nodes.state(),
            pods: Vec::new(),
        }
    }

    /// The objects as the stores hold them now (shared, not copied).
    pub fn objects(&self) -> Objects {
        Objects {
            services: self.services.state(),
            slices: self.slices.state(),
            nodes: self.nodes.state(),
            pods: self.pods.as_ref().map(Store::state).unwrap_or_default(),
        }
    }
}

/// `touches` says what each event touches in the data path; it is called after the store took
/// the event and before the change is announced, and may keep state of its own (the slice
/// index, the Node's view). Objects are stored without what the agent never reads ([`Strip`]).
fn spawn_watch<K>(
    api: Api<K>,
    cfg: watcher::Config,
    writer: reflector::store::Writer<K>,
    slot: usize,
    progress: &Arc<Progress>,
    mut touches: impl FnMut(&watcher::Event<K>) -> Touch + Send + 'static,
) where
    K: Resource + Strip + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let progress = progress.clone();
    let kind = K::kind(&K::DynamicType::default()).into_owned();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, cfg)
            .default_backoff()
            .modify(Strip::strip)
            .reflect(writer));
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(e) => {
                    progress.mark(touches(&e));
                    match e {
                        watcher::Event::InitDone => {
                            if !progress.listed[slot].swap(true, Ordering::AcqRel) {
                                info!(kind = %kind, "listed");
                            }
                        }
                        watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                            progress.events.fetch_add(1, Ordering::Relaxed);
                        }
                        watcher::Event::Init | watcher::Event::InitApply(_) => continue,
                    }
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

/// What the stores keep of an object: `managedFields` never (often the larger part of an
/// object); of a Pod, only its identity, deletion and addresses.
trait Strip {
    fn strip(&mut self);
}

impl Strip for Service {
    fn strip(&mut self) {
        self.metadata.managed_fields = None;
    }
}

impl Strip for Slice {
    fn strip(&mut self) {
        self.metadata.managed_fields = None;
    }
}

impl Strip for Node {
    fn strip(&mut self) {
        self.metadata.managed_fields = None;
        // Images weigh most; the model reads the spec, the labels and the addresses.
        if let Some(s) = self.status.as_mut() {
            s.images = None;
        }
    }
}

impl Strip for Pod {
    fn strip(&mut self) {
        let m = &mut self.metadata;
        m.managed_fields = None;
        m.annotations = None;
        m.labels = None;
        m.owner_references = None;
        m.finalizers = None;
        self.spec = None;
        self.status = self.status.take().map(|s| PodStatus {
            pod_ip: s.pod_ip,
            pod_ips: s.pod_ips,
            ..Default::default()
        });
    }
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
