//! Node-local cluster DNS: the agent answers from its source, the DNS Service's queries stay on
//! the node while its server answers (socket hooks and per-packet path) and fall back to the
//! Service's endpoints when it does not.

use weir_common::{Stat, PROTO_UDP};

use std::{thread, time::Duration};

use weir_proxy::tools::{sandbox::SERVICES, sim::Sim};

use crate::{fixture::*, node::*, *};

/// The cluster DNS Service on the per-packet path (socket hooks off). While the node's server
/// holds its lease, a query goes to it; its reply leaves the node itself through the pod's
/// veth, where `tc_to_pod` gives it the service's address. A packet of the node that is no
/// reply of such a flow leaves as it is. Without the lease, the Service's endpoint.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn node_local_dns_on_the_tc_path_both_ways() {
    let mut d = services();
    for f in [fe(VIP4, 53, PROTO_UDP), fe(VIP6, 53, PROTO_UDP)] {
        d.get_mut(&f).unwrap().node_local = true;
    }
    let mut h = Harness::new().expect("load the production object");
    h.program(&d);
    lease(&h, true);
    run_steps(
        &mut h,
        "node-local",
        vec![
            step(
                udp(CLI4, 40000, VIP4, 53, b"7"),
                OK,
                Out::Exact(udp(CLI4, 40000, NODE4, 53, b"7")),
                &[(Stat::NodeLocal, 1), (Stat::DnatNew, 1)],
            ),
            on(
                TC_TO_POD,
                udp(NODE4, 53, CLI4, 40000, b"a 7"),
                Out::Exact(udp(VIP4, 53, CLI4, 40000, b"a 7")),
                &[(Stat::RevNat, 1)],
            ),
            on(TC_TO_POD, udp(NODE4, 53, CLI4, 40001, b"x"), Out::Same, &[]),
            on(
                TC_TO_POD,
                tcp(NODE4, 22, CLI4, 40000, Tcp::Ack),
                Out::Same,
                &[],
            ),
            step(
                udp(CLI6, 40000, VIP6, 53, b"7"),
                OK,
                Out::Exact(udp(CLI6, 40000, NODE6, 53, b"7")),
                &[(Stat::NodeLocal, 1), (Stat::DnatNew, 1)],
            ),
            on(
                TC_TO_POD,
                udp(NODE6, 53, CLI6, 40000, b"a 7"),
                Out::Exact(udp(VIP6, 53, CLI6, 40000, b"a 7")),
                &[(Stat::RevNat, 1)],
            ),
        ],
    );
    lease(&h, false);
    run_steps(
        &mut h,
        "lease withdrawn",
        vec![
            step(
                udp(CLI4, 40002, VIP4, 53, b"8"),
                OK,
                Out::Exact(udp(CLI4, 40002, BE4, 5353, b"8")),
                &[(Stat::DnatNew, 1)],
            ),
            // The flow that went to the node's server keeps its entries until they expire
            // (its replies on the way out were translated before: from the flow cache now).
            on(
                TC_TO_POD,
                udp(NODE4, 53, CLI4, 40000, b"a 8"),
                Out::Exact(udp(VIP4, 53, CLI4, 40000, b"a 8")),
                &[(Stat::RevNat, 1), (Stat::FlowCacheHit, 1)],
            ),
        ],
    );
}

