//! A simulated node with the real agent and real programs: TCP and UDP through ClusterIPs by
//! the socket-level path and by the TC path, with real sockets in pod namespaces.
//!
//! Needs root and the release `weir` binary: `cargo xtask test`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::{thread, time::Duration};

use weir_proxy::tools::{
    loadtest::Report,
    sandbox::SERVICES,
    sim::{Options, Sim},
};
use weir_testkit::NodeExt;
use weir_tests::weir_bin;

fn sim(socket_lb: bool) -> Sim {
    Sim::start(Options {
        weir_bin: weir_bin().unwrap(),
        backends: 3,
        socket_lb,
        services_yaml: SERVICES.into(),
        prefix: "t".into(),
    })
    .expect("build the simulated node")
}

fn assert_spread(what: &str, r: &Report) {
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
const PATHS: [(bool, &str); 2] = [(true, "socket LB"), (false, "TC path")];

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn tcp_and_udp_through_clusterip_spread_evenly_by_both_paths() {
    let s = sim(true);
    for (socket_lb, path) in PATHS {
        for (target, proto) in [
            ("198.19.0.10:80", "tcp"),
            ("[fd00:19::10]:80", "tcp"),
            ("198.19.0.10:53", "udp"),
        ] {
            let r = s
                .loadtest(
                    &[
                        target,
                        "--proto",
                        proto,
                        "--rate",
                        "600",
                        "--duration",
                        "1s",
                        "--new-conn",
                    ],
                    socket_lb,
                    false,
                )
                .unwrap();
            assert_spread(&format!("{proto} {target} via {path}"), &r);
        }
    }
    // Unconnected UDP goes through sendmsg/recvmsg: replies must come from the service address
    // (the load tester counts any other source as an error).
    let r = s
        .loadtest(
            &[
                "198.19.0.10:53",
                "--proto",
                "udp",
                "--unconnected",
                "--rate",
                "600",
                "--duration",
                "1s",
                "--new-conn",
            ],
            true,
            false,
        )
        .unwrap();
    assert_spread("unconnected UDP via socket LB", &r);
    let st = s.status().unwrap();
    for c in [
        "sock_connect",
        "sock_sendmsg",
        "sock_rev_xlate",
        "dnat_new",
        "rev_nat",
    ] {
        assert!(
            st.counters[c] > 0,
            "counter {c} never moved: {:?}",
            st.counters
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_tc_path_works_with_socket_hooks_off() {
    let mut s = sim(false);
    let load = [
        "198.19.0.10:80",
        "--rate",
        "600",
        "--duration",
        "1s",
        "--new-conn",
    ];
    let r = s.loadtest(&load, false, false).unwrap();
    assert_spread("TCP, agent without socket hooks", &r);
    let st = s.status().unwrap();
    assert_eq!(st.counters["sock_connect"], 0);
    assert!(st.counters["dnat_new"] >= r.sent);
    // Requests and replies of every connection go straight into the pods (a SYN may meet an
    // unresolved neighbour entry and take the neighbour table).
    assert!(
        st.counters["routed_to_pod"] >= r.sent,
        "{} requests, {:?}",
        r.sent,
        st.counters
    );
    assert_eq!(st.pod_veths.len(), s.node.pods.len(), "{:?}", st.pod_veths);
    // On connections kept open, a flow's packets after its first on a CPU are translated from
    // the flow cache: segments of the pods' TCP sockets, cloned, with CHECKSUM_PARTIAL, both
    // ways, IPv4 and IPv6. Every request must still be answered.
    for target in ["198.19.0.10:80", "[fd00:19::10]:80"] {
        let before = s.status().unwrap().counters["flow_cache_hit"];
        let r = s
            .loadtest(
                &[
                    target,
                    "--rate",
                    "600",
                    "--duration",
                    "1s",
                    "--connections",
                    "3",
                ],
                false,
                false,
            )
            .unwrap();
        assert_eq!(
            r.ok, r.sent,
            "{target}, kept connections: errors {:?}",
            r.errors
        );
        let hits = s.status().unwrap().counters["flow_cache_hit"] - before;
        assert!(
            hits >= r.sent,
            "{target}: {hits} packets of {} requests and their replies from the flow cache",
            r.sent
        );
    }
    // With the node's stack forwarding them, none is (the records of the run before go).
    s.agent_args = vec!["--host-routing".into(), "kernel".into()];
    s.kill_agent();
    s.start_agent().unwrap();
    let before = s.status().unwrap();
    assert!(before.pod_veths.is_empty(), "{:?}", before.pod_veths);
    let r = s.loadtest(&load, false, false).unwrap();
    assert_spread("TCP, the node's stack forwarding into pods", &r);
    let after = s.status().unwrap();
    assert_eq!(
        after.counters["routed_to_pod"], before.counters["routed_to_pod"],
        "{:?}",
        after.counters
    );
    assert!(after.counters["dnat_new"] - before.counters["dnat_new"] >= r.sent);
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn session_affinity_holds_by_both_paths() {
    let s = sim(true);
    for (socket_lb, path) in PATHS {
        let r = s
            .loadtest(
                &[
                    "198.19.0.12:80",
                    "--rate",
                    "300",
                    "--duration",
                    "1s",
                    "--new-conn",
                ],
                socket_lb,
                false,
            )
            .unwrap();
        assert_eq!(r.ok, r.sent, "{path}: {:?}", r.errors);
        assert_eq!(
            r.backends.len(),
            1,
            "{path}: one client, one backend: {:?}",
            r.backends
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_service_without_endpoints_is_refused_not_blackholed() {
    let s = sim(true);
    for (socket_lb, path) in PATHS {
        let r = s
            .loadtest(
                &[
                    "198.19.0.13:80",
                    "--rate",
                    "200",
                    "--duration",
                    "500ms",
                    "--new-conn",
                    "--timeout",
                    "2s",
                ],
                socket_lb,
                false,
            )
            .unwrap();
        assert_eq!(r.ok, 0, "{path}");
        assert_eq!(
            r.errors.get("refused"),
            Some(&r.sent),
            "{path}: refused at once, not timed out: {:?}",
            r.errors
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn endpoint_removal_under_load_loses_no_request() {
    let mut s = sim(true);
    for (socket_lb, path) in PATHS {
        s.write_services(SERVICES).unwrap();
        s.wait_programmed("three backends", |st| {
            st.services
                .iter()
                .any(|v| v.frontend == "198.19.0.10:80/TCP" && v.backends.len() == 3)
        })
        .unwrap();
        let running = s
            .loadtest_spawn(
                &[
                    "198.19.0.10:80",
                    "--rate",
                    "500",
                    "--duration",
                    "3s",
                    "--new-conn",
                    "--timeout",
                    "2s",
                ],
                socket_lb,
                false,
            )
            .unwrap();
        thread::sleep(Duration::from_millis(800));
        // Scale down: be-3 leaves the EndpointSlice, then its server goes away for good.
        let without = SERVICES.replacen(
            "- {addresses: [198.18.1.13], conditions: {ready: true}}\n",
            "",
            1,
        );
        assert_ne!(without, SERVICES);
        s.write_services(&without).unwrap();
        s.wait_programmed("be-3 removed", |st| {
            st.services
                .iter()
                .any(|v| v.frontend == "198.19.0.10:80/TCP" && v.backends.len() == 2)
        })
        .unwrap();
        s.stop_echo(3);
        let r = running.wait().unwrap();
        assert_eq!(
            r.ok, r.sent,
            "{path}: no request lost, errors {:?}",
            r.errors
        );
        assert!(
            r.backends.contains_key("be-3"),
            "{path}: be-3 served before it was removed"
        );
        s.start_echo(3).unwrap();
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn agent_restart_keeps_open_connections_and_udp_flows() {
    for (socket_lb, path) in PATHS {
        let mut s = sim(socket_lb);
        // One kept-alive TCP connection and one connected UDP socket, for 3 s.
        let tcp = s
            .loadtest_spawn(
                &[
                    "198.19.0.10:80",
                    "--rate",
                    "200",
                    "--duration",
                    "3s",
                    "--connections",
                    "1",
                ],
                socket_lb,
                false,
            )
            .unwrap();
        let udp = s
            .loadtest_spawn(
                &[
                    "198.19.0.10:53",
                    "--proto",
                    "udp",
                    "--rate",
                    "200",
                    "--duration",
                    "3s",
                    "--connections",
                    "1",
                ],
                socket_lb,
                false,
            )
            .unwrap();
        thread::sleep(Duration::from_millis(800));
        let cli = s.node.pod("cli").unwrap().host_if.clone();
        let before = s.node.pod_programs(&cli).unwrap();
        assert_eq!(before.len(), 1, "{before:?}");
        assert!(before[0].1, "a clsact filter on the pod's veth: {before:?}");
        s.kill_agent();
        thread::sleep(Duration::from_millis(300));
        s.start_agent().unwrap();
        // The new agent's program replaced the old one in the same filter: one, not two.
        let after = s.node.pod_programs(&cli).unwrap();
        assert_eq!(after.len(), 1, "{after:?}");
        assert_ne!(
            after[0].0, before[0].0,
            "the restarted agent's program runs"
        );
        let (t, u) = (tcp.wait().unwrap(), udp.wait().unwrap());
        for (what, r) in [("TCP", &t), ("UDP", &u)] {
            assert_eq!(
                r.ok, r.sent,
                "{path} {what}: no request lost across the restart: {:?}",
                r.errors
            );
            assert_eq!(
                r.backends.len(),
                1,
                "{path} {what}: the flow stayed on its backend: {:?}",
                r.backends
            );
        }
        assert!(
            std::fs::read_to_string(s.agent_log())
                .unwrap()
                .contains("adopted what a previous run programmed"),
            "the restarted agent adopted the pinned state"
        );
    }
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn everything_is_removed_afterwards() {
    let s = sim(true);
    let (ns, cg, mnt, dir) = (
        s.node.ns.name.clone(),
        s.cgroup.path.clone(),
        s.bpffs.path.clone(),
        s.dir().to_path_buf(),
    );
    drop(s);
    assert!(!dir.exists(), "run directory {} left behind", dir.display());
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&ns),
        "namespace {ns} left behind"
    );
    assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(mnt.to_str().unwrap()),
        "bpffs {} left mounted",
        mnt.display()
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_pod_reaches_itself_through_its_service() {
    let s = sim(true);
    // The client pod serves too, and is the only endpoint of a service of its own.
    let cli = s.node.pod("cli").unwrap();
    let mut cmd = cli.ns.command(weir_bin().unwrap()).unwrap();
    cmd.args(["echo-server", "--name", "cli", "--port", "8080"])
        .stdout(std::process::Stdio::null());
    let _server = weir_testkit::Proc::spawn("echo cli", cmd).unwrap();
    let hairpin = format!(
        "{SERVICES}---\napiVersion: v1\nkind: Service\nmetadata: {{name: self, namespace: demo}}\n\
         spec: {{clusterIP: 198.19.0.14, ports: [{{name: tcp, port: 80, targetPort: 8080}}]}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: self, namespace: demo, labels: {{kubernetes.io/service-name: self}}}}\n\
         addressType: IPv4\nports: [{{name: tcp, port: 8080}}]\nendpoints: [{{addresses: [198.18.1.10]}}]\n"
    );
    s.write_services(&hairpin).unwrap();
    s.wait_programmed("the hairpin service", |st| {
        st.services
            .iter()
            .any(|v| v.frontend == "198.19.0.14:80/TCP")
    })
    .unwrap();
    thread::sleep(Duration::from_millis(100));
    for (socket_lb, path) in PATHS {
        let r = s
            .loadtest(
                &[
                    "198.19.0.14:80",
                    "--rate",
                    "200",
                    "--duration",
                    "500ms",
                    "--new-conn",
                ],
                socket_lb,
                false,
            )
            .unwrap();
        assert_eq!(r.ok, r.sent, "{path}: {:?}", r.errors);
        assert_eq!(r.backends.keys().collect::<Vec<_>>(), ["cli"], "{path}");
    }
    assert!(
        s.status().unwrap().counters["hairpin"] > 0,
        "the TC path took the hairpin branch"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn weir_status_shows_what_is_programmed() {
    let s = sim(true);
    s.loadtest(
        &[
            "198.19.0.10:80",
            "--rate",
            "100",
            "--duration",
            "300ms",
            "--new-conn",
        ],
        false,
        false,
    )
    .unwrap();
    let out = std::process::Command::new(weir_bin().unwrap())
        .args(["status", "--json", "--bpffs"])
        .arg(&s.bpffs.path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let services = v["services"].as_array().unwrap();
    let echo = services
        .iter()
        .find(|s| s["frontend"] == "198.19.0.10:80/TCP")
        .expect("demo/echo:tcp is listed");
    assert_eq!(echo["backends"].as_array().unwrap().len(), 3);
    let empty = services
        .iter()
        .find(|s| s["frontend"] == "198.19.0.13:80/TCP")
        .unwrap();
    assert!(empty["backends"].as_array().unwrap().is_empty());
    assert!(v["counters"]["dnat_new"].as_u64().unwrap() >= 30);
    assert!(
        v["conntrack_entries"].as_u64().unwrap() >= 60,
        "two entries per flow"
    );
    let text = std::process::Command::new(weir_bin().unwrap())
        .args(["status", "--bpffs"])
        .arg(&s.bpffs.path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("198.19.0.11:80/TCP") && text.contains("maglev"),
        "{text}"
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_sandbox_removes_everything_on_ctrl_c() {
    let before = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&before.stdout).contains("weir-sbx"),
        "leftovers from an earlier run"
    );
    let mut child = std::process::Command::new(weir_bin().unwrap())
        .args(["sandbox", "--rate", "200", "--duration", "3s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Let it build the node and start loading, then interrupt it like a terminal would.
    thread::sleep(Duration::from_secs(4));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::SIGINT,
    )
    .unwrap();
    let st = child.wait().unwrap();
    assert!(!st.success(), "an interrupted sandbox reports failure");
    let after = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&after.stdout).contains("weir-sbx"),
        "namespaces left behind"
    );
    let cgroups: Vec<_> = std::fs::read_dir(weir_proxy::node::netns::cgroup2_root().unwrap())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("weir-sbx"))
        .collect();
    assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:?}");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mounts.contains("weir-sbx"), "bpffs left mounted");
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn detaching_the_tc_program_takes_the_pod_off_the_tc_path() {
    let s = sim(false);
    let target = [
        "198.19.0.10:80",
        "--rate",
        "100",
        "--duration",
        "300ms",
        "--new-conn",
        "--timeout",
        "300ms",
    ];
    let r = s.loadtest(&target, false, false).unwrap();
    assert_eq!(r.ok, r.sent, "attached: {:?}", r.errors);
    let pins = weir_proxy::datapath::pin_dir(&s.bpffs.path);
    let cli = s.node.pod("cli").unwrap();
    assert_eq!(s.node.pod_programs(&cli.host_if).unwrap().len(), 1);
    let detach = |pins: &weir_proxy::datapath::PinDir| {
        let (pins, dev) = (pins.clone(), cli.host_if.clone());
        // The device lives in the node namespace: resolve it there.
        s.node
            .ns
            .run(move || weir_proxy::datapath::detach_pod_tc(&pins, &dev))
            .unwrap()
            .unwrap()
    };
    detach(&pins);
    let left = s.node.pod_programs(&cli.host_if).unwrap();
    assert!(left.is_empty(), "the client's program is gone: {left:?}");
    // No program translates the VIP now (the node has no route for it either).
    let before = s.status().unwrap().counters["dnat_new"];
    let r = s.loadtest(&target, false, false).unwrap();
    assert_eq!(r.ok, 0, "detached, yet the VIP answered: {:?}", r.backends);
    assert_eq!(
        s.status().unwrap().counters["dnat_new"],
        before,
        "no new flow was translated"
    );
    // Detaching what is not attached is not an error.
    detach(&pins);
}

/// The pod programs follow the loader's setting: with none (the agent with its socket hooks
/// on a cgroup v2 root), attaching a pod again removes both filters an earlier run left, and
/// CHECK's question holds; per packet, both are back. CHECK fails while a filter of another
/// setting is on the device.
/// The names of the BPF filters on `dev`'s clsact `dir`, in the calling thread's namespace.
fn filter_names(dev: &str, dir: aya::programs::TcAttachType) -> Vec<String> {
    weir_proxy::datapath::tc_filters(dev, dir)
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect()
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_pod_programs_follow_the_setting() {
    use weir_proxy::datapath::{Datapath, PodPrograms};
    let s = sim(false);
    let pins = weir_proxy::datapath::pin_dir(&s.bpffs.path);
    let dev = s.node.pod("cli").unwrap().host_if.clone();
    let names = s
        .node
        .ns
        .run(move || {
            let filters = |dir| filter_names(&dev, dir);
            let mut dp = Datapath::load(pins).unwrap();
            let mut seen = Vec::new();
            for p in [
                PodPrograms::PerPacket,
                PodPrograms::None,
                PodPrograms::PerPacket,
            ] {
                // Asked before attaching: the device still has the other setting's programs.
                let before = dp.pod_tc_attached(&dev).unwrap();
                dp.set_pod_programs(p);
                let stale = dp.pod_tc_attached(&dev).unwrap();
                dp.attach_pod_tc(&dev).unwrap();
                seen.push((
                    before,
                    stale,
                    filters(aya::programs::TcAttachType::Ingress),
                    filters(aya::programs::TcAttachType::Egress),
                    dp.pod_tc_attached(&dev).unwrap(),
                ));
            }
            seen
        })
        .unwrap();
    let (i, e) = (
        vec!["tc_from_pod".to_string()],
        vec!["tc_to_pod".to_string()],
    );
    assert_eq!(
        names,
        [
            // The agent's programs are on the device, not this loader's.
            (false, false, i.clone(), e.clone(), true),
            (true, false, vec![], vec![], true),
            (true, false, i, e, true),
        ]
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_pod_veth_recreated_under_its_old_name_is_attached_again() {
    let mut s = sim(false);
    let target = [
        "198.19.0.10:80",
        "--rate",
        "100",
        "--duration",
        "300ms",
        "--new-conn",
        "--timeout",
        "500ms",
    ];
    assert_eq!(s.loadtest(&target, false, false).unwrap().error_count(), 0);
    let old_ip = s.node.pod("cli").unwrap().ip4;
    let index = |s: &Sim| -> u32 {
        let dev = s.node.pod("cli").unwrap().host_if.clone();
        s.node
            .ns
            .run(move || nix::net::if_::if_nametoindex(dev.as_str()).unwrap())
            .unwrap()
    };
    let old_index = index(&s);
    assert!(s.status().unwrap().pod_veths.contains(&old_index));
    s.node.rewire_pod("cli").unwrap();
    // IPAM does not hand a released address out again at once: the pod record follows.
    let cli = s.node.pod("cli").unwrap();
    assert_ne!(
        cli.ip4, old_ip,
        "the pod record has the address of the new ADD"
    );
    let addrs = cli.ns.ip_output(&["addr", "show", "eth0"]).unwrap();
    assert!(addrs.contains(&format!("{}/32", cli.ip4)), "{addrs}");
    // weir-cni DEL and ADD: the new device (same name, new index) gets the program.
    let progs = s.node.pod_programs(&cli.host_if).unwrap();
    assert_eq!(progs.len(), 1, "{progs:?}\n{}", s.agent_log_tail());
    // DEL forgot the old device, ADD recorded the new one: packets to the pod go straight in.
    let (new_index, veths) = (index(&s), s.status().unwrap().pod_veths);
    assert!(
        veths.contains(&new_index) && !veths.contains(&old_index),
        "{old_index} -> {new_index}: {veths:?}"
    );
    let r = s.loadtest(&target, false, false).unwrap();
    assert_eq!(
        r.ok, r.sent,
        "TC path after the veth came back: {:?}",
        r.errors
    );
}

/// The file source is followed: scale a service's endpoints, flip its internal traffic policy
/// (with kube-proxy's fallback to this node's serving terminating endpoint, then a drop when
/// only other nodes have endpoints), delete it, and traffic follows each edit.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn edits_of_the_source_file_are_followed_by_traffic() {
    let s = sim(true);
    let yaml = |policy: &str, eps: &[&str]| -> String {
        let mut y = format!(
            "{SERVICES}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: edit, namespace: demo}}\n\
             spec: {{clusterIP: 198.19.0.20, internalTrafficPolicy: {policy}, ports: [{{name: tcp, port: 80, targetPort: 8080}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: edit-1, namespace: demo, labels: {{kubernetes.io/service-name: edit}}}}\n\
             addressType: IPv4\nports: [{{name: tcp, port: 8080}}]\nendpoints:\n"
        );
        for e in eps {
            y += &format!("- {e}\n");
        }
        y
    };
    // be-1 is on this node (sim-node), be-2 and be-3 are said to be elsewhere.
    let be1 = "{addresses: [198.18.1.11], nodeName: sim-node}";
    let be2 = "{addresses: [198.18.1.12], nodeName: node-b}";
    let be3 = "{addresses: [198.18.1.13], nodeName: node-b}";
    let be1_terminating = "{addresses: [198.18.1.11], nodeName: sim-node, conditions: {ready: false, serving: true, terminating: true}}";
    let be1_gone = "{addresses: [198.18.1.11], nodeName: sim-node, conditions: {ready: false, serving: false, terminating: true}}";
    let run = |socket_lb: bool| {
        s.loadtest(
            &[
                "198.19.0.20:80",
                "--rate",
                "200",
                "--duration",
                "400ms",
                "--new-conn",
                "--timeout",
                "300ms",
            ],
            socket_lb,
            false,
        )
        .unwrap()
    };
    let served = |r: &Report| -> Vec<String> { r.backends.keys().cloned().collect() };
    let frontend = |st: &weir_proxy::tools::status::Status| {
        st.services
            .iter()
            .find(|v| v.frontend == "198.19.0.20:80/TCP")
            .map(|v| (v.backends.len(), v.when_empty))
    };
    // (what, the file, the frontend's programmed backends and empty behaviour)
    type Edit<'a> = (&'a str, String, Option<(usize, &'a str)>);
    let steps: [Edit; 5] = [
        (
            "two endpoints",
            yaml("Cluster", &[be1, be2]),
            Some((2, "reject")),
        ),
        (
            "scaled to three",
            yaml("Cluster", &[be1, be2, be3]),
            Some((3, "reject")),
        ),
        (
            "policy Local",
            yaml("Local", &[be1, be2, be3]),
            Some((1, "reject")),
        ),
        (
            "local one terminating",
            yaml("Local", &[be1_terminating, be2, be3]),
            Some((1, "reject")),
        ),
        (
            "local one not serving",
            yaml("Local", &[be1_gone, be2, be3]),
            Some((0, "drop")),
        ),
    ];
    let want: [&[&str]; 5] = [
        &["be-1", "be-2"],
        &["be-1", "be-2", "be-3"],
        &["be-1"],
        &["be-1"],
        &[],
    ];
    for ((what, text, programmed), want) in steps.iter().zip(want) {
        s.write_services(text).unwrap();
        s.wait_programmed(what, |st| frontend(st) == *programmed)
            .unwrap();
        for (socket_lb, path) in PATHS {
            let before = s.status().unwrap().counters;
            let r = run(socket_lb);
            assert_eq!(served(&r), want, "{what}, {path}: {:?}", r.errors);
            if want.is_empty() {
                // Dropped as kube-proxy drops it: the connection times out, it is not refused.
                assert_eq!(r.ok, 0, "{what}, {path}");
                assert!(
                    r.errors.keys().all(|k| k.contains("timeout")),
                    "{what}, {path}: {:?}",
                    r.errors
                );
                let after = s.status().unwrap().counters;
                assert!(
                    after["drop_no_local_backend"] > before["drop_no_local_backend"],
                    "{what}, {path}: counted as dropped for want of a local endpoint"
                );
            } else {
                assert_eq!(r.ok, r.sent, "{what}, {path}: {:?}", r.errors);
            }
        }
    }
    // A file that is not YAML from some point on says nothing reliable: nothing of it is
    // applied, and what is programmed stays.
    let broken = yaml("Cluster", &[be1, be2]).replacen("kind: Node", "kind: Node\nkind: [", 1);
    s.write_services(&broken).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !std::fs::read_to_string(s.agent_log())
        .unwrap()
        .contains("nothing of it applied")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            s.agent_log_tail()
        );
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(frontend(&s.status().unwrap()), Some((0, "drop")));
    let r = run(true);
    assert_eq!(r.ok, 0, "still the last good state: {:?}", r.backends);
    // Deleted: the frontend goes, nothing else changes.
    s.write_services(SERVICES).unwrap();
    s.wait_programmed("edit deleted", |st| frontend(st).is_none())
        .unwrap();
    let st = s.status().unwrap();
    assert!(st
        .services
        .iter()
        .any(|v| v.frontend == "198.19.0.10:80/TCP" && v.backends.len() == 3));
}

/// One HTTP GET to the agent, from inside the node namespace: (status code, body).
/// `/metrics` answers 200 with each of these lines (or line prefixes); its body.
fn assert_metrics(s: &Sim, lines: &[&str]) -> String {
    let (code, body) = get(s, 10249, "/metrics");
    assert_eq!(code, 200);
    for line in lines {
        assert!(body.contains(line), "{line} missing from /metrics:\n{body}");
    }
    body
}

fn get(s: &Sim, port: u16, path: &str) -> (u16, String) {
    let path = path.to_string();
    s.node
        .ns
        .run(move || {
            use std::io::{Read, Write};
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            write!(
                c,
                "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            let code = out[9..12].parse().unwrap();
            let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
            (code, body)
        })
        .unwrap()
}

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
         spec: {type: ExternalName, externalName: example.org}\n";
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

/// Now, as the API server writes times.
fn k8s_openapi_now() -> String {
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
fn udp_service_on(ip: &str, target: u16) -> String {
    format!(
        "{SERVICES}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: dns, namespace: demo}}\n\
         spec: {{clusterIP: 198.19.0.21, ports: [{{name: dns, port: 53, protocol: UDP, targetPort: {target}}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: dns-1, namespace: demo, labels: {{kubernetes.io/service-name: dns}}}}\n\
         addressType: IPv4\nports: [{{name: dns, port: {target}, protocol: UDP}}]\n\
         endpoints:\n- {{addresses: [{ip}]}}\n"
    )
}

/// An endpoint with no socket on a UDP Service's target port answers each datagram with ICMP
/// port unreachable. The client's socket, connected to the service address, hears of it
/// (ECONNREFUSED) by both paths: by the socket hooks it is connected to the endpoint itself;
/// by the TC path the error, which quotes the datagram as the endpoint got it, is translated
/// back to the service's address and port, as Linux conntrack does for kube-proxy.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_refused_udp_port_behind_a_clusterip_is_reported_to_the_client() {
    for (socket_lb, label) in PATHS {
        let s = sim(socket_lb);
        s.write_services(&udp_service_on("198.18.1.11", 9)).unwrap();
        s.wait_programmed("the closed port", |st| {
            st.services
                .iter()
                .any(|v| v.frontend == "198.19.0.21:53/UDP" && v.backends == ["198.18.1.11:9"])
        })
        .unwrap();
        // Every datagram gets its error: no rate limit in the endpoint's namespace.
        let be1 = s.node.pod("be-1").unwrap();
        be1.ns.sysctl("net.ipv4.icmp_ratelimit", "0").unwrap();
        let before = s.status().unwrap().counters["icmp_error_nat"];
        let args = [
            "198.19.0.21:53",
            "--proto",
            "udp",
            "--rate",
            "20",
            "--duration",
            "1s",
            "--connections",
            "1",
            "--timeout",
            "500ms",
        ];
        let r = s.loadtest(&args, socket_lb, false).unwrap();
        assert!(r.sent >= 15, "{label}: {} sent", r.sent);
        assert_eq!(
            (r.errors.get("refused").copied(), r.errors.len()),
            (Some(r.sent), 1),
            "{label}: every datagram refused, none timed out: {:?}",
            r.errors
        );
        let translated = s.status().unwrap().counters["icmp_error_nat"] - before;
        if socket_lb {
            assert_eq!(translated, 0, "{label}: no error to translate");
        } else {
            assert_eq!(translated, r.sent, "{label}: each error translated once");
        }
    }
}

/// A UDP flow of one socket through `198.19.0.21:53` while its endpoint moves from be-1 to
/// be-2: by the TC path (the socket stays connected to the service address; the flow's
/// conntrack entries go) and by the socket hooks (the socket was connected to be-1 itself: the
/// agent aborts it, the client connects again). Returns the flow's report and the agent's log.
fn udp_flow_across_an_endpoint_change(s: &Sim, socket_lb: bool) -> (Report, String) {
    let on = |ip: &'static str| {
        move |st: &weir_proxy::tools::status::Status| {
            st.services
                .iter()
                .any(|v| v.frontend == "198.19.0.21:53/UDP" && v.backends == [format!("{ip}:8080")])
        }
    };
    s.write_services(&udp_service_on("198.18.1.11", 8080))
        .unwrap();
    s.wait_programmed("on be-1", on("198.18.1.11")).unwrap();
    let args = |target| {
        [
            target,
            "--proto",
            "udp",
            "--rate",
            "200",
            "--duration",
            "2s",
            "--connections",
            "1",
            "--timeout",
            "300ms",
        ]
    };
    let flow = s
        .loadtest_spawn(&args("198.19.0.21:53"), socket_lb, false)
        .unwrap();
    // The same pod by its own address: not the service's doing, so never aborted.
    let direct = s
        .loadtest_spawn(&args("198.18.1.11:8080"), socket_lb, false)
        .unwrap();
    thread::sleep(Duration::from_millis(700));
    s.write_services(&udp_service_on("198.18.1.12", 8080))
        .unwrap();
    s.wait_programmed("on be-2", on("198.18.1.12")).unwrap();
    let r = flow.wait().unwrap();
    let d = direct.wait().unwrap();
    let log = std::fs::read_to_string(s.agent_log()).unwrap();
    assert!(
        r.backends.get("be-2").copied().unwrap_or(0) > 100,
        "the flow moved to be-2: {:?}, errors {:?}\n{}",
        r.backends,
        r.errors,
        s.agent_log_tail()
    );
    assert_eq!(
        (
            d.ok,
            d.sent,
            d.backends.keys().map(|k| k.as_str()).collect::<Vec<_>>()
        ),
        (d.sent, d.sent, vec!["be-1"]),
        "a socket connected to the pod itself stays: {:?}",
        d.errors
    );
    (r, log)
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_udp_flow_leaves_an_endpoint_that_left_the_service() {
    let s = sim(false);
    let (r, log) = udp_flow_across_an_endpoint_change(&s, false);
    // A request in flight while its flow is purged loses its reply (the endpoint answers
    // from its own address then): at most that one, as with kube-proxy's conntrack -D. Seen
    // once in a clean-clone run; every other request is answered.
    assert!(
        r.ok + 1 >= r.sent && r.errors.keys().all(|k| k == "timeout"),
        "at most the datagram in flight is lost: {:?}",
        r.errors
    );
    assert!(
        log.contains("udp_flows_purged=2"),
        "both entries of the flow went: {}",
        s.agent_log_tail()
    );
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_connected_udp_socket_leaves_an_endpoint_that_left_the_service() {
    let s = sim(true);
    let (r, log) = udp_flow_across_an_endpoint_change(&s, true);
    // One request fails on the aborted socket: ECONNABORTED if it was waiting for its reply,
    // else EDESTADDRREQ on the send (an aborted UDP socket is unconnected).
    assert!(
        r.ok + 1 >= r.sent
            && r.errors
                .keys()
                .all(|k| k == "aborted" || k == "disconnected"),
        "at most the request in flight is lost: {:?}",
        r.errors
    );
    assert!(
        log.contains("udp_sockets_aborted=1"),
        "exactly the client's socket was aborted: {}",
        s.agent_log_tail()
    );
}

/// A Service whose endpoint is the node itself (a hostNetwork pod, the API server on a
/// control-plane node), reached by the per-packet path: the replies leave the node itself
/// through the client's veth, which no ingress program sees; `tc_to_pod` gives them the
/// Service's address. TCP and UDP.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_pod_reaches_an_endpoint_on_the_node_itself_by_the_tc_path() {
    use weir_testkit::Proc;
    let s = sim(false);
    s.node
        .ns
        .ip(&["addr", "add", "198.18.0.60/32", "dev", "lo"])
        .unwrap();
    let mut cmd = s.node.ns.command(weir_bin().unwrap()).unwrap();
    // Bound to the endpoint's address, as a hostNetwork server of the node's address answers
    // UDP from it.
    cmd.args(["echo-server", "--name", "node", "--address", "198.18.0.60"])
        .args(["--port", "9090"])
        .stdout(std::process::Stdio::null());
    let _echo = Proc::spawn("echo node", cmd).unwrap();
    s.write_services(&format!(
        "{SERVICES}\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: hostnet, namespace: demo}}\n\
         spec: {{clusterIP: 198.19.0.30, ports: [{{name: tcp, port: 80, targetPort: 9090}}, {{name: udp, port: 80, protocol: UDP, targetPort: 9090}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: hostnet-1, namespace: demo, labels: {{kubernetes.io/service-name: hostnet}}}}\n\
         addressType: IPv4\nports: [{{name: tcp, port: 9090}}, {{name: udp, port: 9090, protocol: UDP}}]\n\
         endpoints: [{{addresses: [198.18.0.60]}}]\n"
    ))
    .unwrap();
    s.wait_programmed("hostnet", |st| {
        st.services
            .iter()
            .any(|v| v.frontend == "198.19.0.30:80/UDP" && v.backends == ["198.18.0.60:9090"])
    })
    .unwrap();
    for proto in ["tcp", "udp"] {
        let r = s
            .loadtest(
                &[
                    "198.19.0.30:80",
                    "--proto",
                    proto,
                    "--rate",
                    "200",
                    "--duration",
                    "1s",
                    "--connections",
                    "4",
                    "--timeout",
                    "500ms",
                ],
                false,
                false,
            )
            .unwrap();
        assert_eq!(
            (
                r.ok,
                r.backends.keys().map(|k| k.as_str()).collect::<Vec<_>>()
            ),
            (r.sent, vec!["node"]),
            "{proto}: every request answered by the node, from the service address: {:?}",
            r.errors
        );
    }
}

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

/// NodePort from outside the cluster, with real packets: a client on the nodes' network
/// reaches the simulated node's NodePort (IPv4 and IPv6, TCP and UDP), served by a pod of the
/// node and by a pod of a second node. The second pod's traffic is source-NATed, so its replies
/// come back through the node; with `externalTrafficPolicy: Local` only the node's own pod
/// serves, with nothing source-NATed. A NodePort whose endpoint is the node itself (a
/// hostNetwork pod) answers too: its replies leave by the uplink's egress, where
/// `tc_to_netdev` translates them.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_outside_client_reaches_a_nodeport_served_here_and_on_another_node() {
    nodeport_from_outside("tc");
}

/// The same with no program on the pod veths (`--pod-programs none`, the agent's choice when
/// its socket hooks sit on the cgroup v2 root): the replies of the node's own pod meet weir
/// only on the uplink's egress.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_outside_client_reaches_a_nodeport_with_no_pod_programs() {
    nodeport_from_outside("none");
}

fn nodeport_from_outside(pod_programs: &str) {
    use weir_testkit::{Lan, Netns, Node, NodeExt, Proc};
    let mut s = sim(true);
    // The nodes' network: this node at .1, node-b at .2, the client at .99.
    let mut lan = Lan::create(&s.tag).unwrap();
    // Checksums checked by every receiver: requests come in with full checksums and replies
    // of the node's pods leave it as CHECKSUM_PARTIAL, completed on the uplink; a rewrite
    // that gets either kind wrong loses them.
    lan.software_checksums();
    lan.join(&s.node.ns, "eth1", &["198.18.0.1/24", "fd00:17::1/64"])
        .unwrap();
    let mut node_b = Node::create(&format!("{}b", s.tag)).unwrap();
    lan.join(&node_b.ns, "eth1", &["198.18.0.2/24", "fd00:17::2/64"])
        .unwrap();
    let outside = Netns::create(&format!("weir-{}-out", s.tag)).unwrap();
    lan.join(&outside, "eth0", &["198.18.0.99/24", "fd00:17::99/64"])
        .unwrap();
    // node-b's pod at 198.18.1.50 / fd00:18::32, routed to through node-b.
    let remote = node_b.add_pod("rp", 50).unwrap();
    let mut echo = remote.ns.command(weir_bin().unwrap()).unwrap();
    echo.args(["echo-server", "--name", "remote", "--port", "8080"])
        .stdout(std::process::Stdio::null());
    let _echo = Proc::spawn("echo remote", echo).unwrap();
    s.node
        .ns
        .ip(&["route", "add", "198.18.1.50/32", "via", "198.18.0.2"])
        .unwrap();
    s.node
        .ns
        .ip(&["-6", "route", "add", "fd00:18::32/128", "via", "fd00:17::2"])
        .unwrap();
    // And node-b back to this node's client pod.
    node_b
        .ns
        .ip(&["route", "add", "198.18.1.10/32", "via", "198.18.0.1"])
        .unwrap();
    node_b
        .ns
        .ip(&["-6", "route", "add", "fd00:18::a/128", "via", "fd00:17::1"])
        .unwrap();

    let yaml = |policy: &str| {
        let slice = |family: &str, local: &str, remote: &str| {
            format!(
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: np-{family}, namespace: demo, labels: {{kubernetes.io/service-name: np}}}}\n\
                 addressType: {family}\nports: [{{name: tcp, port: 8080, protocol: TCP}}, {{name: udp, port: 8080, protocol: UDP}}]\n\
                 endpoints:\n- {{addresses: [\"{local}\"], nodeName: sim-node}}\n- {{addresses: [\"{remote}\"], nodeName: node-b}}\n"
            )
        };
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: sim-node}}\n\
             spec: {{podCIDRs: [198.18.1.0/24, \"fd00:18::/120\"]}}\n\
             status: {{addresses: [{{type: InternalIP, address: 198.18.0.1}}, {{type: InternalIP, address: \"fd00:17::1\"}}]}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: np, namespace: demo}}\n\
             spec: {{type: NodePort, externalTrafficPolicy: {policy}, ipFamilyPolicy: RequireDualStack,\n\
             clusterIP: 198.19.0.30, clusterIPs: [198.19.0.30, \"fd00:19::30\"], ipFamilies: [IPv4, IPv6],\n\
             ports: [{{name: tcp, port: 80, targetPort: 8080, nodePort: 30080, protocol: TCP}},\n\
             {{name: udp, port: 53, targetPort: 8080, nodePort: 30053, protocol: UDP}}]}}\n{}{}",
            slice("IPv4", "198.18.1.11", "198.18.1.50"),
            slice("IPv6", "fd00:18::b", "fd00:18::32"),
        ) + "---\napiVersion: v1\nkind: Service\nmetadata: {name: hostnp, namespace: demo}\n\
             spec: {type: NodePort, clusterIP: 198.19.0.31, ports: [{name: tcp, port: 80, targetPort: 9090, nodePort: 30090},\n\
             {name: udp, port: 53, targetPort: 9090, nodePort: 30091, protocol: UDP}]}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {name: hostnp-1, namespace: demo, labels: {kubernetes.io/service-name: hostnp}}\n\
             addressType: IPv4\nports: [{name: tcp, port: 9090}, {name: udp, port: 9090, protocol: UDP}]\n\
             endpoints: [{addresses: [198.18.0.1], nodeName: sim-node}]\n"
    };
    // The hostNetwork endpoint: a server of the node's namespace on the node's address.
    let mut host = s.node.ns.command(weir_bin().unwrap()).unwrap();
    host.args(["echo-server", "--name", "host", "--address", "198.18.0.1"])
        .args(["--port", "9090"])
        .stdout(std::process::Stdio::null());
    let _host = Proc::spawn("echo host", host).unwrap();
    s.write_services(&yaml("Cluster")).unwrap();
    // The agent again, now with the uplink.
    s.netdevs = vec!["eth1".into()];
    s.agent_args = vec!["--pod-programs".into(), pod_programs.into()];
    s.kill_agent();
    s.start_agent().unwrap();
    let backends_of = |st: &weir_proxy::tools::status::Status, fe: &str| {
        st.services
            .iter()
            .find(|v| v.frontend == fe)
            .map(|v| v.backends.len())
    };
    s.wait_programmed("NodePort, policy Cluster", |st| {
        backends_of(st, "198.18.0.1:30080/TCP") == Some(2)
            && backends_of(st, "[fd00:17::1]:30053/UDP") == Some(2)
    })
    .unwrap();

    let load = |target: &str, proto: &str| -> Report {
        let mut cmd = outside.command(weir_bin().unwrap()).unwrap();
        cmd.args([
            "loadtest",
            target,
            "--proto",
            proto,
            "--rate",
            "200",
            "--duration",
            "500ms",
            "--timeout",
            "500ms",
            "--json",
            "--quiet",
        ]);
        if proto == "tcp" {
            cmd.arg("--new-conn");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "loadtest {target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Report::from_json(&out.stdout).unwrap()
    };
    // What the pod veths carry: the setting's programs, and nothing left of the other's.
    let dev = s.node.pod("be-1").unwrap().host_if.clone();
    let on_veth = s
        .node
        .ns
        .run(move || {
            use aya::programs::TcAttachType::{Egress, Ingress};
            (filter_names(&dev, Ingress), filter_names(&dev, Egress))
        })
        .unwrap();
    let want: (Vec<String>, Vec<String>) = match pod_programs {
        "none" => (vec![], vec![]),
        _ => (vec!["tc_from_pod".into()], vec!["tc_to_pod".into()]),
    };
    assert_eq!(on_veth, want, "{pod_programs}: be-1's veth");
    for (target, proto) in [("198.18.0.1:30090", "tcp"), ("198.18.0.1:30091", "udp")] {
        let r = load(target, proto);
        assert_eq!(r.ok, r.sent, "{target}/{proto}: {:?}", r.errors);
        let served: Vec<&String> = r.backends.keys().collect();
        assert_eq!(served, ["host"], "{target}/{proto}: the node itself");
    }
    // The client pod (its sockets hooked) through the ClusterIP: balanced at `connect` over
    // be-1 and node-b's pod; with no pod programs, its packets to node-b pass only the
    // uplink's egress, untouched.
    for (target, proto) in [("198.19.0.30:80", "tcp"), ("[fd00:19::30]:53", "udp")] {
        let r = s
            .loadtest(
                &[
                    target,
                    "--proto",
                    proto,
                    "--rate",
                    "200",
                    "--duration",
                    "500ms",
                ],
                true,
                false,
            )
            .unwrap();
        assert_eq!(r.ok, r.sent, "{target}/{proto} from a pod: {:?}", r.errors);
        let served: Vec<&String> = r.backends.keys().collect();
        assert_eq!(served, ["be-1", "remote"], "{target}/{proto} from a pod");
    }
    let targets = [
        ("198.18.0.1:30080", "tcp"),
        ("198.18.0.1:30053", "udp"),
        ("[fd00:17::1]:30080", "tcp"),
        ("[fd00:17::1]:30053", "udp"),
    ];
    let before = s.status().unwrap().counters;
    for (target, proto) in targets {
        let r = load(target, proto);
        assert_eq!(r.ok, r.sent, "{target}/{proto}: {:?}", r.errors);
        let served: Vec<&String> = r.backends.keys().collect();
        assert_eq!(served, ["be-1", "remote"], "{target}/{proto}");
    }
    let after = s.status().unwrap().counters;
    assert!(
        after["snat_new"] > before["snat_new"] && after["routed"] > before["routed"],
        "remote endpoints source-NATed, replies routed: {after:?}"
    );
    assert_eq!(after["route_fallback"], before["route_fallback"]);

    // Local policy: only this node's pod, and nothing source-NATed.
    s.write_services(&yaml("Local")).unwrap();
    s.wait_programmed("NodePort, policy Local", |st| {
        st.services
            .iter()
            .any(|v| v.frontend == "198.18.0.1:30080/TCP (external)" && v.backends.len() == 1)
    })
    .unwrap();
    let before = s.status().unwrap().counters;
    for (target, proto) in targets {
        let r = load(target, proto);
        assert_eq!(r.ok, r.sent, "{target}/{proto} Local: {:?}", r.errors);
        let served: Vec<&String> = r.backends.keys().collect();
        // A UDP socket of this run that got the source port of one of the first run's (16
        // sockets each, random ports: it happens, about once in a hundred runs) is that flow,
        // still on its endpoint, as kube-proxy's conntrack keeps it: the policy took no
        // endpoint out of the Service. New flows are what must stay here (no SNAT, below).
        if proto == "tcp" {
            assert_eq!(served, ["be-1"], "{target}/{proto} Local");
        } else {
            assert_eq!(
                served.first().map(|s| s.as_str()),
                Some("be-1"),
                "{target}/{proto} Local"
            );
        }
    }
    let after = s.status().unwrap().counters;
    assert_eq!(
        after["snat_new"], before["snat_new"],
        "Local: no new flow source-NATed"
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

/// kube-proxy's health check for load balancers: the healthCheckNodePort of an
/// `externalTrafficPolicy: Local` Service answers 200 while the node has a ready endpoint,
/// 503 when it has none, and closes when the Service goes.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn the_health_check_node_port_follows_local_endpoints() {
    let s = sim(true);
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
    s.write_services(SERVICES).unwrap();
    wait("the Service gone", &|r| r.is_none());
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

/// PMTU discovery through a NodePort. An outside client is behind a router whose link towards
/// it carries 1280 bytes, though the client's own link (and so the MSS it announces) takes
/// 1500. A pod of the node sends it 256 KiB: every full segment, leaving with the node's
/// address, is too big for that link, and the router says so to the node's address, quoting
/// the segment as it left. Only with that error turned into one to the pod, quoting the
/// segment as the pod sent it, does the pod's socket learn the path's MTU and send smaller
/// segments; otherwise the transfer stalls for good. IPv4 and IPv6.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn pmtu_discovery_works_through_a_nodeport() {
    use std::{
        io::{Read, Write},
        net::{SocketAddr, TcpListener, TcpStream},
    };
    use weir_proxy::node::netns::enter;
    use weir_testkit::{Lan, Netns};
    const SIZE: usize = 256 * 1024;
    let mut s = sim(true);
    let mut lan = Lan::create(&s.tag).unwrap();
    lan.join(&s.node.ns, "eth1", &["198.18.0.1/24", "fd00:17::1/64"])
        .unwrap();
    let router = Netns::create(&format!("weir-{}-rt", s.tag)).unwrap();
    lan.join(&router, "eth0", &["198.18.0.254/24", "fd00:17::fe/64"])
        .unwrap();
    let client = Netns::create(&format!("weir-{}-cl", s.tag)).unwrap();
    router
        .ip(&[
            "link",
            "add",
            "eth1",
            "mtu",
            "1280",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &client.name,
        ])
        .unwrap();
    for (ns, dev, v4, v6, via4, via6, to4, to6) in [
        (
            &router,
            "eth1",
            "198.18.5.1/24",
            "fd00:1b::1/64",
            None,
            None,
            "",
            "",
        ),
        (
            &client,
            "eth0",
            "198.18.5.2/24",
            "fd00:1b::2/64",
            Some("198.18.5.1"),
            Some("fd00:1b::1"),
            "198.18.0.0/24",
            "fd00:17::/64",
        ),
    ] {
        ns.sysctl(&format!("net.ipv6.conf.{dev}.accept_dad"), "0")
            .unwrap();
        ns.ip(&["link", "set", dev, "up"]).unwrap();
        ns.ip(&["addr", "add", v4, "dev", dev]).unwrap();
        ns.ip(&["-6", "addr", "add", v6, "dev", dev, "nodad"])
            .unwrap();
        if let (Some(via4), Some(via6)) = (via4, via6) {
            ns.ip(&["route", "add", to4, "via", via4]).unwrap();
            ns.ip(&["-6", "route", "add", to6, "via", via6]).unwrap();
        }
    }
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv6.conf.all.forwarding", "1"),
        // Every too-big packet gets its error.
        ("net.ipv4.icmp_ratelimit", "0"),
        ("net.ipv6.icmp.ratelimit", "0"),
    ] {
        router.sysctl(key, value).unwrap();
    }
    s.node
        .ns
        .ip(&["route", "add", "198.18.5.0/24", "via", "198.18.0.254"])
        .unwrap();
    s.node
        .ns
        .ip(&["-6", "route", "add", "fd00:1b::/64", "via", "fd00:17::fe"])
        .unwrap();
    let yaml = "apiVersion: v1\nkind: Node\nmetadata: {name: sim-node}\n\
         spec: {podCIDRs: [198.18.1.0/24, \"fd00:18::/120\"]}\n\
         status: {addresses: [{type: InternalIP, address: 198.18.0.1}, {type: InternalIP, address: \"fd00:17::1\"}]}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: big, namespace: demo}\n\
         spec: {type: NodePort, ipFamilyPolicy: RequireDualStack,\n\
         clusterIP: 198.19.0.32, clusterIPs: [198.19.0.32, \"fd00:19::32\"], ipFamilies: [IPv4, IPv6],\n\
         ports: [{name: tcp, port: 80, targetPort: 8081, nodePort: 30081, protocol: TCP}]}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: big-4, namespace: demo, labels: {kubernetes.io/service-name: big}}\n\
         addressType: IPv4\nports: [{name: tcp, port: 8081, protocol: TCP}]\n\
         endpoints: [{addresses: [198.18.1.11], nodeName: sim-node}]\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {name: big-6, namespace: demo, labels: {kubernetes.io/service-name: big}}\n\
         addressType: IPv6\nports: [{name: tcp, port: 8081, protocol: TCP}]\n\
         endpoints: [{addresses: [\"fd00:18::b\"], nodeName: sim-node}]\n";
    s.write_services(yaml).unwrap();
    s.netdevs = vec!["eth1".into()];
    s.kill_agent();
    s.start_agent().unwrap();
    s.wait_programmed("the NodePort", |st| {
        ["198.18.0.1:30081/TCP", "[fd00:17::1]:30081/TCP"]
            .iter()
            .all(|fe| st.services.iter().any(|v| v.frontend == *fe))
    })
    .unwrap();

    // be-1 sends SIZE bytes to each connection, two of them.
    let be1 = s.node.pod("be-1").unwrap().ns.path();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let server = thread::spawn(move || {
        enter(&be1).unwrap();
        let l = TcpListener::bind("[::]:8081").unwrap();
        ready_tx.send(()).unwrap();
        for _ in 0..2 {
            let (mut c, _) = l.accept().unwrap();
            // A client that stalls gives up; so does this side.
            c.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
            let _ = c.write_all(&vec![7u8; SIZE]);
        }
    });
    ready.recv().unwrap();
    let before = s.status().unwrap().counters["icmp_error_nat"];
    let cl = client.path();
    let got = thread::spawn(move || {
        enter(&cl).unwrap();
        ["198.18.0.1:30081", "[fd00:17::1]:30081"].map(|target| {
            let addr: SocketAddr = target.parse().unwrap();
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = Vec::new();
            let _ = c.read_to_end(&mut buf);
            (target, buf.len())
        })
    })
    .join()
    .unwrap();
    server.join().unwrap();
    assert_eq!(
        got,
        [("198.18.0.1:30081", SIZE), ("[fd00:17::1]:30081", SIZE)],
        "every byte arrives"
    );
    let translated = s.status().unwrap().counters["icmp_error_nat"] - before;
    assert!(translated >= 2, "{translated} errors translated");
}
