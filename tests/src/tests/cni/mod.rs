//! weir-cni for real: the runtime's calls (ADD, CHECK, DEL, GC, STATUS, VERSION) on a node
//! namespace and pod namespaces made for each test, across every supported version, with
//! Debian's reference plugins beside it where they overlap.
//!
//! Needs root and the release binaries: `cargo xtask test`.
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use crate::weir_bin;
use serde_json::{json, Value};
use weir_proxy::tools::{
    sandbox::SERVICES,
    sim::{topo, Options, Sim},
};
use weir_testkit::{Cni, Netns, Node, NodeExt, RunDir};

mod hostile;

const VERSIONS: [&str; 5] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// Where Debian's containernetworking-plugins live.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

fn cni_bin() -> PathBuf {
    weir_bin().unwrap().with_file_name("weir-cni")
}

/// A node namespace, pod namespaces, and a run directory for IPAM and logs.
/// Field order is drop order: pods, then the node, then the directory.
struct Bed {
    pods: Vec<Netns>,
    node: Node,
    cni: Cni,
    dir: RunDir,
    tag: String,
}

struct Out {
    ok: bool,
    json: Value,
    stderr: String,
}

impl Out {
    fn code(&self) -> u64 {
        self.json["code"].as_u64().unwrap_or(0)
    }
    fn msg(&self) -> &str {
        self.json["msg"].as_str().unwrap_or("")
    }
}

impl Bed {
    fn new() -> Bed {
        let tag = format!("c{}", weir_testkit::tag());
        let dir = RunDir::create(&format!("/run/weir-{tag}")).unwrap();
        let node = Node::create(&tag).unwrap();
        // No agent here: an empty agentSocket runs the plugin alone.
        let cni = Cni::sim(cni_bin(), &dir.0, Path::new(""), 10);
        Bed {
            pods: Vec::new(),
            node,
            cni,
            dir,
            tag,
        }
    }

    fn conf(&self, version: &str) -> Value {
        let mut c = self.cni.conf.clone();
        c["cniVersion"] = version.into();
        c["mtu"] = 1400.into();
        c
    }

    fn ipam_dir(&self) -> PathBuf {
        self.dir.0.join("ipam").join("weir-sim")
    }

    /// A pod namespace, as the runtime makes it before ADD.
    fn pod(&mut self, name: &str) -> usize {
        self.pods
            .push(Netns::create(&format!("weir-{}-{name}", self.tag)).unwrap());
        self.pods.len() - 1
    }

    fn netns(&self, pod: usize) -> PathBuf {
        self.pods[pod].path()
    }

    fn call(&self, command: &str, cid: &str, netns: Option<&Path>, conf: &Value) -> Out {
        self.call_with(&self.cni, command, cid, netns, "eth0", conf)
    }

    fn call_with(
        &self,
        cni: &Cni,
        command: &str,
        cid: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &Value,
    ) -> Out {
        let (ok, stdout, stderr) = cni
            .exec_raw(&self.node.ns, command, cid, netns, ifname, conf)
            .unwrap();
        let json = if stdout.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&stdout)
                .unwrap_or_else(|e| panic!("{command}: stdout is not JSON ({e}): {stdout:?}"))
        };
        Out { ok, json, stderr }
    }

    fn add(&self, pod: usize, conf: &Value) -> Value {
        let o = self.call("ADD", &self.cid(pod), Some(&self.netns(pod)), conf);
        assert!(o.ok, "ADD: {} {}", o.json, o.stderr);
        o.json
    }

    fn cid(&self, pod: usize) -> String {
        format!("cid-{}", self.pods[pod].name)
    }

    /// IPAM records (allocated addresses) left in the data directory.
    fn records(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.ipam_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Links in the node namespace other than lo.
    fn node_links(&self) -> Vec<String> {
        self.node
            .ns
            .ip_output(&["-o", "link", "show"])
            .unwrap()
            .lines()
            .filter_map(|l| {
                l.split(": ")
                    .nth(1)
                    .map(|n| n.split('@').next().unwrap().to_string())
            })
            .filter(|n| n != "lo")
            .collect()
    }

    fn node_routes(&self) -> String {
        self.node.ns.ip_output(&["route", "show"]).unwrap()
            + &self.node.ns.ip_output(&["-6", "route", "show"]).unwrap()
    }
}

