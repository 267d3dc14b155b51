//! The control plane against a scripted Kubernetes API: weir's watches (kube-runtime) talk to
//! an in-process fake API server that lists, streams watch events, fails on request, expires
//! watches with `410 Gone` and drops them. The agent's own programming step writes to the
//! in-memory map writer, whose state the tests check. No root needed.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures_util::{stream::BoxStream, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use weir_proxy::{
    agent::{Config, KubeSync, Source},
    kube_source::KubeSource,
    maps::FakeMaps,
    observe::{Health, Metrics, Observed},
    program::Programmer,
};

type Body = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const NODES: &str = "/api/v1/nodes";

/// One resource collection of the fake API server.
#[derive(Default)]
struct Collection {
    items: BTreeMap<String, Value>,
    /// Every change, by resource version, for watches that start from an older version.
    log: Vec<(u64, Value)>,
    watchers: Vec<mpsc::UnboundedSender<Value>>,
    /// Fail this many next lists with a 500.
    fail_lists: u32,
    lists: u32,
    watches: u32,
    /// The query strings of the requests.
    queries: Vec<String>,
}

#[derive(Default)]
struct FakeApi {
    rv: u64,
    collections: HashMap<&'static str, Collection>,
}

fn list_kind(path: &str) -> (&'static str, &'static str) {
    match path {
        SLICES => ("discovery.k8s.io/v1", "EndpointSliceList"),
        NODES => ("v1", "NodeList"),
        _ => ("v1", "ServiceList"),
    }
}

fn name_of(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or(""),
        obj["metadata"]["name"].as_str().unwrap()
    )
}

fn one(bytes: Vec<u8>) -> Body {
    StreamBody::new(
        futures_util::stream::once(async move { Ok(Frame::data(Bytes::from(bytes))) }).boxed(),
    )
}

#[derive(Clone, Default)]
struct Api(Arc<Mutex<FakeApi>>);

impl Api {
    fn coll<T>(&self, path: &'static str, f: impl FnOnce(&mut Collection, &mut u64) -> T) -> T {
        let mut api = self.0.lock().unwrap();
        let FakeApi { rv, collections } = &mut *api;
        f(collections.entry(path).or_default(), rv)
    }

    fn event(c: &mut Collection, rv: u64, ev: Value) {
        c.log.push((rv, ev.clone()));
        c.watchers.retain(|w| w.send(ev.clone()).is_ok());
    }

    /// Creates or updates an object; watchers see ADDED or MODIFIED.
    fn apply(&self, path: &'static str, mut obj: Value) {
        self.coll(path, |c, rv| {
            *rv += 1;
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            let name = name_of(&obj);
            let kind = if c.items.contains_key(&name) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            c.items.insert(name, obj.clone());
            Self::event(c, *rv, json!({"type": kind, "object": obj}));
        })
    }

    /// Deletes an object; with `tell`, watchers see DELETED, else only a later list shows it.
    fn delete(&self, path: &'static str, name: &str, tell: bool) {
        self.coll(path, |c, rv| {
            *rv += 1;
            let mut obj = c.items.remove(name).unwrap();
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            if tell {
                Self::event(c, *rv, json!({"type": "DELETED", "object": obj}));
            }
        })
    }

    /// Ends every watch of the collection with `410 Gone` (the history they would resume
    /// from is compacted away).
    fn expire(&self, path: &'static str) {
        self.coll(path, |c, _| {
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "too old resource version", "reason": "Expired", "code": 410}});
            for w in c.watchers.drain(..) {
                let _ = w.send(gone.clone());
            }
            c.log.clear();
        })
    }

    /// Drops every watch connection of the collection, as a restarting API server does.
    fn drop_watches(&self, path: &'static str) {
        self.coll(path, |c, _| c.watchers.clear())
    }

    fn handle(&self, req: Request<kube::client::Body>) -> Response<Body> {
        let path: &'static str = match req.uri().path() {
            SERVICES => SERVICES,
            SLICES => SLICES,
            NODES => NODES,
            other => {
                return Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .body(one(format!("no {other}").into_bytes()))
                    .unwrap()
            }
        };
        let query = req.uri().query().unwrap_or("").to_string();
        let watch = query.split('&').any(|kv| kv == "watch=true");
        let since: u64 = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        self.coll(path, |c, rv| {
            c.queries.push(query.clone());
            if watch {
                c.watches += 1;
                let (tx, rx) = mpsc::unbounded_channel();
                for (v, ev) in &c.log {
                    if *v > since {
                        tx.send(ev.clone()).unwrap();
                    }
                }
                c.watchers.push(tx);
                let lines = futures_util::stream::unfold(rx, |mut rx| async move {
                    let ev = rx.recv().await?;
                    let mut line = serde_json::to_vec(&ev).unwrap();
                    line.push(b'\n');
                    Some((Ok(Frame::data(Bytes::from(line))), rx))
                });
                return Response::new(StreamBody::new(lines.boxed()));
            }
            c.lists += 1;
            if c.fail_lists > 0 {
                c.fail_lists -= 1;
                let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                    "status": "Failure", "message": "injected failure", "reason": "InternalError",
                    "code": 500});
                return Response::builder()
                    .status(StatusCode::INTERNAL_SERVER_ERROR)
                    .body(one(serde_json::to_vec(&status).unwrap()))
                    .unwrap();
            }
            let (api_version, kind) = list_kind(path);
            let list = json!({
                "apiVersion": api_version, "kind": kind,
                "metadata": {"resourceVersion": rv.to_string()},
                "items": c.items.values().cloned().collect::<Vec<_>>(),
            });
            Response::new(one(serde_json::to_vec(&list).unwrap()))
        })
    }

    fn client(&self) -> kube::Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req)) }
        });
        kube::Client::new(svc, "default")
    }
}

