//! weir-cni against what a buggy or hostile runtime sends: a repeated ADD, odd container ids
//! and interface names, a `CNI_NETNS` that is no pod's network namespace. Each is refused with
//! the object named, and no call ever frees an address another attachment holds.
use super::*;

/// What the store holds: address → (container id, ifname) as the record's text says.
fn owners(b: &Bed) -> BTreeSet<(String, String)> {
    b.records()
        .into_iter()
        .map(|a| {
            let text = std::fs::read_to_string(b.ipam_dir().join(&a)).unwrap();
            (a, text)
        })
        .collect()
}

/// A second ADD for a running pod fails, and its undo gives back only what it allocated
/// itself: the pod keeps its addresses and its link, and the next pod gets other addresses.
/// The same holds when the second ADD fails for want of an address (a range it adds is full).
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_repeated_add_keeps_the_running_pods_addresses() {
    let mut b = Bed::new();
    let (p, q, full) = (b.pod("p"), b.pod("q"), b.pod("full"));
    let conf = b.conf("1.1.0");
    let first = addresses(&b.add(p, &conf));
    let held = owners(&b);
    let links = b.node_links();
    // The same ADD again.
    let o = b.call("ADD", &b.cid(p), Some(&b.netns(p)), &conf);
    assert!(!o.ok, "a second ADD should fail: {}", o.json);
    assert!(o.msg().contains("already exists"), "{}", o.json);
    assert_eq!(
        owners(&b),
        held,
        "the second ADD's undo changed the records"
    );
    assert_eq!(b.node_links(), links);
    // Again, failing at allocation: an IPv6 range with its one address taken by another pod.
    let tiny =
        json!([{"subnet": "fd00:19::/120", "rangeStart": "fd00:19::5", "rangeEnd": "fd00:19::5"}]);
    let mut only_tiny = conf.clone();
    only_tiny["ipam"]["ranges"] = json!([tiny]);
    b.add(full, &only_tiny);
    let held = owners(&b);
    let mut exhausted = conf.clone();
    exhausted["ipam"]["ranges"] = json!([conf["ipam"]["ranges"][0], tiny]);
    let o = b.call("ADD", &b.cid(p), Some(&b.netns(p)), &exhausted);
    assert_eq!(o.code(), 100, "{}", o.json);
    assert_eq!(
        owners(&b),
        held,
        "the failed allocation's undo changed the records"
    );
    // The pod still has its network; the next pod gets other addresses.
    let pod_addrs = b.pods[p]
        .ip_output(&["-o", "addr", "show", "eth0"])
        .unwrap();
    for a in &first {
        assert!(pod_addrs.contains(&a.to_string()), "{a}: {pod_addrs}");
    }
    let next = addresses(&b.add(q, &conf));
    assert!(
        next.iter().all(|a| !first.contains(a)),
        "{first:?} {next:?}"
    );
    tcp_works(&b.pods[q], &b.pods[p], first[0]);
}

/// Container ids and interface names outside the spec's patterns are refused with code 4,
/// naming the value, by every command; nothing is allocated or freed. A record whose owner
/// cannot be read (one written with such an id by an earlier version) keeps its address: GC
/// does not free it and ADD does not hand it out.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn odd_container_ids_and_interface_names_are_refused_and_free_nothing() {
    let mut b = Bed::new();
    let (p, q) = (b.pod("p"), b.pod("q"));
    let conf = b.conf("1.1.0");
    b.add(p, &conf);
    let held = owners(&b);
    let cid = b.cid(p);
    let odd_ids = [
        format!("{cid} "),
        format!(" {cid}"),
        format!("{cid}\n"),
        format!("{cid}\neth0"),
        "-leading-dash".to_string(),
    ];
    for id in &odd_ids {
        for command in ["ADD", "CHECK", "DEL"] {
            let o = b.call(command, id, Some(&b.netns(q)), &conf);
            assert_eq!(o.code(), 4, "{command} {id:?}: {}", o.json);
            assert!(o.msg().contains("CNI_CONTAINERID"), "{}", o.json);
            assert!(o.msg().contains(&format!("{id:?}")), "{}", o.json);
            assert_eq!(owners(&b), held, "{command} {id:?}");
        }
    }
    for ifname in ["eth0 ", " eth0", "eth\n0", "..", "a:b", "sixteen-chars-xx"] {
        let o = b.call_with(&b.cni, "ADD", "cid-q", Some(&b.netns(q)), ifname, &conf);
        assert_eq!(o.code(), 4, "{ifname:?}: {}", o.json);
        assert!(o.msg().contains("CNI_IFNAME"), "{}", o.json);
        assert_eq!(owners(&b), held, "{ifname:?}");
    }
    // An unreadable record, as an earlier version wrote for " cid-r ".
    let stale = b.ipam_dir().join("198.18.1.200");
    std::fs::write(&stale, " cid-r \neth0\n").unwrap();
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": cid, "ifname": "eth0"}]);
    let o = b.call("GC", "", None, &gc);
    assert!(o.ok, "GC: {}", o.json);
    assert!(stale.exists(), "GC freed a record it cannot read");
    assert_eq!(owners(&b).len(), held.len() + 1);
    let mut last = conf.clone();
    last["ipam"]["ranges"] = json!([
        [{"subnet": "198.18.1.0/24", "rangeStart": "198.18.1.200", "rangeEnd": "198.18.1.201"}],
    ]);
    let got = addresses(&b.add(q, &last));
    assert_eq!(got, vec!["198.18.1.201".parse::<IpAddr>().unwrap()]);
}

