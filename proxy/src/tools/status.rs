//! `weir status`: what is programmed, read from the pinned maps.
use std::{collections::BTreeMap, path::Path};

use anyhow::{Context, Result};
use aya::maps::{HashMap, MapData, PerCpuArray};
use serde::Serialize;
use weir_common::{
    map_names, Backend, SvcKey, SvcValue, CT_DIR_FORWARD, CT_F_CLOSING, CT_F_HAIRPIN, STAT_COUNT,
    STAT_NAMES, SVC_F_AFFINITY, SVC_F_MAGLEV,
};

use crate::{
    datapath::{
        addr::{host_port, to_ip},
        kernel_facts, open_typed, recorded_pod_devs, Conntrack, SvcKeyOrd,
    },
    model::{proto_name, ServiceReport},
};

#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    pub frontend: String,
    pub svc_id: u32,
    pub algorithm: &'static str,
    pub affinity_timeout_s: Option<u32>,
    /// With no backend: "reject" (no endpoint anywhere) or "drop" (none for this traffic).
    pub when_empty: &'static str,
    pub backends: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct CtEntry {
    pub flow: String,
    pub direction: &'static str,
    pub nat: String,
    /// The other side's rewrite (hairpin and source-NATed flows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub flags: Vec<&'static str>,
}

#[derive(Debug, Serialize)]
pub struct Status {
    /// The agent's last report per Service (None: no report file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_service: Option<Vec<ServiceReport>>,
    pub services: Vec<ServiceStatus>,
    pub backends: usize,
    pub conntrack_entries: usize,
    pub conntrack: Vec<CtEntry>,
    pub counters: BTreeMap<&'static str, u64>,
    /// The node's own DNS server as the data path sees it (None: never set on this node).
    pub node_local_dns: Option<NodeLocalDns>,
    /// The pod veths (host side, by ifindex) the per-packet path hands packets straight into
    /// (`LB_PODDEV_V1`, which the agent keeps).
    pub pod_veths: Vec<u32>,
}

fn pod_veths(maps_dir: &Path) -> Result<Vec<u32>> {
    let map: aya::maps::Array<MapData, u32> = open_typed(maps_dir, map_names::POD_DEVS)?;
    let mut out = recorded_pod_devs(&map)?;
    out.sort_unstable();
    Ok(out)
}

/// The node-local DNS lease (`LB_NODELOC`): where the cluster DNS Service's queries go while
/// it is valid.
#[derive(Debug, Serialize)]
pub struct NodeLocalDns {
    pub servers: Vec<String>,
    /// Milliseconds the lease has left; 0: withdrawn or expired (queries go to the Service's
    /// endpoints).
    pub valid_for_ms: u64,
}

fn node_local_dns(maps_dir: &Path) -> Result<Option<NodeLocalDns>> {
    let map: aya::maps::Array<MapData, weir_common::NodeLocal> =
        open_typed(maps_dir, map_names::NODE_LOCAL)?;
    let e = map
        .get(&0, 0)
        .with_context(|| format!("read {}", map_names::NODE_LOCAL))?;
    let port = u16::from_be(e.port);
    if port == 0 {
        return Ok(None);
    }
    let servers = [e.addr4, e.addr6]
        .iter()
        .filter(|a| a.0 != [0; 16])
        .map(|a| host_port(to_ip(a), port))
        .collect();
    let now_ns = kernel_facts::clock_ns()?;
    Ok(Some(NodeLocalDns {
        servers,
        valid_for_ms: e.expires_ns.saturating_sub(now_ns) / 1_000_000,
    }))
}

fn fmt_addr(a: &weir_common::Addr, port_be: u16) -> String {
    host_port(to_ip(a), u16::from_be(port_be))
}

