//! Tests, the harness and the sandbox remove everything they made, also when interrupted.

use std::{thread, time::Duration};

use crate::{node::*, *};

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
fn the_harness_removes_its_mount_and_directory() {
    let h = Harness::new().unwrap();
    let dir = h.run_dir().to_path_buf();
    let ns = h.ns.name.clone();
    assert!(dir.join("bpffs").exists());
    drop(h);
    assert!(!dir.exists(), "{} left behind", dir.display());
    assert!(
        !std::path::Path::new("/run/netns").join(&ns).exists(),
        "namespace {ns} left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(dir.to_str().unwrap()),
        "bpffs left mounted"
    );
}
