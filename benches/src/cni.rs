//! `cni` (B6 in RESULTS.md): CNI ADD and DEL latency at 1, 16 and 64 pods at once, weir-cni beside Debian's
//! `ptp` + `host-local` and `bridge` + `host-local`, in one run on one simulated node.
//!
//! Each call is timed as the runtime sees it: from spawning the plugin in the node's namespace
//! to its exit. Rounds rotate the order of the plugins so that drift of the machine spreads over
//! all of them. weir-cni runs with the agent (ADD waits for it to attach the pod's program) and
//! once more without, to show what the attachment costs.
use std::{
    path::{Path, PathBuf},
    sync::Barrier,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use serde_json::json;
use weir_proxy::tools::{
    sandbox::SERVICES,
    sim::{Options, Sim},
};
use weir_testkit::{Cni, Netns};

use crate::results;

const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// The floor: spawning a process that does nothing but read its configuration (`cat`), through
/// the same path as a plugin. No exec plugin can be faster on the machine.
const FLOOR: &str = "floor: spawn /bin/cat";

struct Plugin {
    label: &'static str,
    cni: Cni,
}

fn plugins(sim: &Sim, weir: &Path) -> Vec<Plugin> {
    let dir = sim.dir();
    let ipam = |subnet: &str, data: &str| {
        json!({
            "ranges": [[{"subnet": subnet}]],
            "routes": [{"dst": "198.18.0.0/15"}],
            "dataDir": dir.join(data),
        })
    };
    let weir_conf = |socket: &Path, subnet: &str, data: &str| {
        json!({
            "cniVersion": "1.0.0", "name": "b6", "type": "weir-cni",
            "agentSocket": socket, "ipam": ipam(subnet, data),
        })
    };
    let mut ptp = json!({"cniVersion": "1.0.0", "name": "b6", "type": "ptp"});
    ptp["ipam"] = ipam("198.18.4.0/24", "ipam-ptp");
    ptp["ipam"]["type"] = "host-local".into();
    let mut bridge = json!({
        "cniVersion": "1.0.0", "name": "b6", "type": "bridge",
        "bridge": "weirb6", "isGateway": true,
    });
    bridge["ipam"] = ipam("198.18.5.0/24", "ipam-bridge");
    bridge["ipam"]["type"] = "host-local".into();
    let weir_cni = weir.with_file_name("weir-cni");
    vec![
        Plugin {
            label: "weir-cni (with agent attach)",
            cni: Cni {
                bin: weir_cni.clone(),
                conf: weir_conf(&sim.cni_socket(), "198.18.2.0/24", "ipam-weir"),
            },
        },
        Plugin {
            label: "weir-cni (no agent)",
            cni: Cni {
                bin: weir_cni,
                conf: weir_conf(Path::new(""), "198.18.3.0/24", "ipam-weir-alone"),
            },
        },
        Plugin {
            label: FLOOR,
            cni: Cni {
                bin: PathBuf::from("/bin/cat"),
                conf: json!({}),
            },
        },
        Plugin {
            label: "ptp + host-local",
            cni: Cni {
                bin: PathBuf::from(REFERENCE_PLUGINS).join("ptp"),
                conf: ptp,
            },
        },
        Plugin {
            label: "bridge + host-local",
            cni: Cni {
                bin: PathBuf::from(REFERENCE_PLUGINS).join("bridge"),
                conf: bridge,
            },
        },
    ]
}

/// Runs `command` for every pod at once (released together by a barrier); each call's time.
fn burst(sim: &Sim, p: &Plugin, pods: &[Netns], command: &str) -> Result<Vec<Duration>> {
    let barrier = Barrier::new(pods.len());
    thread::scope(|s| {
        let hs: Vec<_> = pods
            .iter()
            .map(|pod| {
                let barrier = &barrier;
                s.spawn(move || -> Result<Duration> {
                    barrier.wait();
                    let t = Instant::now();
                    let (ok, out, err) = p.cni.exec_raw(
                        &sim.node.ns,
                        command,
                        &pod.name,
                        Some(&pod.path()),
                        "eth0",
                        &p.cni.conf,
                    )?;
                    let took = t.elapsed();
                    if !ok {
                        bail!(
                            "{} {command} {}: {} {}",
                            p.label,
                            pod.name,
                            out.trim(),
                            err.trim()
                        );
                    }
                    Ok(took)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("thread panicked"))?)
            .collect()
    })
}

pub(crate) fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

pub fn run(weir: &Path, quick: bool) -> Result<String> {
    let sim = Sim::start(Options {
        weir_bin: weir.to_path_buf(),
        backends: 0,
        socket_lb: false,
        services_yaml: SERVICES.into(),
        prefix: "b".into(),
    })?;
    let plugins = plugins(&sim, weir);
    // (concurrency, rounds)
    let plan: &[(usize, usize)] = if quick {
        &[(1, 10), (16, 1), (64, 1)]
    } else {
        &[(1, 100), (16, 8), (64, 3)]
    };
    let mut rows = Vec::new();
    for &(conc, rounds) in plan {
        let mut add: Vec<Vec<Duration>> = vec![Vec::new(); plugins.len()];
        let mut del: Vec<Vec<Duration>> = vec![Vec::new(); plugins.len()];
        for round in 0..rounds {
            eprint!("\rB6: {conc} at once, round {}/{rounds}   ", round + 1);
            for k in 0..plugins.len() {
                let i = (k + round) % plugins.len();
                let pods: Vec<Netns> = (0..conc)
                    .map(|n| Netns::create(&format!("weir-{}-b6p{n}", sim.tag)))
                    .collect::<Result<_>>()?;
                add[i].extend(burst(&sim, &plugins[i], &pods, "ADD")?);
                if plugins[i].label != FLOOR {
                    del[i].extend(burst(&sim, &plugins[i], &pods, "DEL")?);
                }
            }
        }
        eprintln!();
        for (i, p) in plugins.iter().enumerate() {
            add[i].sort();
            del[i].sort();
            rows.push((
                conc,
                p.label,
                pct(&add[i], 0.5),
                pct(&add[i], 0.99),
                pct(&del[i], 0.5),
                pct(&del[i], 0.99),
                add[i].len(),
            ));
        }
    }
    // What the agent spends attaching tc_from_pod, from its own log.
    let mut attach: Vec<u64> = std::fs::read_to_string(sim.agent_log())?
        .lines()
        .filter(|l| l.contains("attached tc_from_pod"))
        .filter_map(|l| {
            l.split("took_us=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    attach.sort();
    let attach_pct = |p: f64| {
        attach
            .get(((attach.len().max(1) - 1) as f64 * p).round() as usize)
            .map(|us| *us as f64 / 1e3)
            .unwrap_or(f64::NAN)
    };
    let mut s = String::new();
    s += "## B6: CNI ADD and DEL latency (weir-cni vs ptp+host-local and bridge+host-local)\n\n";
    s += &results::machine();
    s += "\nEach call timed from spawning the plugin in the node's namespace to its exit, all pods of a \
          burst released at once. IPv4, cniVersion 1.0.0, Debian containernetworking-plugins 1.1.1. \
          `weir-cni (with agent attach)` includes the round trip to the agent, which attaches \
          tc_from_pod to the new veth (a clsact filter) before ADD returns. The floor row spawns           `/bin/cat` the same way, fed the same way: what any exec plugin pays before its own           work.\n\n";
    s += "| pods at once | plugin | ADD p50 ms | ADD p99 ms | DEL p50 ms | DEL p99 ms | calls |\n";
    s += "|---:|---|---:|---:|---:|---:|---:|\n";
    for r in &rows {
        if r.1 == FLOOR {
            s += &format!(
                "| {} | {} | {:.2} | {:.2} | | | {} |\n",
                r.0, r.1, r.2, r.3, r.6
            );
            continue;
        }
        s += &format!(
            "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |\n",
            r.0, r.1, r.2, r.3, r.4, r.5, r.6
        );
    }
    s += "\nRatios, ADD p50 of the reference over weir-cni with agent (above 1: weir is faster):\n\n";
    s += "| pods at once | ptp+host-local / weir | bridge+host-local / weir |\n|---:|---:|---:|\n";
    for &(conc, _) in plan {
        let get = |label: &str| {
            rows.iter()
                .find(|r| r.0 == conc && r.1 == label)
                .map(|r| r.2)
                .unwrap_or(f64::NAN)
        };
        let w = get("weir-cni (with agent attach)");
        s += &format!(
            "| {conc} | {:.1}x | {:.1}x |\n",
            get("ptp + host-local") / w,
            get("bridge + host-local") / w
        );
    }
    s += &format!(
        "\nThe agent's attach of tc_from_pod (clsact filter create), from its log: p50 {:.2} ms, \
         p99 {:.2} ms over {} attaches.\n",
        attach_pct(0.5),
        attach_pct(0.99),
        attach.len()
    );
    s += "\nTarget: ADD p50 at most 2 ms with 16 pods at once, and faster than both reference pairs.\n";
    Ok(s)
}
