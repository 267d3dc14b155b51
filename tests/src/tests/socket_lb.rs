//! Socket-level load balancing with real sockets in pod namespaces: connections and datagrams
//! to ClusterIPs spread over the backends by both paths, and an endpoint removed under load.
use std::{thread, time::Duration};

use weir_proxy::tools::sandbox::SERVICES;

use crate::node::*;

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