fn rand_tag() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "demo"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}})
}

fn slice(name: &str, service: &str, ips: &[&str]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "demo",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip]})).collect::<Vec<_>>()})
}

fn node() -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a"},
        "spec": {"podCIDRs": ["198.18.1.0/24"]}})
}

/// The programmed frontends (address:port) and their backend counts.
fn programmed(m: &FakeMaps) -> BTreeMap<String, u16> {
    m.state
        .svc
        .iter()
        .filter(|(k, _)| k.4 == 0)
        .map(|(k, v)| {
            let ip = weir_proxy::addr::to_ip(&weir_common::Addr(k.0));
            (format!("{ip}:{}", k.1), v.count)
        })
        .collect()
}

/// The agent's loop, reduced to its control-plane part: program the stores' snapshot whenever
/// they change, once every kind is listed, until `want` holds.
struct Agent {
    source: KubeSource,
    programmer: Programmer,
    maps: FakeMaps,
    sync: KubeSync,
    cfg: Config,
    obs: Observed,
    /// What each sync was: None for a full one, Some(n) for n Services alone.
    steps: Vec<Option<usize>>,
}

impl Agent {
    fn start(api: &Api) -> Agent {
        let dir = std::env::temp_dir().join(format!("weir-controller-{}", std::process::id()));
        Agent {
            source: KubeSource::start(api.client(), Some("node-a")),
            programmer: Programmer::default(),
            maps: FakeMaps::default(),
            sync: KubeSync::default(),
            cfg: Config {
                source: Source::Kube { kubeconfig: None },
                bpffs: dir.join("bpffs"),
                cgroup: None,
                pod_if_prefixes: vec![],
                netdevs: vec![],
                ready_file: None,
                once: false,
                cni_socket: None,
                node_name: Some("node-a".into()),
                pod_cidrs_file: dir.join(format!("pod-cidrs-{}.json", rand_tag())),
                healthz_bind: None,
                metrics_bind: None,
                health_timeout: Duration::from_secs(60),
                state_file: None,
            },
            obs: Observed {
                health: Health::new(Duration::from_secs(60)),
                metrics: Metrics::new(),
            },
            steps: vec![],
        }
    }

    async fn until(&mut self, what: &str, want: impl Fn(&Agent) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.source.progress.synced() {
                // The agent's own step: everything first, then only what events touched.
                let step = self
                    .sync
                    .step(
                        &self.cfg,
                        &self.source,
                        &mut self.programmer,
                        &mut self.maps,
                        &self.obs,
                    )
                    .unwrap();
                self.steps.push(step);
                assert!(
                    self.maps.violations.is_empty(),
                    "{:?}",
                    self.maps.violations
                );
            }
            if want(self) {
                return;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, self.source.progress.changed.notified())
                .await
                .is_err()
            {
                panic!(
                    "{what}: not reached in 15 s; programmed {:?}, synced {}",
                    programmed(&self.maps),
                    self.source.progress.synced()
                );
            }
        }
    }
}

fn base() -> Api {
    let api = Api::default();
    api.apply(SERVICES, service("web", "198.19.0.10"));
    api.apply(
        SLICES,
        slice("web-1", "web", &["198.18.1.11", "198.18.1.12"]),
    );
    api.apply(NODES, node());
    api
}

