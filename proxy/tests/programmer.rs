//! The programmer against the in-memory map writer: what it writes for the desired frontends,
//! and that a reader of the maps finds a complete entry after every single write (failed
//! writes, restarts and incremental changes included).
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::{collections::BTreeMap, net::SocketAddr};

use weir_common::Backend;
use weir_common::{PROTO_TCP, PROTO_UDP};
use weir_proxy::{
    datapath::{
        addr::{to_addr, to_ip},
        programmer::{ApplyError, FrontendProblem},
        svc_key, MapWriter, Programmer, SvcKeyOrd,
    },
    model::{Desired, Frontend, ServiceSpec},
};
use weir_testkit::FakeMaps;

fn fe(ip: &str, port: u16, proto: u8) -> Frontend {
    Frontend {
        ip: ip.parse().unwrap(),
        port,
        proto,
        scope: weir_common::SCOPE_ALL,
    }
}

fn spec(backends: &[&str]) -> ServiceSpec {
    ServiceSpec {
        name: "demo/web:http".into(),
        backends: backends.iter().map(|b| b.parse().unwrap()).collect(),
        ..Default::default()
    }
}

fn count_of(maps: &FakeMaps, f: &Frontend) -> Option<u16> {
    maps.state
        .svc
        .get(&(&svc_key(f, 0)).into())
        .map(|v| v.count)
}

#[test]
fn programs_master_slots_and_backends() {
    let mut maps = FakeMaps::default();
    let mut p = Programmer::adopt(&maps).unwrap();
    let web = fe("198.19.0.10", 80, PROTO_TCP);
    let d = Desired::from([(web, spec(&["198.18.1.2:8080", "198.18.1.3:8080"]))]);
    let st = p.apply(&d, &mut maps);
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    assert_eq!(count_of(&maps, &web), Some(2));
    assert_eq!(maps.state.backends.len(), 2);
    assert_eq!(maps.state.svc.len(), 3);
    assert!(maps.violations.is_empty(), "{:?}", maps.violations);
}

#[test]
fn every_intermediate_state_is_readable() {
    let mut maps = FakeMaps::default();
    let mut p = Programmer::adopt(&maps).unwrap();
    let web = fe("198.19.0.10", 80, PROTO_TCP);
    let steps: [&[&str]; 5] = [
        &["198.18.1.2:8080", "198.18.1.3:8080", "198.18.1.4:8080"],
        &["198.18.1.2:8080", "198.18.1.4:8080"],
        &["198.18.1.5:8080"],
        &[],
        &["198.18.1.2:8080", "198.18.1.6:8080"],
    ];
    for s in steps {
        let mut sp = spec(s);
        sp.maglev = true;
        let st = p.apply(&Desired::from([(web, sp)]), &mut maps);
        assert!(st.errors.is_empty(), "{:?}", st.errors);
        assert_eq!(count_of(&maps, &web), Some(s.len() as u16));
    }
    p.apply(&Desired::new(), &mut maps);
    assert!(maps.violations.is_empty(), "{:#?}", maps.violations);
    assert!(
        maps.state.svc.is_empty() && maps.state.backends.is_empty() && maps.state.maglev.is_empty()
    );
}

#[test]
fn unchanged_desired_state_writes_nothing() {
    let mut maps = FakeMaps::default();
    let mut p = Programmer::adopt(&maps).unwrap();
    let d = Desired::from([(fe("198.19.0.10", 53, PROTO_UDP), spec(&["198.18.1.2:53"]))]);
    p.apply(&d, &mut maps);
    let st = p.apply(&d, &mut maps);
    assert_eq!(st.writes, 0);
}

