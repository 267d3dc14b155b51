//! The control plane against a scripted Kubernetes API: weir's watches (kube-runtime) talk to an
//! in-process fake API server that lists, streams watch events, fails on request, expires
//! watches with `410 Gone` and drops them; the agent's own programming step writes to the
//! in-memory map writer, whose state the tests check. No root needed for those; the last one
//! runs the real agent against the fake API over HTTP.
use std::{
    collections::BTreeMap,
    thread,
    time::{Duration, Instant},
};

use serde_json::{json, Value};
use weir_proxy::{
    admin::{Health, Metrics, Observed},
    datapath::Programmer,
    k8s::{KubeSource, Reconciler},
};
use weir_testkit::{
    fake_api::{Api, NODES, PODS, SERVICES, SLICES},
    reconciler, FakeMaps,
};

use crate::weir_bin;

/// The agent binary against a Kubernetes API (the scripted one, served over HTTP inside the
/// node namespace) through a kubeconfig: it lists, programs, writes the node's podCIDRs and its
/// per-Service report, and follows a watch event.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_agent_follows_the_kubernetes_api() {
    use serde_json::json;
    use weir_testkit::{
        fake_api::{Api, NODES, SERVICES, SLICES},
        tag, BpfMount, Node, Proc, RunDir,
    };
    let t = format!("a{}", tag());
    let dir = RunDir::create(&format!("/run/weir-{t}")).unwrap();
    let node = Node::create(&t).unwrap();
    let bpffs = BpfMount::create(&dir.0.join("bpffs")).unwrap();
    let slice = |ips: &[&str]| {
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
            "endpoints": ips.iter().map(|ip| json!({"addresses": [ip]})).collect::<Vec<_>>()})
    };
    let api = Api::default();
    api.apply(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "demo"},
            "spec": {"clusterIP": "198.19.0.10", "ports": [{"name": "http", "port": 80}]}}),
    );
    api.apply(SLICES, slice(&["198.18.1.11", "198.18.1.12"]));
    api.apply(
        NODES,
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
            "spec": {"podCIDRs": ["198.18.1.0/24"]}}),
    );
    let listener = node
        .ns
        .run(|| std::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    api.serve_http(listener);
    let kubeconfig = dir.0.join("kubeconfig");
    std::fs::write(&kubeconfig, Api::kubeconfig(addr)).unwrap();
    let (ready, report, cidrs) = (
        dir.0.join("ready"),
        dir.0.join("services.json"),
        dir.0.join("pod-cidrs.json"),
    );
    let mut cmd = node.ns.command(weir_bin().unwrap()).unwrap();
    cmd.args([
        "agent",
        "--no-socket-lb",
        "--cni-socket",
        "off",
        "--node-name",
        "n1",
    ])
    .args([
        "--healthz-bind-address",
        "off",
        "--metrics-bind-address",
        "off",
    ])
    .arg("--source")
    .arg(format!("kube:{}", kubeconfig.display()))
    .arg("--bpffs")
    .arg(&bpffs.path)
    .arg("--state-file")
    .arg(&report)
    .arg("--pod-cidrs-file")
    .arg(&cidrs)
    .arg("--ready-file")
    .arg(&ready)
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null());
    let mut agent = Proc::spawn("agent", cmd).unwrap();
    let maps = weir_proxy::datapath::pin_dir(&bpffs.path).maps();
    let backends = || -> Option<usize> {
        let st = weir_proxy::tools::status::read(&maps, 0).ok()?;
        st.services
            .iter()
            .find(|v| v.frontend == "198.19.0.10:80/TCP")
            .map(|v| v.backends.len())
    };
    let wait = |what: &str, agent: &mut Proc, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            if let Ok(Some(st)) = agent.child.try_wait() {
                panic!("{what}: the agent exited ({st})");
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: not within 20 s"
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    wait("listed and programmed", &mut agent, &|| {
        ready.exists() && backends() == Some(2)
    });
    assert_eq!(
        std::fs::read_to_string(&cidrs).unwrap(),
        r#"{"podCIDRs":["198.18.1.0/24"]}"#
    );
    let by = weir_proxy::tools::status::read_reports(&report)
        .unwrap()
        .unwrap();
    assert_eq!(by[0].service, "demo/web");
    assert_eq!(by[0].state, "programmed");
    api.apply(
        SLICES,
        slice(&["198.18.1.11", "198.18.1.12", "198.18.1.13"]),
    );
    wait("the watch event followed", &mut agent, &|| {
        backends() == Some(3)
    });
    api.delete(SERVICES, "demo/web", true);
    wait("the deletion followed", &mut agent, &|| {
        backends().is_none()
    });
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
            let ip = weir_proxy::datapath::addr::to_ip(&weir_common::Addr(k.0));
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
    sync: Reconciler,
    obs: Observed,
    /// What each sync was: None for a full one, Some(n) for n Services alone.
    steps: Vec<Option<usize>>,
}

