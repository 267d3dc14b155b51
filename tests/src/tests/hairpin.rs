//! Hairpin: a pod reaching itself through its own Service.

use weir_common::{Stat, PROTO_TCP};
use weir_proxy::model::Desired;

use std::{thread, time::Duration};

use weir_proxy::tools::sandbox::SERVICES;

use crate::{fixture::*, node::*, *};

fixtures! {
    lb4_hairpin_snat_to_vip_and_back => {
        let mut d = services();
        d.insert(fe(VIP4, 80, PROTO_TCP), svc(&["198.18.1.10:8080"]));
        (d, vec![
            // The pod reaches itself through its service: the source becomes the VIP, or the
            // pod's kernel would drop a packet from its own address arriving from outside.
            step(tcp(CLI4, 40000, VIP4, 80, Tcp::Syn), REDIRECT, Out::Exact(routed(tcp(VIP4, 40000, CLI4, 8080, Tcp::Syn))),
                 &[(Stat::DnatNew, 1), (Stat::Hairpin, 1), (Stat::Routed, 1)]),
            step(tcp(CLI4, 8080, VIP4, 40000, Tcp::Ack), REDIRECT, Out::Exact(routed(tcp(VIP4, 80, CLI4, 40000, Tcp::Ack))), &[(Stat::RevNat, 1), (Stat::Routed, 1)]),
            step(tcp(CLI4, 40000, VIP4, 80, Tcp::Ack), REDIRECT, Out::Exact(routed(tcp(VIP4, 40000, CLI4, 8080, Tcp::Ack))), &[(Stat::DnatEstablished, 1), (Stat::Routed, 1)]),
        ])
    };
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
