//! Restarts and upgrades keep what they must: counters of a grown counters map, flows of earlier
//! conntrack layouts, and open connections and UDP flows across an agent restart.

use weir_common::{Stat, CT_DIR_FORWARD, CT_DIR_REPLY, PROTO_TCP, PROTO_UDP};

use std::{thread, time::Duration};

use crate::{fixture::*, node::*, *};

/// The conntrack key of a TCP flow `src:sport → dst:dport`.
fn tcp_ct_key(src: &str, sport: u16, dst: &str, dport: u16) -> weir_common::CtKey {
    let a = |ip: &str| weir_proxy::datapath::addr::to_addr(ip.parse().unwrap());
    weir_common::CtKey {
        src: a(src),
        dst: a(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    }
}

/// Creates and pins an LRU hash map as an older weir would have (BPF_MAP_CREATE, BPF_OBJ_PIN).
fn pin_lru_map(path: &std::path::Path, name: &str, key_size: u32, value_size: u32) {
    pin_map(
        path, name, 9, /* LRU_HASH */
        key_size, value_size, 1024,
    );
}

/// Creates and pins a map of `kind` (a `bpf_map_type`) with the sizes given.
fn pin_map(path: &std::path::Path, name: &str, kind: u32, key: u32, value: u32, entries: u32) {
    let mut create = [0u8; 72];
    for (i, v) in [kind, key, value, entries].iter().enumerate() {
        create[i * 4..i * 4 + 4].copy_from_slice(&v.to_ne_bytes());
    }
    create[28..28 + name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: BPF_MAP_CREATE with an attribute buffer of the size passed.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, create.as_ptr(), create.len()) };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = [0u8; 16];
    pin[..8].copy_from_slice(&(cpath.as_ptr() as u64).to_ne_bytes());
    pin[8..12].copy_from_slice(&(fd as u32).to_ne_bytes());
    // SAFETY: BPF_OBJ_PIN with a path that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, 6, pin.as_ptr(), pin.len()) };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    // SAFETY: our own descriptor; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

/// An upgrade that adds counters: the counters map the previous version pinned (fewer
/// entries) is made anew at this version's size with its counts carried over, so the new
/// counters count and every counter reads (`weir status` failed on the missing ones). A
/// pinned map of another shape is refused with an error that names it, not misread.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_upgrade_with_more_counters_keeps_the_counts() {
    use aya::maps::{MapData, PerCpuArray, PerCpuValues};
    use weir_common::{map_names, STAT_COUNT};
    let cpus = aya::util::nr_cpus().unwrap();
    let mut h = Harness::new_with(|maps| {
        pin_map(
            &maps.join(map_names::STATS),
            map_names::STATS,
            6, /* PERCPU_ARRAY */
            4,
            8,
            STAT_COUNT - 2,
        );
        let mut old: PerCpuArray<MapData, u64> =
            weir_proxy::datapath::open_typed(maps, map_names::STATS)?;
        let dnat_new = Stat::DnatNew as u32;
        old.set(dnat_new, PerCpuValues::try_from(vec![3u64; cpus])?, 0)?;
        Ok(())
    })
    .expect("load over the smaller counters map");
    let info = aya::maps::MapInfo::from_pin(h.maps_dir().join(map_names::STATS)).unwrap();
    assert_eq!(info.max_entries(), STAT_COUNT, "the counters map's size");
    let before = h.stats();
    assert_eq!(
        before[Stat::DnatNew as usize],
        3 * cpus as u64,
        "carried over"
    );
    h.program(&services());
    let (_, _, moved) = step_on(
        &mut h,
        TC_FROM_POD,
        &tcp(CLI4, 40000, VIP4, 80, Tcp::Syn),
        "lo",
    );
    assert_eq!(moved, ["dnat_new"]);
    assert_eq!(h.stats()[Stat::DnatNew as usize], 3 * cpus as u64 + 1);
    // The last counter of this version counts too: a node-local query.
    let mut d = services();
    d.get_mut(&fe(VIP4, 53, PROTO_UDP)).unwrap().node_local = true;
    h.program(&d);
    lease(&h, true);
    let (_, _, moved) = step_on(&mut h, TC_FROM_POD, &udp(CLI4, 40000, VIP4, 53, b"7"), "lo");
    assert_eq!(moved, ["dnat_new", "node_local"]);

    let err = Harness::new_with(|maps| {
        pin_map(
            &maps.join(map_names::BACKENDS),
            map_names::BACKENDS,
            1, /* HASH */
            4,
            4,
            16,
        );
        Ok(())
    })
    .err()
    .expect("a backends map of another shape is refused");
    let err = format!("{err:#}");
    assert!(
        err.contains(map_names::BACKENDS) && err.contains("would be misread"),
        "{err}"
    );
}

