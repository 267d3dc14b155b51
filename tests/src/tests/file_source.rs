//! A YAML file as the source: edits are followed by traffic.
use std::{thread, time::Duration};

use weir_proxy::tools::{loadtest::Report, sandbox::SERVICES, sim::Sim};

use crate::node::*;

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

/// The frontends the agent's syncs programmed, as its log says, in order.
fn programmed_counts(s: &Sim) -> Vec<usize> {
    let log = std::fs::read_to_string(s.agent_log()).unwrap();
    log.lines()
        .filter(|l| l.contains(" programmed ") || l.ends_with(" programmed"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("frontends="))
                .and_then(|n| n.parse().ok())
        })
        .collect()
}

/// An empty or comment-only file is refused, loudly, and withdraws nothing; so is a file with
/// objects but no Service. A file that holds Services again is applied.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_empty_source_withdraws_nothing() {
    let s = sim(false);
    let before = s.status().unwrap().services.len();
    assert!(before > 0);
    let node_only = "apiVersion: v1\nkind: Node\nmetadata: {name: sim-node}\n";
    for (i, text) in ["", "# nothing here\n", node_only].into_iter().enumerate() {
        s.write_services(text).unwrap();
        // Well past two polls, when a change is applied.
        thread::sleep(Duration::from_millis(1000));
        let st = s.status().unwrap();
        assert_eq!(
            st.services.len(),
            before,
            "{text:?}\n{}",
            s.agent_log_tail()
        );
        let body = assert_metrics(&s, &[]);
        let refused = body
            .lines()
            .find(|l| l.starts_with("weir_source_refused_total{reason=\"empty\"}"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|n| n.parse::<u64>().ok());
        assert_eq!(refused, Some(i as u64 + 1), "{body}");
    }
    assert!(
        s.agent_log_tail()
            .contains("the source holds no Service: refused"),
        "{}",
        s.agent_log_tail()
    );
    s.write_services(SERVICES).unwrap();
    s.wait_programmed("the services again", |st| st.services.len() == before)
        .unwrap();
}

/// A file written in two steps (its first documents, a pause shorter than a poll, the rest)
/// is applied whole: no sync ever programs the half of it.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_source_written_in_steps_is_applied_whole() {
    use std::io::Write;
    let s = sim(false);
    let full = *programmed_counts(&s).last().unwrap();
    // Cut between documents, well before the end: what was written first is valid YAML.
    let cut = SERVICES.match_indices("\n---").nth(1).unwrap().0;
    for round in 0..5 {
        let mut f = std::fs::File::create(s.services_path()).unwrap();
        f.write_all(&SERVICES.as_bytes()[..cut]).unwrap();
        f.flush().unwrap();
        thread::sleep(Duration::from_millis(120));
        // A comment makes each round's file a new version.
        write!(f, "{}\n# round {round}\n", &SERVICES[cut..]).unwrap();
        drop(f);
        thread::sleep(Duration::from_millis(600));
    }
    let counts = programmed_counts(&s);
    assert!(
        counts.iter().all(|n| *n == full),
        "a sync programmed part of the file: {counts:?} (full: {full})"
    );
}