/// `CNI_NETNS` must name a pod's network namespace: a regular file, another kind of namespace
/// and the node's own network namespace are each refused by path, before anything is
/// allocated.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn a_netns_that_is_no_pods_is_refused_by_name() {
    let mut b = Bed::new();
    let p = b.pod("p");
    let file = b.dir.0.join("not-a-netns");
    std::fs::write(&file, "").unwrap();
    let cases = [
        (file.clone(), "is not a network namespace"),
        (
            PathBuf::from("/proc/self/ns/mnt"),
            "is not a network namespace",
        ),
        // The plugin runs in the node's namespace: its own is the node's.
        (
            PathBuf::from("/proc/self/ns/net"),
            "the node's own network namespace",
        ),
        (b.node.ns.path(), "the node's own network namespace"),
    ];
    let links = b.node_links();
    let addrs = b.node.ns.ip_output(&["-o", "addr", "show"]).unwrap();
    for (path, want) in &cases {
        for command in ["ADD", "CHECK"] {
            let mut conf = b.conf("1.1.0");
            if command == "CHECK" {
                conf = with_prev(
                    &conf,
                    &json!({"cniVersion": "1.1.0", "interfaces": [], "ips": []}),
                );
            }
            let o = b.call(command, "cid-x", Some(path), &conf);
            assert!(!o.ok, "{command} {}: {}", path.display(), o.json);
            if command == "ADD" {
                assert_eq!(o.code(), 4, "{}: {}", path.display(), o.json);
                assert!(o.msg().contains(&path.display().to_string()), "{}", o.json);
                assert!(o.msg().contains(want), "{}", o.json);
            }
        }
        assert!(
            b.records().is_empty(),
            "{}: {:?}",
            path.display(),
            b.records()
        );
        assert_eq!(b.node_links(), links, "{}", path.display());
    }
    assert_eq!(b.node.ns.ip_output(&["-o", "addr", "show"]).unwrap(), addrs);
    // A pod's namespace still works.
    b.add(p, &b.conf("1.1.0"));
}

/// weir-cni killed (SIGKILL) at any point of an ADD, as a runtime's timeout or an OOM kill
/// does: the DEL the runtime then sends removes whatever that ADD had made (link, addresses,
/// routes), and nothing of a running pod. The kills land from before the configuration is read
/// to after the reply, 40 points 0.5 ms apart.
#[test]
#[ignore = "needs root: run with cargo xtask test"]
fn an_add_killed_at_any_point_is_undone_by_its_del() {
    let mut b = Bed::new();
    let (keep, p) = (b.pod("keep"), b.pod("p"));
    let conf = b.conf("1.1.0");
    b.add(keep, &conf);
    let (kept, kept_links, routes) = (owners(&b), b.node_links(), b.node_routes());
    let mut mid_add = 0;
    for i in 0..40u64 {
        let mut child = b
            .cni
            .spawn(
                &b.node.ns,
                "ADD",
                &b.cid(p),
                Some(&b.netns(p)),
                "eth0",
                &conf,
            )
            .unwrap();
        std::thread::sleep(std::time::Duration::from_micros(i * 500));
        if child.try_wait().unwrap().is_none() {
            mid_add += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        let o = b.call("DEL", &b.cid(p), Some(&b.netns(p)), &conf);
        assert!(o.ok, "kill {i}: DEL failed: {} {}", o.json, o.stderr);
        assert_eq!(owners(&b), kept, "kill {i}: addresses");
        assert_eq!(b.node_links(), kept_links, "kill {i}: links");
        assert_eq!(b.node_routes(), routes, "kill {i}: routes");
        let pod_links = b.pods[p].ip_output(&["-o", "link", "show"]).unwrap();
        assert_eq!(
            pod_links.lines().count(),
            1,
            "kill {i}: in the pod: {pod_links}"
        );
    }
    assert!(mid_add >= 5, "only {mid_add} kills landed during an ADD");
    // Nothing was leaked: the pod gets its network, and the running pod kept its own.
    b.add(p, &conf);
    assert!(owners(&b).is_superset(&kept));
}
