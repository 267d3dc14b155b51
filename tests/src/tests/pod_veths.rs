//! Pod veths: translated packets handed straight into pods, the pod programs attached, detached
//! and following `--pod-programs`, and a veth re-created under its old name.

use weir_common::{Stat, PROTO_TCP};
use weir_proxy::datapath::addr::to_addr;

use weir_proxy::tools::sim::Sim;

use crate::{fixture::*, node::*, *};

/// `frame` with these Ethernet addresses (destination, source).
fn with_macs(mut frame: Vec<u8>, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    frame[..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame
}

/// Translated packets to a pod of the node (its host-side veth recorded by the agent) are
/// handed straight into the pod: Ethernet addresses from the neighbour table, the TTL one
/// less, `bpf_redirect_peer`'s verdict; requests and replies, new and established flows, IPv4
/// and IPv6. A device that is not a veth with its peer in another namespace is refused. A flow
/// to a backend that is no pod's is left to the kernel's forwarding, for good (its forward
/// entry says so); a pod whose neighbour entry is not resolved gets the neighbour table.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn translated_packets_to_a_pod_go_straight_into_it() {
    use weir_common::{CtKey, CT_F_KERNEL_ROUTE, CT_F_POD_ROUTE};
    const VETH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xaa];
    const BE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x0b];
    const CLI_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x0a];
    let mut desired = services();
    // A backend behind the uplink (another node's), and a pod the node has not talked to.
    desired.insert(fe("198.19.0.20", 80, PROTO_TCP), svc(&["198.18.2.5:8080"]));
    desired.insert(fe("198.19.0.21", 80, PROTO_TCP), svc(&["198.18.1.12:8080"]));
    let mut h = Harness::new().unwrap();
    h.program(&desired);
    h.ns.ip(&["link", "set", "pods0", "address", "02:00:00:00:00:aa"])
        .unwrap();
    let pod = h
        .pods_in_a_namespace(&[
            (BE4, "02:00:00:00:01:0b"),
            (CLI4, "02:00:00:00:01:0a"),
            (BE6, "02:00:00:00:01:0b"),
            (CLI6, "02:00:00:00:01:0a"),
        ])
        .unwrap();
    let (pods0, up) = (h.ifindex("pods0"), h.ifindex(UPLINK));
    let refused = h.dp.add_pod_dev(UPLINK, up).unwrap_err().to_string();
    assert!(
        refused.contains("not a veth whose peer is in another network namespace"),
        "{refused}"
    );
    h.dp.add_pod_dev("pods0", pods0).unwrap();
    assert_eq!(h.dp.pod_devs().unwrap(), vec![pods0]);
    let into = |f: Vec<u8>, mac| with_macs(routed(f), mac, VETH_MAC);
    run_steps(
        &mut h,
        "into a pod",
        vec![
            step(
                tcp(CLI4, 40000, VIP4, 80, Tcp::Syn),
                REDIRECT,
                Out::Exact(into(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn), BE_MAC)),
                &[
                    (Stat::DnatNew, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                ],
            ),
            step(
                tcp(CLI4, 40000, VIP4, 80, Tcp::Ack),
                REDIRECT,
                Out::Exact(into(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack), BE_MAC)),
                &[
                    (Stat::DnatEstablished, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                ],
            ),
            // The next one from the flow cache: Ethernet addresses, TTL, checksums the same.
            step(
                tcp(CLI4, 40000, VIP4, 80, Tcp::Ack),
                REDIRECT,
                Out::Exact(into(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack), BE_MAC)),
                &[
                    (Stat::DnatEstablished, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                    (Stat::FlowCacheHit, 1),
                ],
            ),
            step(
                tcp(BE4, 8080, CLI4, 40000, Tcp::Ack),
                REDIRECT,
                Out::Exact(into(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack), CLI_MAC)),
                &[(Stat::RevNat, 1), (Stat::Routed, 1), (Stat::RoutedToPod, 1)],
            ),
            step(
                tcp(BE4, 8080, CLI4, 40000, Tcp::Ack),
                REDIRECT,
                Out::Exact(into(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack), CLI_MAC)),
                &[
                    (Stat::RevNat, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                    (Stat::FlowCacheHit, 1),
                ],
            ),
            step(
                udp(CLI6, 40000, VIP6, 53, b"7"),
                REDIRECT,
                Out::Exact(into(udp(CLI6, 40000, BE6, 5353, b"7"), BE_MAC)),
                &[
                    (Stat::DnatNew, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                ],
            ),
            step(
                udp(BE6, 5353, CLI6, 40000, b"be-1 7"),
                REDIRECT,
                Out::Exact(into(udp(VIP6, 53, CLI6, 40000, b"be-1 7"), CLI_MAC)),
                &[(Stat::RevNat, 1), (Stat::Routed, 1), (Stat::RoutedToPod, 1)],
            ),
            step(
                udp(BE6, 5353, CLI6, 40000, b"be-1 8"),
                REDIRECT,
                Out::Exact(into(udp(VIP6, 53, CLI6, 40000, b"be-1 8"), CLI_MAC)),
                &[
                    (Stat::RevNat, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                    (Stat::FlowCacheHit, 1),
                ],
            ),
            step(
                udp(CLI6, 40000, VIP6, 53, b"8"),
                REDIRECT,
                Out::Exact(into(udp(CLI6, 40000, BE6, 5353, b"8"), BE_MAC)),
                &[
                    (Stat::DnatEstablished, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                ],
            ),
            step(
                udp(CLI6, 40000, VIP6, 53, b"9"),
                REDIRECT,
                Out::Exact(into(udp(CLI6, 40000, BE6, 5353, b"9"), BE_MAC)),
                &[
                    (Stat::DnatEstablished, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                    (Stat::FlowCacheHit, 1),
                ],
            ),
            // IP options: the Ethernet addresses in a store of their own.
            step(
                tcp_syn_with_ip_options(CLI4, 40003, VIP4, 80),
                REDIRECT,
                Out::Exact(into(
                    tcp_syn_with_ip_options(CLI4, 40003, BE4, 8080),
                    BE_MAC,
                )),
                &[
                    (Stat::DnatNew, 1),
                    (Stat::Routed, 1),
                    (Stat::RoutedToPod, 1),
                ],
            ),
            // Behind the uplink: the kernel forwards it, TTL and all, the first packet and the next.
            step(
                tcp(CLI4, 40001, "198.19.0.20", 80, Tcp::Syn),
                OK,
                Out::Exact(tcp(CLI4, 40001, "198.18.2.5", 8080, Tcp::Syn)),
                &[(Stat::DnatNew, 1)],
            ),
            step(
                tcp(CLI4, 40001, "198.19.0.20", 80, Tcp::Ack),
                OK,
                Out::Exact(tcp(CLI4, 40001, "198.18.2.5", 8080, Tcp::Ack)),
                &[(Stat::DnatEstablished, 1)],
            ),
            step(
                tcp(CLI4, 40001, "198.19.0.20", 80, Tcp::Ack),
                OK,
                Out::Exact(tcp(CLI4, 40001, "198.18.2.5", 8080, Tcp::Ack)),
                &[(Stat::DnatEstablished, 1), (Stat::FlowCacheHit, 1)],
            ),
            // No neighbour entry yet: routed through the neighbour table, addresses untouched.
            step(
                tcp(CLI4, 40002, "198.19.0.21", 80, Tcp::Syn),
                REDIRECT,
                Out::Exact(routed(tcp(CLI4, 40002, "198.18.1.12", 8080, Tcp::Syn))),
                &[(Stat::DnatNew, 1), (Stat::Routed, 1)],
            ),
        ],
    );
    let flags = |h: &Harness, src: &str, sport: u16, dst: &str| {
        let key = CtKey {
            src: to_addr(src.parse().unwrap()),
            dst: to_addr(dst.parse().unwrap()),
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            _pad: [0; 3],
        };
        h.ct_map().get(&key).unwrap().expect("entry").flags
    };
    let routes = CT_F_KERNEL_ROUTE | CT_F_POD_ROUTE;
    assert_eq!(
        flags(&h, CLI4, 40001, "198.19.0.20") & routes,
        CT_F_KERNEL_ROUTE
    );
    assert_eq!(flags(&h, CLI4, 40000, VIP4) & routes, CT_F_POD_ROUTE);
    assert_eq!(flags(&h, CLI4, 40002, "198.19.0.21") & routes, 0);
    // Forgetting gone devices keeps the others.
    h.dp.retain_pod_devs(&[pods0].into()).unwrap();
    assert_eq!(h.dp.pod_devs().unwrap(), vec![pods0]);
    // A device gone: forgotten by its own index only (another's shares its slot).
    h.dp.forget_pod_dev(pods0 + weir_common::MAX_POD_DEVS)
        .unwrap();
    assert_eq!(h.dp.pod_devs().unwrap(), vec![pods0]);
    // The route a flow remembers holds while its veth is a pod's; after, the kernel forwards
    // (and the flow cache's slot, which held the route too, ends).
    h.dp.forget_pod_dev(pods0).unwrap();
    assert!(h.dp.pod_devs().unwrap().is_empty());
    run_steps(
        &mut h,
        "veth forgotten",
        vec![step(
            tcp(CLI4, 40000, VIP4, 80, Tcp::Ack),
            OK,
            Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Ack)),
            &[(Stat::DnatEstablished, 1)],
        )],
    );
    assert_eq!(flags(&h, CLI4, 40000, VIP4) & routes, CT_F_KERNEL_ROUTE);
    drop(pod);
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