#[test]
fn restart_adopts_and_changes_only_the_difference() {
    let mut maps = FakeMaps::default();
    let a = fe("198.19.0.10", 80, PROTO_TCP);
    let b = fe("198.19.0.11", 80, PROTO_TCP);
    let d = Desired::from([
        (a, spec(&["198.18.1.2:8080", "198.18.1.3:8080"])),
        (b, spec(&["198.18.1.4:8080"])),
    ]);
    Programmer::adopt(&maps).unwrap().apply(&d, &mut maps);
    let before = maps.state.clone();
    // A new agent: same desired state, no writes; its ids continue after the old ones.
    let mut p2 = Programmer::adopt(&maps).unwrap();
    assert_eq!(p2.apply(&d, &mut maps).writes, 0);
    assert_eq!(before.svc, maps.state.svc);
    let mut d2 = d.clone();
    d2.get_mut(&b)
        .unwrap()
        .backends
        .push("198.18.1.9:8080".parse().unwrap());
    let st = p2.apply(&d2, &mut maps);
    assert_eq!((st.services_changed, st.backends_added), (1, 1));
    assert_eq!(
        maps.state.svc.get(&(&svc_key(&a, 0)).into()),
        before.svc.get(&(&svc_key(&a, 0)).into())
    );
    let new_id = *maps.state.backends.keys().max().unwrap();
    assert!(
        new_id > *before.backends.keys().max().unwrap(),
        "backend ids are not reused"
    );
}

#[test]
fn a_bad_service_does_not_stop_the_others() {
    let mut maps = FakeMaps::default();
    let mut p = Programmer::adopt(&maps).unwrap();
    let v4 = fe("198.19.0.10", 80, PROTO_TCP);
    let v6 = fe("fd00:19::10", 80, PROTO_TCP);
    let d = Desired::from([
        (v4, spec(&["198.18.1.2:8080", "[fd00:18::2]:8080"])),
        (v6, spec(&["[fd00:18::2]:8080"])),
    ]);
    let st = p.apply(&d, &mut maps);
    assert_eq!(st.errors.len(), 1);
    // A value naming the Service and the frontend, with the endpoints it left out.
    match &st.errors[0] {
        ApplyError::Frontend {
            service,
            frontend,
            problem: FrontendProblem::WrongFamily(skipped),
        } => {
            assert_eq!(service, "demo/web:http");
            assert_eq!(*frontend, v4);
            assert_eq!(
                skipped,
                &["[fd00:18::2]:8080".parse::<SocketAddr>().unwrap()]
            );
        }
        other => panic!("{other}"),
    }
    assert_eq!(
        st.errors[0].to_string(),
        "service demo/web:http (198.19.0.10:80/TCP): endpoints of the wrong address family skipped: [fd00:18::2]:8080"
    );
    assert_eq!(st.failed().len(), 1);
    assert_eq!(count_of(&maps, &v4), Some(1));
    assert_eq!(count_of(&maps, &v6), Some(1));
}

#[test]
fn a_failed_write_leaves_readable_maps_and_a_retry_completes() {
    for fail_at in 0..8 {
        let mut maps = FakeMaps::default();
        let mut p = Programmer::adopt(&maps).unwrap();
        let web = fe("198.19.0.10", 80, PROTO_TCP);
        p.apply(
            &Desired::from([(web, spec(&["198.18.1.2:8080", "198.18.1.3:8080"]))]),
            &mut maps,
        );
        maps.fail_at = Some(maps.writes + fail_at);
        let d = Desired::from([(web, spec(&["198.18.1.4:8080"]))]);
        p.apply(&d, &mut maps);
        maps.fail_at = None;
        let st = p.apply(&d, &mut maps);
        assert!(st.errors.is_empty(), "fail_at {fail_at}: {:?}", st.errors);
        assert_eq!(count_of(&maps, &web), Some(1), "fail_at {fail_at}");
        assert_eq!(
            maps.state.backends.len(),
            1,
            "fail_at {fail_at}: {:?}",
            maps.state.backends
        );
        assert_eq!(maps.state.svc.len(), 2, "fail_at {fail_at}");
        assert!(
            maps.violations.is_empty(),
            "fail_at {fail_at}: {:?}",
            maps.violations
        );
    }
}