/// A TCP connection from pod `from` to `to_ip` where pod `to` listens: real packets through
/// the node's routes.
fn tcp_works(from: &Netns, to: &Netns, to_ip: IpAddr) {
    let addr = SocketAddr::new(to_ip, 7777);
    let server = to
        .run(move || {
            let l = TcpListener::bind(addr).unwrap();
            thread::spawn(move || {
                let (mut s, _) = l.accept().unwrap();
                let mut b = [0u8; 4];
                s.read_exact(&mut b).unwrap();
                s.write_all(&b).unwrap();
            })
        })
        .unwrap();
    let got = from
        .run(move || {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).unwrap();
            s.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b).unwrap();
            b
        })
        .unwrap();
    server.join().unwrap();
    assert_eq!(&got, b"ping");
}

fn addresses(result: &Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            let a = i["address"].as_str().unwrap();
            a.split('/').next().unwrap().parse().unwrap()
        })
        .collect()
}

fn with_prev(conf: &Value, prev: &Value) -> Value {
    let mut c = conf.clone();
    c["prevResult"] = prev.clone();
    c
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn every_command_across_every_version() {
    let mut b = Bed::new();
    for (i, v) in VERSIONS.iter().enumerate() {
        let conf = b.conf(v);
        let version = b.call("VERSION", "", None, &conf);
        assert!(version.ok);
        assert_eq!(version.json["cniVersion"], *v);
        let supported: Vec<&str> = version.json["supportedVersions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert_eq!(supported, VERSIONS);

        let (p, q) = (b.pod(&format!("a{i}")), b.pod(&format!("b{i}")));
        let res = b.add(p, &conf);
        let res_q = b.add(q, &conf);
        assert_eq!(res["cniVersion"], *v, "{res}");
        let ips = res["ips"].as_array().unwrap();
        assert_eq!(ips.len(), 2, "one IPv4 and one IPv6 address: {res}");
        for ip in ips {
            assert_eq!(ip["interface"], 1, "{res}");
            // The `version` field exists before 1.0.0 only.
            assert_eq!(
                ip.get("version").is_some(),
                v.starts_with("0."),
                "{v}: {res}"
            );
        }
        // An interface's `mtu` exists from 1.1.0 on.
        assert_eq!(
            res["interfaces"][1].get("mtu").is_some(),
            *v == "1.1.0",
            "{v}: {res}"
        );
        assert_eq!(res["interfaces"][1]["name"], "eth0");
        assert_eq!(
            res["interfaces"][1]["sandbox"],
            b.netns(p).display().to_string()
        );
        let host_if = res["interfaces"][0]["name"].as_str().unwrap().to_string();
        let addrs = addresses(&res);
        // In the pod: the addresses, IPv6 usable at once (no duplicate address detection).
        let pod_addrs = b.pods[p].ip_output(&["addr", "show", "eth0"]).unwrap();
        for a in &addrs {
            assert!(
                pod_addrs.contains(&a.to_string()),
                "{a} on eth0: {pod_addrs}"
            );
        }
        // The pod's own addresses carry no DAD; the kernel's link-local one may be tentative
        // until the carrier comes up, and nothing routes through it.
        for a in &addrs {
            let line = pod_addrs
                .lines()
                .find(|l| l.contains(&format!("{a}/")))
                .unwrap();
            assert!(!line.contains("tentative"), "no DAD on {a}: {pod_addrs}");
        }
        assert!(pod_addrs.contains("mtu 1400"), "{pod_addrs}");
        // On the node: a host route to each address through the host side.
        let routes = b.node_routes();
        for a in &addrs {
            assert!(
                routes.contains(&format!("{a} dev {host_if}")),
                "route to {a}: {routes}"
            );
        }
        // Real traffic between the two pods, both families, through the node.
        let addrs_q = addresses(&res_q);
        tcp_works(&b.pods[p], &b.pods[q], addrs_q[0]);
        tcp_works(&b.pods[p], &b.pods[q], addrs_q[1]);

        let check = b.call(
            "CHECK",
            &b.cid(p),
            Some(&b.netns(p)),
            &with_prev(&conf, &res),
        );
        if v.starts_with("0.3") {
            assert!(!check.ok, "CHECK does not exist in {v}");
            assert_eq!(check.code(), 1, "{}", check.json);
        } else {
            assert!(check.ok, "CHECK {v}: {}", check.json);
        }
        for cmd in ["STATUS", "GC"] {
            let mut c = conf.clone();
            c["cni.dev/valid-attachments"] = json!([
                {"containerID": b.cid(p), "ifname": "eth0"},
                {"containerID": b.cid(q), "ifname": "eth0"},
            ]);
            let o = b.call(cmd, "", None, &c);
            if *v == "1.1.0" {
                assert!(o.ok, "{cmd} {v}: {}", o.json);
            } else {
                assert_eq!(o.code(), 1, "{cmd} does not exist in {v}: {}", o.json);
            }
        }
        for pod in [p, q] {
            let del = b.call("DEL", &b.cid(pod), Some(&b.netns(pod)), &conf);
            assert!(del.ok, "DEL {v}: {}", del.json);
            assert_eq!(del.json, Value::Null, "DEL prints nothing");
        }
        assert!(b.node_links().is_empty(), "{:?}", b.node_links());
        assert!(b.records().is_empty(), "{:?}", b.records());
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn check_detects_a_missing_route_and_a_missing_address() {
    let mut b = Bed::new();
    let conf = b.conf("1.1.0");
    let p = b.pod("p");
    let res = b.add(p, &conf);
    let check = |b: &Bed| {
        b.call(
            "CHECK",
            &b.cid(p),
            Some(&b.netns(p)),
            &with_prev(&conf, &res),
        )
    };
    assert!(check(&b).ok);

    topo::ip(&["-n", &b.pods[p].name, "route", "del", "198.18.0.0/15"]).unwrap();
    let o = check(&b);
    assert!(!o.ok);
    assert!(o.msg().contains("no route to 198.18.0.0/15"), "{}", o.json);
    topo::ip(&[
        "-n",
        &b.pods[p].name,
        "route",
        "add",
        "198.18.0.0/15",
        "via",
        "169.254.1.1",
        "dev",
        "eth0",
    ])
    .unwrap();
    assert!(check(&b).ok);

    let a6 = addresses(&res)[1];
    topo::ip(&[
        "-n",
        &b.pods[p].name,
        "-6",
        "addr",
        "del",
        &format!("{a6}/128"),
        "dev",
        "eth0",
    ])
    .unwrap();
    let o = check(&b);
    assert!(!o.ok);
    assert!(
        o.msg().contains(&format!("no address {a6}/128")),
        "{}",
        o.json
    );

    // CHECK of a container whose namespace is gone: the spec's "container unknown".
    let gone = b.call(
        "CHECK",
        &b.cid(p),
        Some(Path::new("/run/netns/weir-nonexistent")),
        &with_prev(&conf, &res),
    );
    assert_eq!(gone.code(), 3, "{}", gone.json);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn del_is_idempotent_also_after_the_namespace_is_gone() {
    let mut b = Bed::new();
    let conf = b.conf("1.0.0");
    let p = b.pod("p");
    let cid = b.cid(p);
    let netns = b.netns(p);
    b.add(p, &conf);
    // The runtime deleted the namespace first (the pod side went with it).
    b.pods.clear();
    // The kernel tears the namespace down in the background; the veth goes with it.
    for _ in 0..100 {
        if b.node_links().is_empty() {
            break;
        }
        thread::sleep(Duration::from_millis(30));
    }
    assert_eq!(b.node_links().len(), 0, "the veth dies with the namespace");
    assert_eq!(b.records().len(), 2, "the addresses are still allocated");
    for _ in 0..2 {
        let del = b.call("DEL", &cid, Some(&netns), &conf);
        assert!(del.ok, "DEL: {}", del.json);
        assert!(b.records().is_empty());
    }
    // Without CNI_NETNS at all.
    let del = b.call("DEL", &cid, None, &conf);
    assert!(del.ok, "DEL without a namespace: {}", del.json);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_failed_add_leaves_no_address_link_or_route() {
    let mut b = Bed::new();
    let p = b.pod("p");
    let routes_before = b.node_routes();
    let cases: Vec<(&str, Value, u64, &str)> = vec![
        // Fails after the addresses, the veth and the pod's addresses exist.
        (
            "unreachable gateway",
            {
                let mut c = b.conf("1.1.0");
                c["ipam"]["routes"] = json!([{"dst": "198.18.0.0/15", "gw": "198.18.250.1"}]);
                c
            },
            102,
            "route 198.18.0.0/15 via 198.18.250.1",
        ),
        // Fails at the last step: the agent does not answer.
        (
            "no agent",
            {
                let mut c = b.conf("1.1.0");
                c["agentSocket"] = json!(b.dir.0.join("nobody.sock"));
                c
            },
            103,
            "the agent did not attach",
        ),
        // Fails before anything: a range of the wrong shape.
        (
            "bad range",
            {
                let mut c = b.conf("1.1.0");
                c["ipam"]["ranges"] =
                    json!([[{"subnet": "198.18.1.0/24", "rangeStart": "198.18.9.1"}]]);
                c
            },
            7,
            "outside the subnet",
        ),
    ];
    for (what, conf, code, msg) in cases {
        let o = b.call("ADD", &b.cid(p), Some(&b.netns(p)), &conf);
        assert!(!o.ok, "{what}: ADD should fail");
        assert_eq!(o.code(), code, "{what}: {}", o.json);
        assert!(o.msg().contains(msg), "{what}: {}", o.json);
        assert!(
            b.node_links().is_empty(),
            "{what}: links left {:?}",
            b.node_links()
        );
        assert!(
            b.records().is_empty(),
            "{what}: addresses left {:?}",
            b.records()
        );
        assert_eq!(b.node_routes(), routes_before, "{what}: routes left");
        let pod_links = b.pods[p].ip_output(&["-o", "link", "show"]).unwrap();
        assert!(!pod_links.contains("eth0"), "{what}: {pod_links}");
    }
    // Missing namespace: the spec's "container unknown", nothing allocated.
    let o = b.call(
        "ADD",
        "cid-x",
        Some(Path::new("/run/netns/weir-nonexistent")),
        &b.conf("1.1.0"),
    );
    assert_eq!(o.code(), 3, "{}", o.json);
    assert!(b.records().is_empty());
    // The same pod then gets its network on a good configuration.
    b.add(p, &b.conf("1.1.0"));
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn bad_environment_or_configuration_is_a_clear_error_and_changes_nothing() {
    let mut b = Bed::new();
    let p = b.pod("p");
    let netns = b.netns(p);
    // CNI_NETNS missing on ADD.
    let mut cmd = b.node.ns.command(cni_bin()).unwrap();
    let out = cmd
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "c1")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(!out.status.success());
    assert_eq!(err["code"], 4, "{err}");
    assert!(err["msg"].as_str().unwrap().contains("CNI_NETNS"), "{err}");
    // Malformed configuration.
    let o = b.call("ADD", "c1", Some(&netns), &json!("not a configuration"));
    assert_eq!(o.code(), 6, "{}", o.json);
    // A configuration past the size limit is not read whole.
    let mut huge = b.conf("1.1.0");
    huge["padding"] = "x".repeat(2 << 20).into();
    let o = b.call("ADD", "c1", Some(&netns), &huge);
    assert_eq!(o.code(), 6, "{}", o.json);
    assert!(o.msg().contains("over 1048576 bytes"), "{}", o.json);
    let mut c = b.conf("1.1.0");
    c["ipam"]["type"] = "host-local".into();
    let o = b.call("ADD", "c1", Some(&netns), &c);
    assert_eq!(o.code(), 2, "{}", o.json);
    assert!(o.msg().contains("ipam.type"), "{}", o.json);
    assert!(b.node_links().is_empty());
    assert!(b.records().is_empty());
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn sixty_four_concurrent_adds_get_distinct_addresses() {
    let mut b = Bed::new();
    let conf = b.conf("1.1.0");
    let pods: Vec<usize> = (0..64).map(|i| b.pod(&format!("p{i}"))).collect();
    let results: Vec<Value> = thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .map(|&p| {
                let (b, conf) = (&b, &conf);
                s.spawn(move || b.add(p, conf))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let v4: BTreeSet<IpAddr> = results.iter().map(|r| addresses(r)[0]).collect();
    let v6: BTreeSet<IpAddr> = results.iter().map(|r| addresses(r)[1]).collect();
    assert_eq!((v4.len(), v6.len()), (64, 64));
    assert_eq!(b.records().len(), 128);
    assert_eq!(b.node_links().len(), 64);
    tcp_works(
        &b.pods[pods[0]],
        &b.pods[pods[63]],
        addresses(&results[63])[0],
    );
    thread::scope(|s| {
        for &p in &pods {
            let (b, conf) = (&b, &conf);
            s.spawn(move || {
                let o = b.call("DEL", &b.cid(p), Some(&b.netns(p)), conf);
                assert!(o.ok, "{}", o.json);
            });
        }
    });
    assert!(b.records().is_empty());
    assert!(b.node_links().is_empty());
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn gc_reclaims_exactly_the_attachments_not_in_the_list() {
    let mut b = Bed::new();
    let conf = b.conf("1.1.0");
    let pods: Vec<usize> = (0..4).map(|i| b.pod(&format!("p{i}"))).collect();
    let results: Vec<Value> = pods.iter().map(|&p| b.add(p, &conf)).collect();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([
        {"containerID": b.cid(pods[0]), "ifname": "eth0"},
        {"containerID": b.cid(pods[2]), "ifname": "eth0"},
    ]);
    let o = b.call("GC", "", None, &gc);
    assert!(o.ok, "GC: {}", o.json);
    let kept: BTreeSet<String> = [0, 2]
        .iter()
        .flat_map(|&i| addresses(&results[i]))
        .map(|a| a.to_string())
        .collect();
    assert_eq!(b.records(), kept);
    let links = b.node_links();
    assert_eq!(links.len(), 2, "{links:?}");
    for i in [0, 2] {
        assert!(links.contains(
            &results[i]["interfaces"][0]["name"]
                .as_str()
                .unwrap()
                .to_string()
        ));
        let check = b.call(
            "CHECK",
            &b.cid(pods[i]),
            Some(&b.netns(pods[i])),
            &with_prev(&conf, &results[i]),
        );
        assert!(check.ok, "a valid attachment is untouched: {}", check.json);
    }
    let routes = b.node_routes();
    for i in [1, 3] {
        for a in addresses(&results[i]) {
            assert!(
                !routes.contains(&a.to_string()),
                "route to {a} reclaimed: {routes}"
            );
        }
    }
    // GC without the list would reclaim everything: refused.
    let o = b.call("GC", "", None, &conf);
    assert_eq!(o.code(), 7, "{}", o.json);
    assert_eq!(b.records().len(), 4);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn status_fails_when_the_range_is_exhausted_or_the_agent_is_away() {
    let mut b = Bed::new();
    let mut conf = b.conf("1.1.0");
    conf["ipam"]["ranges"] = json!([[{"subnet": "198.18.1.0/30"}]]);
    assert!(b.call("STATUS", "", None, &conf).ok);
    let pods: Vec<usize> = (0..3).map(|i| b.pod(&format!("p{i}"))).collect();
    b.add(pods[0], &conf);
    b.add(pods[1], &conf);
    let o = b.call("STATUS", "", None, &conf);
    assert_eq!(o.code(), 50, "{}", o.json);
    assert!(o.msg().contains("198.18.1.1-198.18.1.2"), "{}", o.json);
    let o = b.call("ADD", &b.cid(pods[2]), Some(&b.netns(pods[2])), &conf);
    assert_eq!(o.code(), 100, "{}", o.json);
    assert!(o.msg().contains("no free address"), "{}", o.json);
    assert!(
        b.call("DEL", &b.cid(pods[1]), Some(&b.netns(pods[1])), &conf)
            .ok
    );
    assert!(b.call("STATUS", "", None, &conf).ok);

    let mut away = b.conf("1.1.0");
    away["agentSocket"] = json!(b.dir.0.join("nobody.sock"));
    let o = b.call("STATUS", "", None, &away);
    assert_eq!(o.code(), 50, "{}", o.json);
    assert!(o.msg().contains("agent is not ready"), "{}", o.json);
}

/// Runs a conflist the way libcni does: each plugin gets the list's name and version and the
/// previous plugin's result; DEL goes in reverse order.
fn run_conflist(b: &Bed, list: &Value, command: &str, pod: usize) -> Value {
    let plugins = list["plugins"].as_array().unwrap();
    let order: Vec<&Value> = if command == "DEL" {
        plugins.iter().rev().collect()
    } else {
        plugins.iter().collect()
    };
    let mut prev = Value::Null;
    for p in order {
        let mut conf = p.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if !prev.is_null() {
            conf["prevResult"] = prev.clone();
        }
        let kind = p["type"].as_str().unwrap();
        let bin = if kind == "weir-cni" {
            cni_bin()
        } else if kind.starts_with('/') {
            PathBuf::from(kind)
        } else {
            Path::new(REFERENCE_PLUGINS).join(kind)
        };
        let cni = Cni {
            bin,
            conf: conf.clone(),
        };
        let o = b.call_with(
            &cni,
            command,
            &b.cid(pod),
            Some(&b.netns(pod)),
            "eth0",
            &conf,
        );
        assert!(o.ok, "{command} {kind}: {} {}", o.json, o.stderr);
        if command == "ADD" {
            prev = o.json;
        }
    }
    prev
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn chained_in_a_conflist_before_and_after_other_plugins() {
    let mut b = Bed::new();
    let p = b.pod("p");
    // A first plugin that only reports (as a metadata plugin would): weir keeps its result.
    let first = b.dir.0.join("first-plugin");
    std::fs::write(
        &first,
        "#!/bin/sh\ncat >/dev/null\n[ \"$CNI_COMMAND\" = ADD ] && echo '{\"cniVersion\":\"1.0.0\",\
         \"interfaces\":[{\"name\":\"meta0\"}],\"ips\":[],\"dns\":{\"nameservers\":[\"198.18.0.53\"]}}'\nexit 0\n",
    )
    .unwrap();
    std::fs::set_permissions(&first, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut weir = b.conf("1.0.0");
    weir.as_object_mut().unwrap().remove("cniVersion");
    weir.as_object_mut().unwrap().remove("name");
    let list = json!({
        "cniVersion": "1.0.0",
        "name": "weir-sim",
        "plugins": [
            {"type": first.to_string_lossy()},
            weir,
            // Debian's tuning reads weir's result to find the pod's interface.
            {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.arp_notify": "1"}},
        ],
    });
    let res = run_conflist(&b, &list, "ADD", p);
    assert_eq!(res["interfaces"][0]["name"], "meta0", "{res}");
    assert_eq!(res["interfaces"][2]["name"], "eth0", "{res}");
    assert_eq!(
        res["ips"][0]["interface"], 2,
        "indices shifted past meta0: {res}"
    );
    assert_eq!(res["dns"]["nameservers"][0], "198.18.0.53", "{res}");
    let arp_notify = b.pods[p]
        .run(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/arp_notify").unwrap())
        .unwrap();
    assert_eq!(
        arp_notify.trim(),
        "1",
        "tuning found eth0 from weir's result"
    );
    // CHECK through the chain with the final result, then DEL in reverse.
    let mut check = weir_conf_of(&list, 1);
    check["prevResult"] = res.clone();
    let o = b.call("CHECK", &b.cid(p), Some(&b.netns(p)), &check);
    assert!(o.ok, "CHECK with the chained result: {}", o.json);
    run_conflist(&b, &list, "DEL", p);
    assert!(b.records().is_empty());
    assert!(b.node_links().is_empty());
}

fn weir_conf_of(list: &Value, i: usize) -> Value {
    let mut c = list["plugins"][i].clone();
    c["name"] = list["name"].clone();
    c["cniVersion"] = list["cniVersion"].clone();
    c
}

/// The keys of a JSON value, as paths (`ips[].address`): its shape without its values.
fn shape(v: &Value, at: &str, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let p = format!("{at}.{k}");
                out.insert(p.clone());
                shape(v, &p, out);
            }
        }
        Value::Array(a) => {
            for v in a {
                shape(v, &format!("{at}[]"), out);
            }
        }
        _ => {}
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn results_have_the_shape_of_the_reference_ptp_and_host_local() {
    let mut b = Bed::new();
    // ptp 1.1.1 (Debian) speaks up to 1.0.0.
    for (i, v) in ["0.3.1", "0.4.0", "1.0.0"].iter().enumerate() {
        let shared = json!({
            "cniVersion": v,
            "name": "weir-sim",
            "mtu": 1400,
            "ipam": {
                "ranges": [[{"subnet": "198.18.1.0/24"}], [{"subnet": "fd00:18::/120"}]],
                "routes": [{"dst": "198.18.0.0/15"}, {"dst": "fd00::/8"}],
                "dataDir": b.dir.0.join(format!("ipam-ref-{i}")),
            },
        });
        let mut ptp = shared.clone();
        ptp["type"] = "ptp".into();
        ptp["ipam"]["type"] = "host-local".into();
        let mut weir = shared.clone();
        weir["type"] = "weir-cni".into();
        weir["agentSocket"] = "".into();
        weir["ipam"]["dataDir"] = json!(b.dir.0.join(format!("ipam-weir-{i}")));
        let (pp, pw) = (b.pod(&format!("ptp{i}")), b.pod(&format!("weir{i}")));
        let ref_cni = Cni {
            bin: Path::new(REFERENCE_PLUGINS).join("ptp"),
            conf: ptp.clone(),
        };
        let run_ref = |cmd: &str| {
            let o = b.call_with(&ref_cni, cmd, &b.cid(pp), Some(&b.netns(pp)), "eth0", &ptp);
            assert!(o.ok, "ptp {cmd} {v}: {} {}", o.json, o.stderr);
            o.json
        };
        let want = run_ref("ADD");
        let got = b.add(pw, &weir);
        let (mut ws, mut gs) = (BTreeSet::new(), BTreeSet::new());
        shape(&want, "", &mut ws);
        shape(&got, "", &mut gs);
        assert_eq!(gs, ws, "{v}: weir {got}\nptp {want}");
        // Both interfaces and both families, in the same order of roles.
        assert_eq!(
            got["interfaces"].as_array().unwrap().len(),
            want["interfaces"].as_array().unwrap().len()
        );
        assert_eq!(
            got["ips"].as_array().unwrap().len(),
            want["ips"].as_array().unwrap().len()
        );
        assert_eq!(got["routes"], want["routes"], "{v}");
        run_ref("DEL");
        assert!(b.call("DEL", &b.cid(pw), Some(&b.netns(pw)), &weir).ok);
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_agent_attaches_the_pod_program_before_add_returns_and_releases_it_on_del() {
    let mut s = Sim::start(Options {
        weir_bin: weir_bin().unwrap(),
        backends: 1,
        socket_lb: false,
        services_yaml: SERVICES.into(),
        prefix: "t".into(),
    })
    .unwrap();
    let pinned = |s: &Sim, dev: &str| s.node.pod_programs(dev).unwrap().len() == 1;
    // A new pod, then straight away (no waiting) its link must be pinned.
    let pod = s.node.add_pod_cni("late", 12).unwrap();
    let (host_if, netns, cid) = (pod.host_if.clone(), pod.ns.path(), pod.ns.name.clone());
    assert!(
        pinned(&s, &host_if),
        "tc_from_pod on {host_if} before ADD returned"
    );
    // By the plugin's request, not by the agent's poll of new devices.
    let log = std::fs::read_to_string(s.agent_log()).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("attached tc_from_pod") && l.contains(&format!("dev={host_if}")))
        .unwrap_or_else(|| panic!("no attach of {host_if} in the agent log:\n{log}"));
    assert!(
        line.contains("weir-cni"),
        "attached through the socket: {line}"
    );
    // The agent wrote the Node's podCIDRs; a configuration without ranges uses them.
    let cidrs = std::fs::read_to_string(s.pod_cidrs_file()).unwrap();
    assert_eq!(cidrs, r#"{"podCIDRs":["198.18.1.0/24","fd00:18::/120"]}"#);
    let cni = s.node.cni.clone().unwrap();
    let mut from_node = cni.conf.clone();
    from_node["ipam"].as_object_mut().unwrap().remove("ranges");
    from_node["ipam"]["podCIDRsFile"] = json!(s.pod_cidrs_file());
    from_node["ipam"]["dataDir"] = json!(s.dir().join("ipam-node"));
    let extra = Netns::create(&format!("weir-{}-extra", s.tag)).unwrap();
    let out = cni
        .exec(
            &s.node.ns,
            "ADD",
            "cid-extra",
            Some(&extra.path()),
            "eth0",
            &from_node,
        )
        .unwrap();
    let res: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(res["ips"][0]["address"], "198.18.1.1/32", "{res}");
    assert_eq!(res["ips"][1]["address"], "fd00:18::1/128", "{res}");
    // CHECK asks the agent too: with the link gone, it fails.
    let mut check = cni.conf.clone();
    check["prevResult"] = res.clone();
    check["ipam"] = from_node["ipam"].clone();
    let extra_if = res["interfaces"][0]["name"].as_str().unwrap().to_string();
    cni.exec(
        &s.node.ns,
        "CHECK",
        "cid-extra",
        Some(&extra.path()),
        "eth0",
        &check,
    )
    .unwrap();
    assert!(pinned(&s, &extra_if));
    let (pins, dev) = (
        weir_proxy::datapath::pin_dir(&s.bpffs.path),
        extra_if.clone(),
    );
    s.node
        .ns
        .run(move || weir_proxy::datapath::detach_pod_tc(&pins, &dev))
        .unwrap()
        .unwrap();
    let (ok, out, _) = cni
        .exec_raw(
            &s.node.ns,
            "CHECK",
            "cid-extra",
            Some(&extra.path()),
            "eth0",
            &check,
        )
        .unwrap();
    assert!(
        !ok && out.contains("tc_from_pod and tc_to_pod do not both run on"),
        "{out}"
    );
    cni.exec(
        &s.node.ns,
        "DEL",
        "cid-extra",
        Some(&extra.path()),
        "eth0",
        &from_node,
    )
    .unwrap();
    // The pod made through the sim's configuration goes the same way.
    cni.exec(&s.node.ns, "DEL", &cid, Some(&netns), "eth0", &cni.conf)
        .unwrap();
    assert!(
        s.node.tc_ingress(&host_if).is_err(),
        "DEL deleted {host_if}, and its filter with it"
    );
    s.node.pods.retain(|p| p.name != "late");
}

/// A client of the agent's weir-cni socket that connects and says nothing holds up no other:
/// each client is served on a task of its own (one that waited for it would answer the next
/// only once the silent one timed out), and the silent one is let go after its request
/// timeout.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_silent_client_of_the_agent_socket_holds_up_no_other() {
    let s = Sim::start(Options {
        weir_bin: weir_bin().unwrap(),
        backends: 1,
        socket_lb: false,
        services_yaml: SERVICES.into(),
        prefix: "t".into(),
    })
    .unwrap();
    let mut silent = std::os::unix::net::UnixStream::connect(s.cni_socket()).unwrap();
    // Accepted, and waiting for its request line.
    thread::sleep(Duration::from_millis(200));
    // Well within the silent client's request timeout (2 s).
    let ping = weir_cni_proto::call(
        &s.cni_socket(),
        &weir_cni_proto::Request::Ping,
        Duration::from_millis(1000),
    );
    assert_eq!(ping, Ok(()), "{}", s.agent_log_tail());
    // The silent one is closed once its time is up.
    silent
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut rest = Vec::new();
    silent.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}
