//! Cluster DNS over real sockets: `weir dns` in a node namespace, queried from a pod namespace
//! with `dig` (UDP, TCP, truncation) and with the C library's resolver (search path, ndots:5),
//! names outside the cluster relayed to an upstream, answers that follow an edit of the source.
//!
//! Needs root and the release `weir` binary: `cargo xtask test`.
use std::{
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use crate::weir_bin;
use weir_testkit::{tag, Netns, Node, NodeExt, Proc, RunDir};

mod hostile;

const DNS: &str = "198.18.0.53";
const UPSTREAM: &str = "198.18.0.54";
const STUB: &str = "198.18.0.56";

fn zone(web_ip: &str) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: web, namespace: demo}}\n\
         spec: {{clusterIP: {web_ip}, clusterIPs: [{web_ip}, \"fd00:19::10\"], ipFamilies: [IPv4, IPv6],\n\
         ports: [{{name: http, port: 80, protocol: TCP}}]}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: ext, namespace: demo}}\n\
         spec: {{type: ExternalName, externalName: web.demo.svc.example.org}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: db, namespace: demo}}\n\
         spec: {{clusterIP: None, ports: [{{name: pg, port: 5432}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: db-1, namespace: demo, labels: {{kubernetes.io/service-name: db}}}}\n\
         addressType: IPv4\nports: [{{name: pg, port: 5432, protocol: TCP}}]\nendpoints:\n\
         - {{addresses: [198.18.1.21], hostname: db-0}}\n\
         - {{addresses: [198.18.1.22], hostname: db-1}}\n\
         - {{addresses: [198.18.1.23], hostname: db-2, conditions: {{ready: false}}}}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {{name: big, namespace: demo}}\n\
         spec: {{clusterIP: None}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: big-1, namespace: demo, labels: {{kubernetes.io/service-name: big}}}}\n\
         addressType: IPv4\nendpoints:\n"
    );
    for i in 1..=60 {
        y += &format!("- {{addresses: [198.18.3.{i}]}}\n");
    }
    y
}

/// A pod of namespace demo, which `pods verified` answers for while the source has it.
const POD: &str = "---\napiVersion: v1\nkind: Pod\nmetadata: {name: db-0, namespace: demo}\n\
                   status: {podIP: 198.18.1.21, podIPs: [{ip: 198.18.1.21}]}\n";

/// The resolv.conf `ip netns exec` puts in place for a namespace, removed on drop.
struct ResolvConf(PathBuf);

impl ResolvConf {
    fn create(ns: &Netns, text: &str) -> Self {
        let dir = PathBuf::from("/etc/netns").join(&ns.name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
        ResolvConf(dir)
    }
}

impl Drop for ResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `dig` in the namespace, asking the server under test; its full output.
fn dig(ns: &Netns, args: &[&str]) -> String {
    dig_at(ns, DNS, args)
}

/// `dig` in the namespace, asking `server` (2 s, one try); its full output.
fn dig_at(ns: &Netns, server: &str, args: &[&str]) -> String {
    let out = ns
        .command("dig")
        .unwrap()
        .arg(format!("@{server}"))
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The answers `dig +short` prints, sorted.
fn short(ns: &Netns, args: &[&str]) -> Vec<String> {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    let mut v: Vec<String> = dig(ns, &a).lines().map(str::to_string).collect();
    v.sort();
    v
}

fn spawn_dns(node: &Node, source: &std::path::Path, listen: &str, extra: &[&str]) -> Proc {
    let mut cmd = node.ns.command(weir_bin().unwrap()).unwrap();
    cmd.args(["dns", "--source"])
        .arg(format!("file:{}", source.display()))
        .args(["--listen", &format!("{listen}:53")])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc::spawn("weir dns", cmd).unwrap()
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn pods_resolve_cluster_names_over_real_sockets() {
    let t = format!("d{}", tag());
    let dir = RunDir::create(&format!("/run/weir-{t}")).unwrap();
    let mut node = Node::create(&t).unwrap();
    for a in [DNS, UPSTREAM, STUB] {
        node.ns
            .ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])
            .unwrap();
    }
    node.add_pod("cli", 10).unwrap();
    let pod_ns = &node.pod("cli").unwrap().ns;
    let source = dir.0.join("services.yaml");
    std::fs::write(&source, zone("198.19.0.10") + POD).unwrap();
    // The upstream: another server, for the domain example.org.
    let up_source = dir.0.join("upstream.yaml");
    std::fs::write(
        &up_source,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
         spec: {clusterIP: 198.19.7.7, ports: [{port: 80}]}\n",
    )
    .unwrap();
    // Its own upstream is an address nothing answers on (and no route leads to): a query it
    // cannot answer goes nowhere outside the test.
    let upstream = spawn_dns(
        &node,
        &up_source,
        UPSTREAM,
        &["--domain", "example.org", "--upstream", "198.18.0.55"],
    );
    // A stub domain's server, for example.net.
    let stub_source = dir.0.join("stub.yaml");
    std::fs::write(
        &stub_source,
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: demo}\n\
         spec: {clusterIP: 198.19.8.8, ports: [{port: 80}]}\n",
    )
    .unwrap();
    let _stub = spawn_dns(
        &node,
        &stub_source,
        STUB,
        &["--domain", "example.net", "--upstream", "198.18.0.55"],
    );
    let _dns = spawn_dns(
        &node,
        &source,
        DNS,
        &[
            "--upstream",
            &format!("{UPSTREAM}:53"),
            "--stub-domain",
            &format!("example.net={STUB}"),
            "--pods",
            "verified",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while short(pod_ns, &["web.demo.svc.cluster.local", "A"]) != ["198.19.0.10"] {
        assert!(Instant::now() < deadline, "weir dns never answered");
        thread::sleep(Duration::from_millis(100));
    }

    // A and AAAA over UDP and TCP; SRV; PTR.
    for transport in ["+notcp", "+tcp"] {
        assert_eq!(
            short(pod_ns, &[transport, "web.demo.svc.cluster.local", "A"]),
            ["198.19.0.10"],
            "{transport}"
        );
        assert_eq!(
            short(pod_ns, &[transport, "web.demo.svc.cluster.local", "AAAA"]),
            ["fd00:19::10"],
            "{transport}"
        );
    }
    assert_eq!(
        short(pod_ns, &["_http._tcp.web.demo.svc.cluster.local", "SRV"]),
        ["0 100 80 web.demo.svc.cluster.local."]
    );
    assert_eq!(
        short(pod_ns, &["-x", "198.19.0.10"]),
        ["web.demo.svc.cluster.local."]
    );
    // Headless: the ready endpoints, by service and by hostname.
    assert_eq!(
        short(pod_ns, &["db.demo.svc.cluster.local", "A"]),
        ["198.18.1.21", "198.18.1.22"]
    );
    assert_eq!(
        short(pod_ns, &["db-1.db.demo.svc.cluster.local", "A"]),
        ["198.18.1.22"]
    );
    // NXDOMAIN with the SOA, NODATA for a name that exists.
    let out = dig(pod_ns, &["nope.demo.svc.cluster.local", "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{out}");
    assert!(out.contains("AUTHORITY: 1"), "{out}");
    let out = dig(pod_ns, &["web.demo.svc.cluster.local", "MX"]);
    assert!(
        out.contains("status: NOERROR") && out.contains("ANSWER: 0"),
        "{out}"
    );
    // 60 addresses do not fit UDP: truncated there (dig told not to retry), whole over TCP,
    // which dig falls back to by itself.
    let out = dig(
        pod_ns,
        &["+ignore", "+noedns", "big.demo.svc.cluster.local", "A"],
    );
    assert!(out.contains(" tc"), "not truncated over UDP: {out}");
    assert_eq!(
        short(pod_ns, &["big.demo.svc.cluster.local", "A"]).len(),
        60
    );
    // Outside the cluster domain: relayed to the upstream, or to a stub domain's resolver.
    assert_eq!(
        short(pod_ns, &["web.demo.svc.example.org", "A"]),
        ["198.19.7.7"]
    );
    assert_eq!(
        short(pod_ns, &["web.demo.svc.example.net", "A"]),
        ["198.19.8.8"]
    );
    // An ExternalName Service: its CNAME, and the target's address from upstream.
    assert_eq!(
        short(pod_ns, &["ext.demo.svc.cluster.local", "A"]),
        ["198.19.7.7", "web.demo.svc.example.org."]
    );
    // Upstream answers are cached for their TTL (5 s here): with the upstream gone, the name
    // still resolves.
    drop(upstream);
    assert_eq!(
        short(pod_ns, &["web.demo.svc.example.org", "A"]),
        ["198.19.7.7"]
    );
    // An upstream that is gone answers with an ICMP error: SERVFAIL at once, not after the
    // upstream timeout.
    let t0 = Instant::now();
    let out = dig(pod_ns, &["never-asked.demo.svc.example.org", "A"]);
    assert!(out.contains("status: SERVFAIL"), "{out}");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "SERVFAIL after {:?}",
        t0.elapsed()
    );

    // The C library's resolver, as a pod's: search path and ndots:5.
    let _resolv = ResolvConf::create(
        pod_ns,
        &format!(
            "nameserver {DNS}\nsearch demo.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n"
        ),
    );
    let getent = |name: &str| -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &pod_ns.name, "getent", "ahostsv4", name])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for name in ["web", "web.demo", "web.demo.svc"] {
        assert!(
            getent(name).contains("198.19.0.10"),
            "{name}: {}",
            getent(name)
        );
    }

    // `pods verified`: the address of a pod of that namespace, and nothing else.
    let pod_name = "198-18-1-21.demo.pod.cluster.local";
    assert_eq!(short(pod_ns, &[pod_name, "A"]), ["198.18.1.21"]);
    for name in [
        "198-18-1-22.demo.pod.cluster.local",
        "198-18-1-21.other.pod.cluster.local",
    ] {
        let out = dig(pod_ns, &[name, "A"]);
        assert!(out.contains("status: NXDOMAIN"), "{name}: {out}");
    }

    // An edit of the source is answered within the reload interval: the new address, and the
    // pod gone.
    std::fs::write(&source, zone("198.19.0.11")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while short(pod_ns, &["web.demo.svc.cluster.local", "A"]) != ["198.19.0.11"] {
        assert!(Instant::now() < deadline, "the edit was not followed");
        thread::sleep(Duration::from_millis(50));
    }
    let out = dig(pod_ns, &[pod_name, "A"]);
    assert!(out.contains("status: NXDOMAIN"), "{pod_name}: {out}");
}