#[test]
fn a_shared_endpoint_has_one_id_per_service_and_leaves_one_alone() {
    let mut maps = FakeMaps::default();
    let mut p = Programmer::adopt(&maps).unwrap();
    // UDP: a removed backend's flows are purged (TCP ones keep theirs).
    let (a, b) = (
        fe("198.19.0.10", 80, PROTO_UDP),
        fe("198.19.0.11", 80, PROTO_UDP),
    );
    let mut d = Desired::from([
        (a, spec(&["198.18.1.2:8080"])),
        (b, spec(&["198.18.1.2:8080"])),
    ]);
    p.apply(&d, &mut maps);
    let ids: Vec<u32> = maps.state.backends.keys().copied().collect();
    assert_eq!(ids.len(), 2, "one id per frontend: {ids:?}");
    let a_slot = maps.state.svc[&(&svc_key(&a, 1)).into()].backend_id;
    d.insert(a, spec(&["198.18.1.3:8080"]));
    let st = p.apply(&d, &mut maps);
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    assert!(
        !maps.state.backends.contains_key(&a_slot),
        "A's id for the pod it dropped is gone"
    );
    let b_slot = maps.state.svc[&(&svc_key(&b, 1)).into()].backend_id;
    assert!(
        maps.state.backends.contains_key(&b_slot),
        "B still has the pod"
    );
    assert!(maps.violations.is_empty(), "{:?}", maps.violations);
    assert_eq!(
        maps.purged,
        vec![a_slot],
        "the UDP flows of exactly the removed backend are purged"
    );
    assert_eq!(
        p.take_udp_backends_gone(),
        vec![(
            "198.19.0.10:80".parse().unwrap(),
            "198.18.1.2:8080".parse().unwrap()
        )],
        "sockets connected through A to the pod it dropped are to be aborted, not B's"
    );
    assert_eq!(p.apply(&d, &mut maps).backends_removed, 0);
    assert_eq!(maps.purged, vec![a_slot], "nothing removed, nothing purged");
    assert!(p.take_udp_backends_gone().is_empty());
}

/// What the maps say, without ids: frontend -> its backends.
fn contents(maps: &FakeMaps) -> BTreeMap<String, Vec<String>> {
    let st = &maps.state;
    st.svc
        .iter()
        .filter(|(k, _)| k.4 == 0)
        .map(|(k, v)| {
            let mut bes: Vec<String> = (1..=v.count)
                .map(|slot| {
                    let s = st.svc[&SvcKeyOrd(k.0, k.1, k.2, k.3, slot)];
                    let b = st.backends[&s.backend_id];
                    format!("{}:{}", to_ip(&b.addr), u16::from_be(b.port))
                })
                .collect();
            bes.sort();
            (format!("{}:{}", to_ip(&weir_common::Addr(k.0)), k.1), bes)
        })
        .collect()
}

#[test]
fn applying_changes_only_reaches_what_a_full_apply_reaches() {
    let (a, b, c) = (
        fe("198.19.0.10", 80, PROTO_TCP),
        fe("198.19.0.11", 80, PROTO_TCP),
        fe("198.20.0.12", 80, PROTO_TCP),
    );
    let mut maps = FakeMaps::default();
    let mut p = Programmer::adopt(&maps).unwrap();
    let mut d = Desired::from([
        (a, spec(&["198.18.1.2:8080", "198.18.1.3:8080"])),
        (b, spec(&["198.18.1.4:8080"])),
    ]);
    p.apply(&d, &mut maps);
    let writes = maps.writes;
    // One endpoint of A replaced, B removed, C added: only they are written.
    let changed = Desired::from([
        (a, spec(&["198.18.1.2:8080", "198.18.1.5:8080"])),
        (c, spec(&["198.18.1.6:8080"])),
    ]);
    let st = p.apply_changes(&changed, &[b], &mut maps);
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    assert!(maps.violations.is_empty(), "{:?}", maps.violations);
    assert_eq!((st.services_changed, st.services_removed), (2, 1));
    assert_eq!((st.backends_added, st.backends_removed), (2, 2));
    assert!(
        maps.purged.is_empty() && p.take_udp_backends_gone().is_empty(),
        "TCP backends leave no flow to purge (no conntrack walk) and no socket to abort"
    );
    assert!(maps.writes - writes < 20, "{} writes", maps.writes - writes);
    d.remove(&b);
    d.extend(changed);
    let mut fresh = FakeMaps::default();
    Programmer::adopt(&fresh).unwrap().apply(&d, &mut fresh);
    assert_eq!(contents(&maps), contents(&fresh));
    assert_eq!(
        maps.state.backends.len(),
        fresh.state.backends.len(),
        "no backend left behind"
    );
    assert_eq!(maps.state.vipnet, fresh.state.vipnet, "prefix bits follow");
    // And a full apply afterwards finds nothing to do.
    assert_eq!(p.apply(&d, &mut maps).writes, 0);
}