#[tokio::test]
async fn initial_list_then_watch_events_are_programmed() {
    let api = base();
    let mut a = Agent::start(&api);
    a.until("initial list", |a| {
        programmed(&a.maps).get("198.19.0.10:80") == Some(&2)
    })
    .await;
    // kube-proxy's selectors: no objects of other proxies or headless services; only this
    // node.
    let q = api.coll(SERVICES, |c, _| c.queries.clone());
    assert!(
        q[0].contains("labelSelector=%21service.kubernetes.io%2Fservice-proxy-name%2C%21service.kubernetes.io%2Fheadless"),
        "{q:?}"
    );
    let q = api.coll(NODES, |c, _| c.queries.clone());
    assert!(
        q[0].contains("fieldSelector=metadata.name%3Dnode-a"),
        "{q:?}"
    );
    // Scale up, add a service, delete one: each watch event is followed.
    api.apply(
        SLICES,
        slice(
            "web-1",
            "web",
            &["198.18.1.11", "198.18.1.12", "198.18.1.13"],
        ),
    );
    a.until("scaled to 3", |a| {
        programmed(&a.maps).get("198.19.0.10:80") == Some(&3)
    })
    .await;
    api.apply(SERVICES, service("api", "198.19.0.11"));
    a.until("new service", |a| {
        programmed(&a.maps).contains_key("198.19.0.11:80")
    })
    .await;
    api.delete(SERVICES, "demo/web", true);
    a.until("web deleted", |a| {
        !programmed(&a.maps).contains_key("198.19.0.10:80")
    })
    .await;
    assert_eq!(programmed(&a.maps).len(), 1, "{:?}", programmed(&a.maps));
    assert_eq!(
        a.maps.state.backends.len(),
        0,
        "web's backends went with it (api has no endpoints): {:?}",
        a.maps.state.backends
    );
    // One full sync at the start; every event after it rebuilt only its Service.
    let full = a.steps.iter().filter(|s| s.is_none()).count();
    assert_eq!(full, 1, "{:?}", a.steps);
    assert!(
        a.steps.iter().all(|s| s.is_none_or(|n| n <= 1)),
        "{:?}",
        a.steps
    );
}

#[tokio::test]
async fn nothing_changes_before_every_kind_is_listed_and_failed_lists_are_retried() {
    let api = base();
    api.coll(SLICES, |c, _| c.fail_lists = 2);
    // What a previous run programmed: adopted, and kept until the lists are complete.
    let mut a = Agent::start(&api);
    let old = weir_proxy::program::Desired::from([(
        weir_proxy::program::Frontend::new(
            "198.19.0.99".parse().unwrap(),
            80,
            weir_common::PROTO_TCP,
        ),
        weir_proxy::program::ServiceSpec {
            name: "demo/old:80".into(),
            backends: vec!["198.18.1.99:8080".parse().unwrap()],
            ..Default::default()
        },
    )]);
    a.programmer.apply(&old, &mut a.maps);
    a.programmer = Programmer::adopt(&a.maps).unwrap();
    // Services and the node are listed at once; slices fail twice first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(a.source.services.state().len(), 1, "services are listed");
    assert!(
        a.source.synced_objects().is_none(),
        "no objects to program while slices are not listed"
    );
    a.until("listed", |a| a.source.progress.synced()).await;
    assert!(
        api.coll(SLICES, |c, _| c.lists) >= 3,
        "retried after failing twice"
    );
    assert!(
        a.source
            .progress
            .errors
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    a.until("synced", |a| {
        let p = programmed(&a.maps);
        p.get("198.19.0.10:80") == Some(&2) && !p.contains_key("198.19.0.99:80")
    })
    .await;
}

#[tokio::test]
async fn a_relist_after_410_gone_removes_what_was_deleted_meanwhile() {
    let api = base();
    api.apply(SERVICES, service("gone", "198.19.0.12"));
    let mut a = Agent::start(&api);
    a.until("both", |a| {
        let p = programmed(&a.maps);
        p.contains_key("198.19.0.10:80") && p.contains_key("198.19.0.12:80")
    })
    .await;
    // The watch missed this deletion, and its history is gone: only a new list shows it.
    api.delete(SERVICES, "demo/gone", false);
    api.expire(SERVICES);
    a.until("relisted", |a| {
        let p = programmed(&a.maps);
        p.contains_key("198.19.0.10:80") && !p.contains_key("198.19.0.12:80")
    })
    .await;
    assert!(
        api.coll(SERVICES, |c, _| c.lists) >= 2,
        "listed again after 410"
    );
    assert!(
        a.steps.iter().filter(|s| s.is_none()).count() >= 2,
        "a relist programs everything again: {:?}",
        a.steps
    );
}

#[tokio::test]
async fn a_dropped_watch_reconnects_and_resumes_where_it_was() {
    let api = base();
    let mut a = Agent::start(&api);
    a.until("initial", |a| {
        programmed(&a.maps).get("198.19.0.10:80") == Some(&2)
    })
    .await;
    let lists = api.coll(SLICES, |c, _| c.lists);
    api.drop_watches(SLICES);
    api.apply(SLICES, slice("web-1", "web", &["198.18.1.11"]));
    a.until("resumed", |a| {
        programmed(&a.maps).get("198.19.0.10:80") == Some(&1)
    })
    .await;
    let (lists_after, watches) = api.coll(SLICES, |c, _| (c.lists, c.watches));
    assert!(watches >= 2, "watched again");
    assert_eq!(
        lists_after, lists,
        "resumed from its resource version, without a new list"
    );
}