/// The agent's embedded DNS server answers pods from the same source that programs the data
/// path, and follows its edits.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_agent_answers_cluster_dns_from_its_source() {
    let mut s = sim(true);
    restart_with_dns(&mut s);
    let client = &s.node.pod("cli").unwrap().ns;
    let dig = |name: &str| -> Vec<String> {
        let out = client
            .command("dig")
            .unwrap()
            .args(["@198.18.0.53", "+short", "+time=2", "+tries=1", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(dig("echo.demo.svc.cluster.local"), ["198.19.0.10"]);
    // An edit of the source: a new Service appears in DNS, with an EndpointSlice whose
    // trigger time the DNS programming histogram counts from.
    s.write_services(&format!(
        "{SERVICES}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: late, namespace: demo}}\n\
         spec: {{clusterIP: 198.19.0.77, ports: [{{port: 80}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: late-1, namespace: demo, labels: {{kubernetes.io/service-name: late}},\n\
         annotations: {{endpoints.kubernetes.io/last-change-trigger-time: \"{}\"}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: [198.18.1.11]}}]\n",
        k8s_openapi_now()
    ))
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while dig("late.demo.svc.cluster.local") != ["198.19.0.77"] {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            s.agent_log_tail()
        );
        thread::sleep(Duration::from_millis(50));
    }
    // /metrics counts the replies by type and code, and has the DNS programming histogram.
    let nxdomains = || -> u64 {
        let (_, body) = get(&s, 10249, "/metrics");
        body.lines()
            .find_map(|l| l.strip_prefix("weir_dns_replies_total{type=\"A\",rcode=\"NXDOMAIN\"} "))
            .map_or(0, |n| n.parse().unwrap())
    };
    let before = nxdomains();
    let nx = client
        .command("dig")
        .unwrap()
        .args([
            "@198.18.0.53",
            "+time=2",
            "+tries=1",
            "nope.demo.svc.cluster.local",
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&nx.stdout).contains("NXDOMAIN"));
    assert_eq!(nxdomains(), before + 1);
    let body = assert_metrics(
        &s,
        &[
            "weir_dns_replies_total{type=\"A\",rcode=\"NOERROR\"}",
            "weir_dns_programming_duration_seconds_count 1",
            "weir_dns_reply_duration_seconds_bucket{le=\"+Inf\"}",
        ],
    );
    assert!(
        body.trim_end().ends_with("# EOF"),
        "OpenMetrics end marker last"
    );
}

/// Node-local DNS: a pod's queries to the cluster DNS Service go to its node's agent while the
/// agent answers, to the Service's endpoints (the cluster's own DNS pods) once the agent is
/// gone, and back to the node when it returns. No NOTRACK, no extra address in the pods. By the
/// socket hooks, and by the per-packet path (the agent's replies leave the node itself through
/// the pod's veth, where `tc_to_pod` gives them the Service's address).
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn dns_service_queries_stay_on_the_node_and_fall_back_without_the_agent() {
    dns_queries_stay_on_the_node(true);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn dns_service_queries_stay_on_the_node_by_the_tc_path_too() {
    dns_queries_stay_on_the_node(false);
}

fn dns_queries_stay_on_the_node(socket_lb: bool) {
    use weir_testkit::Proc;
    let mut s = sim(socket_lb);
    // The cluster's DNS deployment: a `weir dns` in pod be-2, with its own answer for web.
    let central = s.dir().join("central.yaml");
    std::fs::write(
        &central,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
         spec: {clusterIP: 198.19.0.99, ports: [{port: 80}]}\n",
    )
    .unwrap();
    let mut cmd = s
        .node
        .pod("be-2")
        .unwrap()
        .ns
        .command(weir_bin().unwrap())
        .unwrap();
    cmd.args(["dns", "--source"])
        .arg(format!("file:{}", central.display()))
        .args(["--listen", "198.18.1.12:53", "--upstream", "198.18.0.55"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _central = Proc::spawn("central dns", cmd).unwrap();
    // The agent's source: kube-dns with be-2 as its endpoint, and web at 198.19.0.20.
    s.write_services(&format!(
        "{SERVICES}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: kube-dns, namespace: kube-system}}\n\
         spec: {{clusterIP: 198.19.0.53, ports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: kube-dns-1, namespace: kube-system, labels: {{kubernetes.io/service-name: kube-dns}}}}\n\
         addressType: IPv4\nports: [{{name: dns, port: 53, protocol: UDP}}, {{name: dns-tcp, port: 53, protocol: TCP}}]\n\
         endpoints: [{{addresses: [198.18.1.12]}}]\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\n\
         spec: {{clusterIP: 198.19.0.20, ports: [{{port: 80}}]}}\n"
    ))
    .unwrap();
    restart_with_dns(&mut s);
    wait_dns(&s, "agent up", "198.19.0.20");
    assert_eq!(ask_dns(&s, "+tcp"), ["198.19.0.20"], "over TCP too");
    let counter = if socket_lb {
        "sock_node_local"
    } else {
        "node_local"
    };
    let st = s.status().unwrap();
    assert!(st.counters[counter] > 0, "{counter}");
    // `weir status` shows the lease.
    let lease = st.node_local_dns.as_ref().expect("a node-local lease");
    assert!(lease.valid_for_ms > 0, "{lease:?}");
    assert!(
        weir_proxy::tools::status::render(&st).contains("node-local DNS: "),
        "{}",
        weir_proxy::tools::status::render(&st)
    );
    // The agent dies without a word (SIGKILL): once its lease runs out, the cluster's DNS.
    s.kill_agent();
    wait_dns(&s, "agent killed", "198.19.0.99");
    assert_eq!(ask_dns(&s, "+tcp"), ["198.19.0.99"], "over TCP too");
    let lease = s.status().unwrap().node_local_dns;
    assert_eq!(lease.map(|l| l.valid_for_ms), Some(0), "the lease ran out");
    // Back on the node when the agent returns.
    s.start_agent().unwrap();
    wait_dns(&s, "agent back", "198.19.0.20");
}

/// `dig @198.19.0.53 web.demo.svc.cluster.local` in the client pod (in the hooked cgroup when
/// the node balances sockets).
fn ask_dns(s: &Sim, transport: &str) -> Vec<String> {
    let mut cmd = s.node.pod("cli").unwrap().ns.command("dig").unwrap();
    if s.opts.socket_lb {
        s.cgroup.adopt(&mut cmd).unwrap();
    }
    let out = cmd
        .args([
            "@198.19.0.53",
            "+short",
            "+time=1",
            "+tries=1",
            transport,
            "web.demo.svc.cluster.local",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits (5 s at most) until `ask_dns` over UDP answers `want`.
fn wait_dns(s: &Sim, what: &str, want: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = ask_dns(s, "+notcp");
        if got == [want] {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: got {got:?}, want {want}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Restarts the agent with its DNS server on 198.18.0.53 (added to the node), its upstream an
/// address nothing answers on.
fn restart_with_dns(s: &mut Sim) {
    s.node
        .ns
        .ip(&["addr", "add", "198.18.0.53/32", "dev", "lo"])
        .unwrap();
    s.agent_args = vec![
        "--dns-listen".into(),
        "198.18.0.53:53".into(),
        "--dns-upstream".into(),
        "198.18.0.55".into(),
    ];
    s.kill_agent();
    s.start_agent().unwrap();
}
