//! A scripted Kubernetes API server in process, for the control plane's tests and benches:
//! it lists, streams watch events (resuming from a resource version), fails lists on request,
//! expires watches with `410 Gone` and drops them. A `kube::Client` talks to it through a
//! tower service, no socket involved.
#![allow(clippy::unwrap_used)] // test support: a broken script is a failed test, reported at once
use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use futures_util::{stream::BoxStream, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use serde_json::{json, Value};
use tokio::sync::mpsc;

pub type Body = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

pub const SERVICES: &str = "/api/v1/services";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
pub const NODES: &str = "/api/v1/nodes";
pub const PODS: &str = "/api/v1/pods";

/// One resource collection of the fake API server.
#[derive(Default)]
pub struct Collection {
    pub items: BTreeMap<String, Value>,
    /// Every change, by resource version, for watches that start from an older version.
    pub log: Vec<(u64, Value)>,
    pub watchers: Vec<mpsc::UnboundedSender<Value>>,
    /// Fail this many next lists with a 500.
    pub fail_lists: u32,
    pub lists: u32,
    pub watches: u32,
    /// The query strings of the requests.
    pub queries: Vec<String>,
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
        PODS => ("v1", "PodList"),
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
pub struct Api(Arc<Mutex<FakeApi>>);

impl Api {
    pub fn coll<T>(&self, path: &'static str, f: impl FnOnce(&mut Collection, &mut u64) -> T) -> T {
        let mut api = self.0.lock().unwrap();
        let FakeApi { rv, collections } = &mut *api;
        f(collections.entry(path).or_default(), rv)
    }

    fn event(c: &mut Collection, rv: u64, ev: Value) {
        c.log.push((rv, ev.clone()));
        c.watchers.retain(|w| w.send(ev.clone()).is_ok());
    }

    /// Creates or updates an object; watchers see ADDED or MODIFIED.
    pub fn apply(&self, path: &'static str, mut obj: Value) {
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
    pub fn delete(&self, path: &'static str, name: &str, tell: bool) {
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
    pub fn expire(&self, path: &'static str) {
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
    pub fn drop_watches(&self, path: &'static str) {
        self.coll(path, |c, _| c.watchers.clear())
    }

    pub fn handle(&self, req: Request<kube::client::Body>) -> Response<Body> {
        let path: &'static str = match req.uri().path() {
            SERVICES => SERVICES,
            SLICES => SLICES,
            NODES => NODES,
            PODS => PODS,
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

    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(req)) }
        });
        kube::Client::new(svc, "default")
    }
}

impl Api {
    /// Serves the API over plain HTTP on `listener` (bound wherever the caller chose, e.g.
    /// inside a test's network namespace), from a thread of its own, until the process ends.
    /// What a `weir agent --source kube:KUBECONFIG` in another process talks to.
    pub fn serve_http(&self, listener: std::net::TcpListener) -> std::thread::JoinHandle<()> {
        let api = self.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                listener.set_nonblocking(true).unwrap();
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        continue;
                    };
                    let api = api.clone();
                    tokio::spawn(async move {
                        let svc = hyper::service::service_fn(
                            move |req: Request<hyper::body::Incoming>| {
                                let (parts, _) = req.into_parts();
                                let r = api.handle(Request::from_parts(
                                    parts,
                                    kube::client::Body::empty(),
                                ));
                                async move { Ok::<_, Infallible>(r) }
                            },
                        );
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    });
                }
            })
        })
    }

    /// A kubeconfig that points at `addr` over plain HTTP.
    pub fn kubeconfig(addr: std::net::SocketAddr) -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n\
             clusters: [{{name: fake, cluster: {{server: \"http://{addr}\"}}}}]\n\
             users: [{{name: fake, user: {{}}}}]\n\
             contexts: [{{name: fake, context: {{cluster: fake, user: fake}}}}]\n"
        )
    }
}
