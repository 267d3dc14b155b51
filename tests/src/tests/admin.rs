//! kube-proxy's health and metrics ports, and the healthCheckNodePort of a `Local` Service.
use std::{thread, time::Duration};

use weir_proxy::tools::{sandbox::SERVICES, sim::Sim};

use crate::node::*;

/// kube-proxy's health and metrics ports: /healthz follows the node's deletion, /livez does
/// not; /metrics counts syncs, map fill, skipped services and the network programming latency
/// of an EndpointSlice change from its trigger time.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn health_and_metrics_are_served_as_kube_proxy_serves_them() {
    let s = sim(false);
    let (code, body) = get(&s, 10256, "/healthz");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"nodeEligible\": true"), "{body}");
    assert_metrics(
        &s,
        &[
            "kubeproxy_sync_proxy_rules_duration_seconds_count 1\n",
            "weir_map_entries{map=\"services\"} 25\n",
            "weir_map_capacity{map=\"services\"} 2097152\n",
            "weir_map_entries{map=\"conntrack_ipv4\"} ",
            "weir_map_capacity{map=\"conntrack_ipv4\"} 262144\n",
            "weir_map_capacity{map=\"conntrack_ipv6\"} 262144\n",
        ],
    );
    // An EndpointSlice change triggered now, a skipped service, and the node being drained.
    let trigger = k8s_openapi_now();
    let text = SERVICES.replacen(
        "metadata: {name: echo-v4, namespace: demo, labels: {kubernetes.io/service-name: echo}}",
        &format!(
            "metadata: {{name: echo-v4, namespace: demo, labels: {{kubernetes.io/service-name: echo}}, \
             annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{trigger}\"}}}}"
        ),
        1,
    ) + "---\napiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: demo}\n\
         spec: {type: ExternalName, externalName: example.org}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: broken, namespace: demo}\nspec: {ports: oops}\n";
    let text = text.replacen(
        "spec:\n  podCIDR: 198.18.1.0/24\n",
        "spec:\n  taints: [{key: ToBeDeletedByClusterAutoscaler, effect: NoSchedule}]\n  podCIDR: 198.18.1.0/24\n",
        1,
    );
    assert!(text.contains("last-change-trigger-time") && text.contains("ToBeDeleted"));
    s.write_services(&text).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (_, m) = get(&s, 10249, "/metrics");
        if m.contains("kubeproxy_network_programming_duration_seconds_count 1\n") {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        thread::sleep(Duration::from_millis(100));
    };
    // Within a second of the trigger (the agent reads the file every 200 ms).
    assert!(
        metrics.contains("kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weir_objects_skipped{reason=\"ExternalName\"} 1\n"),
        "{metrics}"
    );
    let by = s.status().unwrap().by_service.unwrap();
    let ext = by.iter().find(|r| r.service == "demo/ext").unwrap();
    assert_eq!(
        (ext.state.as_str(), ext.problems.as_slice()),
        ("not programmed", ["ExternalName".to_string()].as_slice())
    );
    // A document that does not read is named from its metadata, with its Service.
    let broken = by.iter().find(|r| r.service == "demo/broken").unwrap();
    assert_eq!(broken.state, "not programmed");
    assert!(
        broken.problems.len() == 1
            && broken.problems[0].starts_with("Service demo/broken: document "),
        "{:?}",
        broken.problems
    );
    let echo = by.iter().find(|r| r.service == "demo/echo").unwrap();
    assert_eq!(
        (echo.state.as_str(), echo.frontends.len()),
        ("programmed", 4)
    );
    let (code, body) = get(&s, 10256, "/healthz");
    assert_eq!(code, 503, "a node being deleted: {body}");
    assert!(body.contains("\"nodeEligible\": false"), "{body}");
    let (code, body) = get(&s, 10256, "/livez");
    assert_eq!(code, 200, "{body}");
}

