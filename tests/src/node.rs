//! A simulated node with the real agent and real programs, and what the tests ask of it.

use weir_proxy::tools::{
    loadtest::Report,
    sandbox::SERVICES,
    sim::{Options, Sim},
};

use crate::*;

pub(crate) fn sim(socket_lb: bool) -> Sim {
    Sim::start(Options {
        weir_bin: weir_bin().unwrap(),
        backends: 3,
        socket_lb,
        services_yaml: SERVICES.into(),
        prefix: "t".into(),
    })
    .expect("build the simulated node")
}

pub(crate) fn assert_spread(what: &str, r: &Report) {
    assert_eq!(
        r.ok, r.sent,
        "{what}: every request answered, errors {:?}",
        r.errors
    );
    let shares = r.shares();
    assert_eq!(
        shares.len(),
        3,
        "{what}: all three backends serve: {shares:?}"
    );
    assert!(
        shares.values().all(|s| (22.0..=45.0).contains(s)),
        "{what}: even spread: {shares:?}"
    );
}

/// (socket LB for the client?, label)
pub(crate) const PATHS: [(bool, &str); 2] = [(true, "socket LB"), (false, "TC path")];

/// One HTTP GET to the agent, from inside the node namespace: (status code, body).
pub(crate) fn get(s: &Sim, port: u16, path: &str) -> (u16, String) {
    let out = weir_testkit::probe::http_get(&s.node.ns, ([127, 0, 0, 1], port).into(), path)
        .unwrap_or_else(|| panic!("GET {path} on port {port}: no answer"));
    let code = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (code, body)
}

/// `/metrics` answers 200 with each of these lines (or line prefixes); its body.
pub(crate) fn assert_metrics(s: &Sim, lines: &[&str]) -> String {
    let (code, body) = get(s, 10249, "/metrics");
    assert_eq!(code, 200);
    for line in lines {
        assert!(body.contains(line), "{line} missing from /metrics:\n{body}");
    }
    body
}

/// Now, as the API server writes times.
pub(crate) fn k8s_openapi_now() -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%S.%NZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A UDP flow whose endpoint leaves the service moves to one that is still in it: its
/// conntrack entries are removed with the backend (kube-proxy's stale-UDP fix), so the next
/// datagram is balanced again. The old pod still answers, so without the purge the flow would
/// stay on it.
/// The sandbox's services plus a UDP Service `198.19.0.21:53` whose one endpoint is `ip`, on
/// port `target`.
pub(crate) fn udp_service_on(ip: &str, target: u16) -> String {
    format!(
        "{SERVICES}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: demo}}\n\
         spec: {{clusterIP: 198.19.0.21, ports: [{{name: dns, port: 53, protocol: UDP, targetPort: {target}}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: dns-1, namespace: demo, labels: {{kubernetes.io/service-name: dns}}}}\n\
         addressType: IPv4\nports: [{{name: dns, port: {target}, protocol: UDP}}]\n\
         endpoints:\n- {{addresses: [{ip}]}}\n"
    )
}

/// The pod programs follow the loader's setting: with none (the agent with its socket hooks
/// on a cgroup v2 root), attaching a pod again removes both filters an earlier run left, and
/// CHECK's question holds; per packet, both are back. CHECK fails while a filter of another
/// setting is on the device.
/// The names of the BPF filters on `dev`'s clsact `dir`, in the calling thread's namespace.
pub(crate) fn filter_names(dev: &str, dir: aya::programs::TcAttachType) -> Vec<String> {
    weir_proxy::datapath::tc_filters(dev, dir)
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect()
}