pub fn read(maps_dir: &Path, ct_limit: usize) -> Result<Status> {
    let svc: HashMap<MapData, SvcKey, SvcValue> = open_typed(maps_dir, map_names::SVC)?;
    let be: HashMap<MapData, u32, Backend> = open_typed(maps_dir, map_names::BACKENDS)?;
    let ct = Conntrack::open(maps_dir)?;
    let stats: PerCpuArray<MapData, u64> = open_typed(maps_dir, map_names::STATS)?;

    let backends: BTreeMap<u32, Backend> = be
        .iter()
        .collect::<Result<_, _>>()
        .context("read backends")?;
    let entries: Vec<(SvcKey, SvcValue)> = svc
        .iter()
        .collect::<Result<_, _>>()
        .context("read services")?;
    let slots: BTreeMap<(SvcKeyOrd, u16), u32> = entries
        .iter()
        .filter(|(k, _)| k.slot != 0)
        .map(|(k, v)| {
            (
                (SvcKeyOrd::from(&SvcKey { slot: 0, ..*k }), k.slot),
                v.backend_id,
            )
        })
        .collect();
    let mut services: Vec<ServiceStatus> = entries
        .iter()
        .filter(|(k, _)| k.slot == 0)
        .map(|(k, v)| {
            let ord = SvcKeyOrd::from(k);
            let backends = (1..=v.count)
                .map(
                    |s| match slots.get(&(ord, s)).and_then(|id| backends.get(id)) {
                        Some(b) => fmt_addr(&b.addr, b.port),
                        None => format!("<slot {s} missing>"),
                    },
                )
                .collect();
            ServiceStatus {
                frontend: format!(
                    "{}/{}{}",
                    fmt_addr(&k.addr, k.port),
                    proto_name(k.proto),
                    if k.scope == weir_common::SCOPE_EXTERNAL {
                        " (external)"
                    } else {
                        ""
                    }
                ),
                svc_id: v.svc_id,
                algorithm: if v.flags & SVC_F_MAGLEV != 0 {
                    "maglev"
                } else {
                    "random"
                },
                affinity_timeout_s: (v.flags & SVC_F_AFFINITY != 0).then_some(v.affinity_timeout_s),
                when_empty: if v.flags & weir_common::SVC_F_DROP_EMPTY != 0 {
                    "drop"
                } else {
                    "reject"
                },
                backends,
            }
        })
        .collect();
    services.sort_by(|a, b| a.frontend.cmp(&b.frontend));

    let mut conntrack = Vec::new();
    let mut conntrack_entries = 0;
    ct.for_each(|k, v| {
        conntrack_entries += 1;
        if conntrack.len() < ct_limit {
            let mut flags = Vec::new();
            if v.flags & CT_F_HAIRPIN != 0 {
                flags.push("hairpin");
            }
            if v.flags & CT_F_CLOSING != 0 {
                flags.push("closing");
            }
            if v.flags & weir_common::CT_F_SNAT != 0 {
                flags.push("snat");
            }
            conntrack.push(CtEntry {
                flow: format!(
                    "{} {} -> {}",
                    proto_name(k.proto),
                    fmt_addr(&k.src, k.sport),
                    fmt_addr(&k.dst, k.dport)
                ),
                direction: if v.dir == CT_DIR_FORWARD {
                    "forward"
                } else {
                    "reply"
                },
                nat: fmt_addr(&v.nat_addr, v.nat_port),
                peer: (v.flags & (CT_F_HAIRPIN | weir_common::CT_F_SNAT) != 0)
                    .then(|| fmt_addr(&v.peer_addr, v.peer_port)),
                flags,
            });
        }
    })
    .context("read conntrack")?;
    let mut counters = BTreeMap::new();
    for i in 0..STAT_COUNT {
        let per_cpu = stats
            .get(&i, 0)
            .with_context(|| format!("read counter {}", STAT_NAMES[i as usize]))?;
        let n: u64 = per_cpu.iter().sum();
        counters.insert(STAT_NAMES[i as usize], n);
    }
    Ok(Status {
        by_service: None,
        services,
        backends: backends.len(),
        conntrack_entries,
        conntrack,
        counters,
        node_local_dns: node_local_dns(maps_dir)?,
        pod_veths: pod_veths(maps_dir)?,
    })
}

/// The agent's per-Service report, if it wrote one.
pub fn read_reports(path: &Path) -> Result<Option<Vec<ServiceReport>>> {
    match std::fs::read(path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .with_context(|| format!("read the agent's report {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("read {}", path.display())),
    }
}

pub fn render(s: &Status) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    if let Some(by) = &s.by_service {
        let _ = writeln!(o, "by Service ({}, from the agent's last sync)", by.len());
        for r in by {
            let _ = writeln!(
                o,
                "  {:<28} {}{}",
                r.service,
                r.state,
                if r.frontends.is_empty() {
                    String::new()
                } else {
                    format!(" ({} frontends)", r.frontends.len())
                }
            );
            for p in &r.problems {
                let _ = writeln!(o, "      {p}");
            }
        }
    }
    let _ = writeln!(
        o,
        "services ({} frontends, {} backends)",
        s.services.len(),
        s.backends
    );
    for sv in &s.services {
        let aff = sv
            .affinity_timeout_s
            .map(|t| format!(", affinity {t}s"))
            .unwrap_or_default();
        let _ = writeln!(
            o,
            "  {:<28} {}{}  -> {}",
            sv.frontend,
            sv.algorithm,
            aff,
            if sv.backends.is_empty() && sv.when_empty == "drop" {
                "(no endpoint for this traffic: dropped)".into()
            } else if sv.backends.is_empty() {
                "(no endpoints: rejected)".into()
            } else {
                sv.backends.join(", ")
            }
        );
    }
    if let Some(d) = &s.node_local_dns {
        let _ = writeln!(
            o,
            "node-local DNS: {} ({})",
            d.servers.join(", "),
            if d.valid_for_ms > 0 {
                format!("lease valid for {:.1} s", d.valid_for_ms as f64 / 1000.0)
            } else {
                "lease withdrawn: queries go to the Service's endpoints".into()
            }
        );
    }
    if !s.pod_veths.is_empty() {
        let list: Vec<String> = s.pod_veths.iter().map(|i| i.to_string()).collect();
        let _ = writeln!(
            o,
            "pod veths packets are handed straight into: {} (indexes {})",
            s.pod_veths.len(),
            list.join(", ")
        );
    }
    let _ = writeln!(o, "conntrack ({} entries)", s.conntrack_entries);
    for c in &s.conntrack {
        let _ = writeln!(
            o,
            "  {:<7} {}  nat {}{} {}",
            c.direction,
            c.flow,
            c.nat,
            c.peer
                .as_deref()
                .map(|p| format!(" peer {p}"))
                .unwrap_or_default(),
            c.flags.join(",")
        );
    }
    let _ = writeln!(o, "counters");
    for (k, v) in s.counters.iter().filter(|(_, v)| **v > 0) {
        let _ = writeln!(o, "  {k:<24} {v}");
    }
    o
}