/// kube-proxy's health check for load balancers: the healthCheckNodePort of an
/// `externalTrafficPolicy: Local` Service answers 200 while the node has a ready endpoint,
/// 503 when it has none, and closes when the Service goes.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_health_check_node_port_follows_local_endpoints() {
    let mut s = sim(true);
    // Short, so that the unhealthy phase below comes quickly.
    s.agent_args = vec!["--health-timeout".into(), "1s".into()];
    s.kill_agent();
    s.start_agent().unwrap();
    let s = s;
    let yaml = |node: &str| {
        format!(
            "{SERVICES}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: lb, namespace: demo}}\n\
             spec: {{type: LoadBalancer, clusterIP: 198.19.0.40, externalTrafficPolicy: Local, healthCheckNodePort: 32100,\n\
             ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30090}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: lb-1, namespace: demo, labels: {{kubernetes.io/service-name: lb}}}}\n\
             addressType: IPv4\nports: [{{name: http, port: 8080}}]\n\
             endpoints: [{{addresses: [198.18.1.11], nodeName: {node}}}]\n"
        )
    };
    let ask = |s: &Sim| -> Option<(u16, String)> {
        s.node
            .ns
            .run(|| {
                use std::io::{Read, Write};
                let mut c = std::net::TcpStream::connect(("127.0.0.1", 32100)).ok()?;
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                write!(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                let mut out = String::new();
                // A connection the kernel took just before the listener closed is reset:
                // the port is going, as a load balancer would see it.
                c.read_to_string(&mut out).ok()?;
                let code = out[9..12].parse().unwrap();
                Some((code, out.split("\r\n\r\n").nth(1).unwrap_or("").to_string()))
            })
            .unwrap()
    };
    let proxy_healthy = |body: &str| {
        serde_json::from_str::<serde_json::Value>(body).ok()?["serviceProxyHealthy"].as_bool()
    };
    let wait = |what: &str, f: &dyn Fn(Option<(u16, String)>) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !f(ask(&s)) {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {:?}\n{}",
                ask(&s),
                s.agent_log_tail()
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    s.write_services(&yaml("sim-node")).unwrap();
    wait("a local endpoint", &|r| r.is_some_and(|(c, _)| c == 200));
    let (_, body) = ask(&s).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 1, "{body}");
    assert_eq!(v["service"]["name"], "lb", "{body}");
    s.write_services(&yaml("node-b")).unwrap();
    wait("no local endpoint", &|r| r.is_some_and(|(c, _)| c == 503));
    // A proxy that cannot program what it is told drains the node whatever its endpoints
    // (kube-proxy's serviceProxyHealthy): a source that stays invalid past the health timeout.
    s.write_services(&yaml("sim-node")).unwrap();
    wait("a local endpoint again", &|r| {
        r.is_some_and(|(c, _)| c == 200)
    });
    s.write_services("kind: [unclosed\n").unwrap();
    wait("an unhealthy proxy", &|r| {
        r.is_some_and(|(c, b)| c == 503 && proxy_healthy(&b) == Some(false))
    });
    let (_, body) = ask(&s).unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 1, "{body}");
    s.write_services(&yaml("sim-node")).unwrap();
    wait("healthy again", &|r| {
        r.is_some_and(|(c, b)| c == 200 && proxy_healthy(&b) == Some(true))
    });
    s.write_services(SERVICES).unwrap();
    wait("the Service gone", &|r| r.is_none());
}

/// Idle connections do not exhaust the agent: each admin server takes a limited number at once
/// (the others are closed and counted) and closes those that send no request in time, so that
/// under a low file descriptor limit an edit of the source made meanwhile is still programmed,
/// and `/healthz` answers again once the idle connections are gone.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn idle_connections_exhaust_neither_the_admin_ports_nor_the_agent() {
    let s = sim(false);
    let pid = s.agent_pid().unwrap();
    let limit = std::process::Command::new("prlimit")
        .args(["--pid", &pid.to_string(), "--nofile=256:256"])
        .status()
        .unwrap();
    assert!(limit.success());
    // More idle connections than the agent has descriptors, all to /healthz.
    let idle = s
        .node
        .ns
        .run(|| {
            (0..400)
                .filter_map(|_| std::net::TcpStream::connect(("127.0.0.1", 10256)).ok())
                .collect::<Vec<_>>()
        })
        .unwrap();
    assert!(idle.len() > 300, "{} connections", idle.len());
    let yaml = format!(
        "{SERVICES}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: late, namespace: demo}}\n\
         spec: {{clusterIP: 198.19.0.45, ports: [{{port: 80}}]}}\n"
    );
    s.write_services(&yaml).unwrap();
    s.wait_programmed("the edit made during the flood", |st| {
        st.services
            .iter()
            .any(|f| f.frontend.starts_with("198.19.0.45:80"))
    })
    .unwrap();
    let body = assert_metrics(&s, &[]);
    let refused: u64 = body
        .lines()
        .find(|l| l.starts_with("weir_admin_connections_refused_total{server=\"healthz\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(refused >= 300, "refused {refused}:\n{body}");
    // The idle ones are closed after the header timeout; /healthz answers again.
    thread::sleep(Duration::from_secs(6));
    assert_eq!(get(&s, 10256, "/healthz").0, 200);
    drop(idle);
}