#[test]
fn adoption_removes_a_backend_no_slot_points_at() {
    let mut maps = FakeMaps::default();
    let web = fe("198.19.0.10", 80, PROTO_TCP);
    let d = Desired::from([(web, spec(&["198.18.1.2:8080"]))]);
    Programmer::adopt(&maps).unwrap().apply(&d, &mut maps);
    // A previous run wrote a backend and stopped before the slot that would use it.
    let orphan = Backend {
        addr: to_addr("198.18.1.9".parse().unwrap()),
        port: 8080u16.to_be(),
        proto: PROTO_TCP,
        flags: 0,
    };
    maps.put_backend(99, &orphan).unwrap();
    let mut p = Programmer::adopt(&maps).unwrap();
    let st = p.apply(&d, &mut maps);
    assert_eq!(st.backends_removed, 1);
    assert!(!maps.state.backends.contains_key(&99));
    assert_eq!(maps.state.backends.len(), 1);
}

/// Ids run up to `u32::MAX` and then start again from 1, skipping the ones still in use: a
/// long-running agent never hands out an id a live backend or service holds.
#[test]
fn ids_past_the_largest_start_again_on_free_ones_only() {
    let mut maps = FakeMaps::default();
    let mut p = Programmer::adopt(&maps).unwrap();
    let web = fe("198.19.0.10", 80, PROTO_TCP);
    let two = spec(&["198.18.1.2:8080", "198.18.1.3:8080"]);
    let st = p.apply(&Desired::from([(web, two.clone())]), &mut maps);
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    // As a long-running agent may leave them: backend 2 and the service at the last id.
    let be = maps.state.backends.remove(&2).unwrap();
    maps.state.backends.insert(u32::MAX, be);
    for v in maps.state.svc.values_mut() {
        if v.backend_id == 2 {
            v.backend_id = u32::MAX;
        }
        v.svc_id = u32::MAX;
    }
    let mut p = Programmer::adopt(&maps).unwrap();
    let api = fe("198.19.0.11", 80, PROTO_TCP);
    let d = Desired::from([
        (
            web,
            spec(&["198.18.1.2:8080", "198.18.1.3:8080", "198.18.1.4:8080"]),
        ),
        (api, spec(&["198.18.1.5:8080"])),
    ]);
    let st = p.apply(&d, &mut maps);
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    let ids: Vec<u32> = maps.state.backends.keys().copied().collect();
    // 1 and u32::MAX live; the new ones from 2 on.
    assert_eq!(ids, [1, 2, 3, u32::MAX]);
    let svc_ids: std::collections::BTreeSet<u32> = maps
        .state
        .svc
        .iter()
        .filter(|(k, _)| k.4 == 0)
        .map(|(_, v)| v.svc_id)
        .collect();
    assert_eq!(svc_ids, [1, u32::MAX].into(), "one id per service");
    assert!(maps.violations.is_empty(), "{:?}", maps.violations);
}