impl Agent {
    fn start(api: &Api) -> Agent {
        Self::start_source(KubeSource::start(api.client(), Some("node-a")))
    }

    fn start_source(source: KubeSource) -> Agent {
        let dir = std::env::temp_dir().join(format!("weir-controller-{}", std::process::id()));
        Agent {
            source,
            programmer: Programmer::default(),
            maps: FakeMaps::default(),
            sync: reconciler("node-a", dir.join(format!("pod-cidrs-{}.json", rand_tag()))),
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
    // An incremental sync keeps the gauges of what is not programmed current.
    api.apply(
        SERVICES,
        json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "ext", "namespace": "demo"},
            "spec": {"type": "ExternalName", "externalName": "example.org"}}),
    );
    a.until("ExternalName counted as skipped", |a| {
        a.obs
            .metrics
            .render()
            .contains("weir_objects_skipped{reason=\"ExternalName\"} 1\n")
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
    let old = weir_proxy::model::Desired::from([(
        weir_proxy::model::Frontend::new(
            "198.19.0.99".parse().unwrap(),
            80,
            weir_common::PROTO_TCP,
        ),
        weir_proxy::model::ServiceSpec {
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

fn pod(name: &str, ip: &str, deleting: bool) -> Value {
    let mut p = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "labels": {"app": "web"},
                     "annotations": {"big": "x".repeat(1000)}},
        "spec": {"containers": [{"name": "c", "image": "example/web"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    if deleting {
        p["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    p
}

#[tokio::test]
async fn pods_are_watched_for_verified_dns_stripped_and_rebuild_no_service() {
    let api = base();
    api.apply(PODS, pod("web-a", "198.18.1.11", false));
    let source = KubeSource::start_with(api.client(), Some("node-a"), None, true);
    let mut a = Agent::start_source(source);
    a.until("initial list, pods included", |a| {
        programmed(&a.maps).get("198.19.0.10:80") == Some(&2) && a.source.objects().pods.len() == 1
    })
    .await;
    // CoreDNS's selector: pods with an address.
    let q = api.coll(PODS, |c, _| c.queries.clone());
    assert!(q[0].contains("fieldSelector=status.podIP%21%3D"), "{q:?}");
    // Stored without what DNS does not read.
    let p = a.source.objects().pods[0].clone();
    assert_eq!(p.metadata.name.as_deref(), Some("web-a"));
    assert!(p.metadata.labels.is_none() && p.metadata.annotations.is_none());
    assert!(p.spec.is_none());
    let st = p.status.as_ref().unwrap();
    assert_eq!(st.pod_ip.as_deref(), Some("198.18.1.11"));
    assert!(st.phase.is_none());
    // A pod event touches no Service of the data path; a terminating pod gets no record.
    let steps = a.steps.len();
    api.apply(PODS, pod("web-b", "198.18.1.12", false));
    api.apply(PODS, pod("web-c", "198.18.1.13", true));
    a.until("two more pods", |a| a.source.objects().pods.len() == 3)
        .await;
    assert!(
        a.steps[steps..].iter().all(|s| *s == Some(0)),
        "{:?}",
        &a.steps[steps..]
    );
    let mut dns: Vec<String> = weir_proxy::dns::pods(&a.source.objects())
        .iter()
        .map(|p| format!("{} {:?}", p.namespace, p.ips))
        .collect();
    dns.sort();
    assert_eq!(dns, ["demo [198.18.1.11]", "demo [198.18.1.12]"]);
    api.delete(PODS, "demo/web-a", true);
    a.until("pod deleted", |a| a.source.objects().pods.len() == 2)
        .await;
    // A relist of Pods (their watch expired) rebuilds no Service either: no full sync.
    let steps = a.steps.len();
    api.expire(PODS);
    api.apply(PODS, pod("web-d", "198.18.1.14", false));
    a.until("relisted", |a| a.source.objects().pods.len() == 3)
        .await;
    assert!(
        a.steps[steps..].iter().all(|s| *s == Some(0)),
        "{:?}",
        &a.steps[steps..]
    );
}

/// The kubelet's status updates of the Node (conditions, heartbeats, capacity) change nothing
/// the model reads: no full resync. A change of its pod CIDRs, zone or addresses is one.
#[tokio::test]
async fn a_node_heartbeat_is_no_resync_and_a_pod_cidr_change_is() {
    let api = base();
    let mut a = Agent::start(&api);
    a.until("initial list", |a| {
        programmed(&a.maps).get("198.19.0.10:80") == Some(&2)
    })
    .await;
    let events = |a: &Agent| {
        a.source
            .progress
            .events
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    for beat in 0..3 {
        let (steps, seen) = (a.steps.len(), events(&a));
        let mut n = node();
        n["status"] = json!({
            "conditions": [{"type": "Ready", "status": "True",
                            "lastHeartbeatTime": format!("2026-12-07T00:00:0{beat}Z")}],
            "capacity": {"cpu": "2", "memory": format!("{}Ki", 1000 + beat)}});
        api.apply(NODES, n);
        a.until("heartbeat seen", |a| events(a) > seen).await;
        // One more step: whatever the heartbeat marked is taken by now.
        a.until("a step after it", |_| true).await;
        assert!(
            a.steps[steps..].iter().all(|s| *s == Some(0)),
            "heartbeat {beat}: {:?}",
            &a.steps[steps..]
        );
    }
    let steps = a.steps.len();
    let mut n = node();
    n["spec"]["podCIDRs"] = json!(["198.18.2.0/24"]);
    api.apply(NODES, n);
    a.until("the pod CIDR change resynced", |a| {
        a.steps[steps..].iter().any(Option::is_none)
    })
    .await;
}

/// The incremental state keeps problems only for Services that have some: Services created
/// and deleted leave nothing behind, and a problem fixed is forgotten.
#[tokio::test]
async fn deleted_and_fixed_services_leave_no_problem_entries() {
    let api = base();
    let mut a = Agent::start(&api);
    a.until("initial list", |a| {
        programmed(&a.maps).get("198.19.0.10:80") == Some(&2)
    })
    .await;
    for i in 0..20 {
        api.apply(
            SERVICES,
            service(&format!("tmp-{i}"), &format!("198.19.1.{i}")),
        );
    }
    a.until("20 more services", |a| programmed(&a.maps).len() == 21)
        .await;
    for i in 0..20 {
        api.delete(SERVICES, &format!("demo/tmp-{i}"), true);
    }
    a.until("deleted again", |a| programmed(&a.maps).len() == 1)
        .await;
    assert_eq!(a.sync.services_with_problems(), 0);
    // A problem (an externalIP that is no address), then fixed.
    let mut bad = service("bad", "198.19.2.1");
    bad["spec"]["externalIPs"] = json!(["nope"]);
    api.apply(SERVICES, bad);
    a.until("the bad service", |a| a.sync.services_with_problems() == 1)
        .await;
    api.apply(SERVICES, service("bad", "198.19.2.1"));
    a.until("fixed", |a| a.sync.services_with_problems() == 0)
        .await;
}