/// Flows tracked by the conntrack layout of earlier versions (`CT_V1`) keep working after an
/// upgrade: the new agent moves them to today's maps, with the hairpin peer the old programs
/// took from the packet, and unpins the old map.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_upgrade_keeps_the_flows_of_the_previous_conntrack_layout() {
    use weir_common::{CtKey, CT_F_HAIRPIN};
    use weir_proxy::datapath::migrate::{CtValueV1, CT_V1};
    let a = |ip: &str| weir_proxy::datapath::addr::to_addr(ip.parse().unwrap());
    let key = tcp_ct_key;
    let value = |nat: &str, port: u16, dir: u8, flags: u8| CtValueV1 {
        nat_addr: a(nat),
        nat_port: port.to_be(),
        dir,
        flags,
        expires_ns: u64::MAX,
        ..Default::default()
    };
    let mut old_path = None;
    let mut h = Harness::new_with(|maps| {
        pin_lru_map(&maps.join(CT_V1), CT_V1, 40, 40);
        let mut old: aya::maps::HashMap<aya::maps::MapData, CtKey, CtValueV1> =
            weir_proxy::datapath::open_typed(maps, CT_V1)?;
        // A plain flow, both ways, and a hairpin one (the pod is its own backend).
        for (k, v) in [
            (
                key(CLI4, 40000, VIP4, 80),
                value(BE4, 8080, CT_DIR_FORWARD, 0),
            ),
            (
                key(BE4, 8080, CLI4, 40000),
                value(VIP4, 80, CT_DIR_REPLY, 0),
            ),
            (
                key(CLI4, 40001, VIP4, 80),
                value(CLI4, 8080, CT_DIR_FORWARD, CT_F_HAIRPIN),
            ),
            (
                key(CLI4, 8080, VIP4, 40001),
                value(VIP4, 80, CT_DIR_REPLY, CT_F_HAIRPIN),
            ),
        ] {
            old.insert(k, v, 0)?;
        }
        old_path = Some(maps.join(CT_V1));
        Ok(())
    })
    .unwrap();
    assert!(!old_path.unwrap().exists(), "CT_V1 still pinned");
    assert_eq!(h.ct().len(), 4, "every flow moved");
    // Each packet of both flows is translated as before the upgrade (no service is programmed:
    // conntrack alone decides).
    for (input, verdict, want) in [
        (
            tcp(CLI4, 40000, VIP4, 80, Tcp::Ack),
            OK,
            tcp(CLI4, 40000, BE4, 8080, Tcp::Ack),
        ),
        (
            tcp(BE4, 8080, CLI4, 40000, Tcp::Ack),
            REDIRECT,
            routed(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack)),
        ),
        (
            tcp(CLI4, 40001, VIP4, 80, Tcp::Ack),
            REDIRECT,
            routed(tcp(VIP4, 40001, CLI4, 8080, Tcp::Ack)),
        ),
        (
            tcp(CLI4, 8080, VIP4, 40001, Tcp::Ack),
            REDIRECT,
            routed(tcp(VIP4, 80, CLI4, 40001, Tcp::Ack)),
        ),
    ] {
        let (v, out) = h.run(TC_FROM_POD, &input);
        assert_eq!(v, verdict);
        assert!(out == want, "{}", hexdiff(&out, &want));
    }
}

