//! Internal and external traffic policies: a `Local` policy splits external from node-local
//! traffic, drops what has no local endpoint, and is never source-NATed.

use weir_common::{Stat, PROTO_TCP};
use weir_proxy::model::{Desired, ServiceSpec};

use crate::{fixture::*, *};

fixtures! {
    // externalTrafficPolicy Local: an uplink's traffic gets the external entry (this node's
    // endpoints), pods get the cluster-wide one (kube-proxy's short-circuit).
    lb4_external_policy_local_splits_uplink_and_pod_traffic => {
        let mut d = services();
        d.insert(fe(VIP4, 80, PROTO_TCP).external(), svc(&["198.18.1.12:8080"]));
        (d, vec![
            Step {
                prog: TC_FROM_NETDEV,
                input: tcp("198.18.0.99", 40000, VIP4, 80, Tcp::Syn),
                verdict: OK,
                out: Out::Exact(tcp("198.18.0.99", 40000, "198.18.1.12", 8080, Tcp::Syn)),
                stats: &[(Stat::DnatNew, 1)],
            },
            step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        ])
    };
    // With endpoints elsewhere but none on this node, kube-proxy drops (not rejects) the
    // traffic its Local policy covers; the rest still reaches the cluster's endpoints.
    lb4_external_policy_local_without_local_endpoint_drops => {
        let mut d = services();
        d.insert(fe(VIP4, 80, PROTO_TCP).external(), ServiceSpec { drop_when_empty: true, ..svc(&[]) });
        (d, vec![
            Step {
                prog: TC_FROM_NETDEV,
                input: tcp("198.18.0.99", 40000, VIP4, 80, Tcp::Syn),
                verdict: SHOT,
                out: Out::Same,
                stats: &[(Stat::DropNoLocalBackend, 1)],
            },
            step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), OK, Out::Exact(tcp(CLI4, 40000, BE4, 8080, Tcp::Syn)), &[(Stat::DnatNew, 1)]),
        ])
    };
    lb4_internal_policy_local_without_local_endpoint_drops => {
        let mut d = services();
        d.insert(fe(EMPTY4, 80, PROTO_TCP), ServiceSpec { drop_when_empty: true, ..svc(&[]) });
        (d, vec![step(tcp(CLI4, 40000, EMPTY4, 80, Tcp::Syn), SHOT, Out::Same, &[(Stat::DropNoLocalBackend, 1)])])
    };
}

#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_local_traffic_policy_is_never_source_nated() {
    // The external entry of an `externalTrafficPolicy: Local` service; its endpoint behind
    // the uplink only to show that the scope alone decides.
    let mut h = Harness::new().unwrap();
    let mut d = nodeport(NODE4, REMOTE_POD4);
    let spec = d.values().next().unwrap().clone();
    d.insert(fe(NODE4, 30080, PROTO_TCP).external(), spec);
    h.program(&d);
    expect(
        &mut h,
        "SYN",
        (TC_FROM_NETDEV, UPLINK),
        tcp(EXTERNAL4, 40000, NODE4, 30080, Tcp::Syn),
        (OK, tcp(EXTERNAL4, 40000, REMOTE_POD4, 8080, Tcp::Syn)),
        &["dnat_new"],
    );
}
