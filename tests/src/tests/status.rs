//! `weir status`: what is programmed, as an operator reads it.

use crate::{node::*, *};

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