/// The flows of `CT_V2` (both families under one 40-byte key) move to the per-family maps on
/// an upgrade: those there at the load, and those the old programs add until the new ones
/// replace them all (the second pass), where an entry the new programs wrote stays. The old
/// map is unpinned only then, and IPv4 flows are translated from `CT4_V1` as before.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_upgrade_moves_the_flows_of_the_shared_conntrack_map_to_one_per_family() {
    use weir_common::{CtKey, CtValue, CT_DIR_REPLY};
    use weir_proxy::datapath::migrate::{migrate_ct, CT_V2};
    let a = |ip: &str| weir_proxy::datapath::addr::to_addr(ip.parse().unwrap());
    let key = tcp_ct_key;
    let value = |nat: &str, port: u16, dir: u8| CtValue {
        nat_addr: a(nat),
        nat_port: port.to_be(),
        dir,
        expires_ns: u64::MAX,
        ..Default::default()
    };
    let mut h = Harness::new().unwrap();
    let maps = h.maps_dir();
    // The old map as an earlier agent left it, its programs still attached.
    pin_lru_map(&maps.join(CT_V2), CT_V2, 40, 56);
    let mut old: aya::maps::HashMap<aya::maps::MapData, CtKey, CtValue> =
        weir_proxy::datapath::open_typed(&maps, CT_V2).unwrap();
    for (k, v) in [
        (key(CLI4, 40000, VIP4, 80), value(BE4, 8080, CT_DIR_FORWARD)),
        (key(BE4, 8080, CLI4, 40000), value(VIP4, 80, CT_DIR_REPLY)),
        (key(CLI6, 40000, VIP6, 80), value(BE6, 8080, CT_DIR_FORWARD)),
    ] {
        old.insert(k, v, 0).unwrap();
    }
    // The load's pass: copied, the old map kept for the old programs.
    assert_eq!(migrate_ct(&maps, false).unwrap(), 3);
    assert!(
        maps.join(CT_V2).exists(),
        "CT_V2 unpinned while still in use"
    );
    // Meanwhile an old program opens a flow, and a new one refreshes an entry.
    old.insert(
        key(CLI4, 40001, VIP4, 80),
        value(BE4, 8080, CT_DIR_FORWARD),
        0,
    )
    .unwrap();
    let newer = CtValue {
        expires_ns: u64::MAX - 1,
        ..value(BE6, 8080, CT_DIR_FORWARD)
    };
    h.ct_map()
        .insert(&key(CLI6, 40000, VIP6, 80), &newer, 0)
        .unwrap();
    assert_eq!(h.dp.finish_ct_migration().unwrap(), 1, "only the new flow");
    assert!(!maps.join(CT_V2).exists(), "CT_V2 still pinned");
    let ct = h.ct_map();
    assert_eq!(h.ct().len(), 4);
    assert_eq!(
        ct.get(&key(CLI6, 40000, VIP6, 80)).unwrap(),
        Some(newer),
        "the new programs' entry stays"
    );
    for (k, map) in [
        (key(CLI4, 40001, VIP4, 80), weir_common::map_names::CT4),
        (key(CLI6, 40000, VIP6, 80), weir_common::map_names::CT6),
    ] {
        assert!(ct.get(&k).unwrap().is_some(), "{k:?} not in {map}");
    }
    // Conntrack alone decides (no service is programmed): both IPv4 flows as before.
    for (input, want) in [
        (
            tcp(CLI4, 40000, VIP4, 80, Tcp::Ack),
            tcp(CLI4, 40000, BE4, 8080, Tcp::Ack),
        ),
        (
            tcp(CLI4, 40001, VIP4, 80, Tcp::Ack),
            tcp(CLI4, 40001, BE4, 8080, Tcp::Ack),
        ),
    ] {
        let (v, out) = h.run(TC_FROM_POD, &input);
        assert_eq!(v, OK);
        assert!(out == want, "{}", hexdiff(&out, &want));
    }
    let (v, out) = h.run(TC_FROM_POD, &tcp(BE4, 8080, CLI4, 40000, Tcp::Ack));
    let want = routed(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack));
    assert_eq!(v, REDIRECT);
    assert!(out == want, "{}", hexdiff(&out, &want));
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
