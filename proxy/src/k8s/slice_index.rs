//! Service (`namespace/name`) → its EndpointSlices, so that rebuilding one Service reads its
//! own slices only.
use std::collections::{BTreeSet, HashMap};

use kube::runtime::watcher;

use crate::model::{Slice, SERVICE_NAME_LABEL};

/// Service (`namespace/name`) → its EndpointSlices, kept from the watch events: applied after
/// the store and before the change is announced, rebuilt by each relist.
#[derive(Default)]
pub(super) struct SliceIndex {
    inner: std::sync::Mutex<SliceIndexInner>,
}

#[derive(Default)]
struct SliceIndexInner {
    by_service: HashMap<String, BTreeSet<String>>,
    /// Slice (`namespace/name`) → the Service it was filed under.
    service_of: HashMap<String, String>,
    /// The index a relist in progress builds (swapped in at its end).
    next: Option<Box<SliceIndexInner>>,
}

impl SliceIndexInner {
    fn put(&mut self, slice: String, service: String) {
        self.remove(&slice);
        self.by_service
            .entry(service.clone())
            .or_default()
            .insert(slice.clone());
        self.service_of.insert(slice, service);
    }

    fn remove(&mut self, slice: &str) {
        if let Some(old) = self.service_of.remove(slice) {
            if let Some(set) = self.by_service.get_mut(&old) {
                set.remove(slice);
                if set.is_empty() {
                    self.by_service.remove(&old);
                }
            }
        }
    }
}

impl SliceIndex {
    pub(super) fn event(&self, ev: &watcher::Event<Slice>) {
        let mut i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let names = |s: &Slice| {
            (
                format!(
                    "{}/{}",
                    s.metadata.namespace.as_deref().unwrap_or_default(),
                    s.metadata.name.as_deref().unwrap_or_default()
                ),
                service_of_slice(s),
            )
        };
        match ev {
            watcher::Event::Init => i.next = Some(Box::default()),
            watcher::Event::InitApply(s) => {
                let (slice, svc) = names(s);
                if let Some(n) = i.next.as_mut() {
                    n.put(slice, svc);
                }
            }
            watcher::Event::InitDone => {
                if let Some(n) = i.next.take() {
                    i.by_service = n.by_service;
                    i.service_of = n.service_of;
                }
            }
            watcher::Event::Apply(s) => {
                let (slice, svc) = names(s);
                i.put(slice, svc);
            }
            watcher::Event::Delete(s) => i.remove(&names(s).0),
        }
    }

    pub(super) fn slices_of(&self, service: &str) -> Vec<String> {
        let i = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        i.by_service
            .get(service)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// An object's key: `namespace/name` (`default` for no namespace).
pub(super) fn key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    name: Option<&str>,
) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        name.unwrap_or_default()
    )
}

/// The Service a slice belongs to (`namespace/<service-name label>`).
pub(super) fn service_of_slice(s: &Slice) -> String {
    // A slice without a Service label programs nothing; any key will do.
    key(&s.metadata, s.label(SERVICE_NAME_LABEL))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, service: &str) -> Slice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "demo",
                         "labels": {SERVICE_NAME_LABEL: service}},
            "addressType": "IPv4", "endpoints": []}))
        .unwrap()
    }

    #[test]
    fn the_slice_index_follows_events_relabels_and_relists() {
        let i = SliceIndex::default();
        i.event(&watcher::Event::Apply(slice("web-1", "web")));
        i.event(&watcher::Event::Apply(slice("web-2", "web")));
        i.event(&watcher::Event::Apply(slice("db-1", "db")));
        assert_eq!(i.slices_of("demo/web"), ["demo/web-1", "demo/web-2"]);
        // A slice relabelled to another Service moves.
        i.event(&watcher::Event::Apply(slice("web-2", "db")));
        assert_eq!(i.slices_of("demo/web"), ["demo/web-1"]);
        assert_eq!(i.slices_of("demo/db"), ["demo/db-1", "demo/web-2"]);
        i.event(&watcher::Event::Delete(slice("db-1", "db")));
        assert_eq!(i.slices_of("demo/db"), ["demo/web-2"]);
        // A relist replaces everything at its end: what it did not list is gone.
        i.event(&watcher::Event::Init);
        i.event(&watcher::Event::InitApply(slice("web-3", "web")));
        assert_eq!(
            i.slices_of("demo/web"),
            ["demo/web-1"],
            "not before InitDone"
        );
        i.event(&watcher::Event::InitDone);
        assert_eq!(i.slices_of("demo/web"), ["demo/web-3"]);
        assert!(i.slices_of("demo/db").is_empty());
    }
}
