//! The six CNI commands.
use std::{net::IpAddr, path::Path, time::Duration};

use ipnetwork::IpNetwork;
use serde_json::{json, Value};
use tracing::{info, warn};

use weir_cni_proto::Request;

use crate::{
    config::{Attachment, Env, NetConf, Version, SUPPORTED_VERSIONS},
    error::{code, CniError, Result},
    ipam::{Got, Store},
    net::{self, Handles, PodNet},
    result::{CniResult, Interface, IpConfig, Route},
};

const AGENT_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the command; Some(json) is printed to stdout.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>> {
    if env.command == "VERSION" {
        return Ok(Some(version(stdin)));
    }
    let conf = NetConf::parse(stdin)?;
    crate::log::init(conf.log_file.as_deref());
    tracing::debug!(command = %env.command, "start");
    let owner = Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let out = match env.command.as_str() {
        "ADD" => add(env, &conf, &owner).map(Some),
        "DEL" => del(&conf, &owner).map(|()| None),
        "CHECK" => check(env, &conf, &owner).map(|()| None),
        "GC" => gc(&conf).map(|()| None),
        "STATUS" => status(&conf).map(|()| None),
        _ => unreachable!("Env::from_vars accepts only CNI commands"),
    };
    if out.is_ok() {
        info!(
            command = %env.command,
            container = %env.container_id,
            ifname = %env.ifname,
            "done"
        );
    }
    out
}

/// The `cniVersion` stdin asks for, if it is one this plugin speaks.
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    serde_json::from_slice::<Value>(stdin)
        .ok()?
        .get("cniVersion")?
        .as_str()
        .filter(|v| SUPPORTED_VERSIONS.contains(v))
        .map(String::from)
}

fn version(stdin: &[u8]) -> Value {
    let asked = requested_version(stdin).unwrap_or_else(|| "1.1.0".into());
    json!({ "cniVersion": asked, "supportedVersions": SUPPORTED_VERSIONS })
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    // One thread: netlink sockets are opened by entering namespaces, which is per thread.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(code::IO, format!("start runtime: {e}")))
}

fn need_version(conf: &NetConf, min: Version, command: &str) -> Result<()> {
    if conf.version < min {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "{command} is not defined for cniVersion {}",
                conf.version_str
            ),
        ));
    }
    Ok(())
}

fn netns_of(env: &Env) -> Result<&Path> {
    env.netns
        .as_deref()
        .ok_or_else(|| CniError::new(code::INVALID_ENV, "CNI_NETNS is not set"))
}

fn add(env: &Env, conf: &NetConf, owner: &Attachment) -> Result<Value> {
    let prev = match &conf.prev_result {
        Some(v) => Some(CniResult::from_prev(v)?),
        None => None,
    };
    let netns = netns_of(env)?;
    // Fail before allocating anything when the namespace is not there.
    let pod_ns = net::open_netns(netns)?;
    let sets = conf.range_sets()?;
    let store = Store::new(&conf.data_dir, &conf.name)?;
    // The addresses, and which of them this ADD allocated: an undo gives back only those,
    // never what the owner held before (a repeated ADD for a running pod keeps its addresses).
    let (addrs, new) = {
        let l = store.lock()?;
        let mut got = Vec::new();
        for (i, set) in sets.iter().enumerate() {
            match l.allocate(i, set, owner) {
                Ok(a) => got.push(a),
                Err(e) => {
                    if let Err(u) = l.release_new(owner, &new_of(&got)) {
                        warn!("undo: release addresses of {}: {u}", owner.container_id);
                    }
                    return Err(e);
                }
            }
        }
        (
            got.iter().map(|g| g.addr()).collect::<Vec<_>>(),
            new_of(&got),
        )
    };
    tracing::debug!(addresses = ?addrs, new = ?new, "allocated");
    let host_if = net::host_if(&owner.container_id, &owner.ifname);
    let routes = net::pod_routes(conf.routes.as_deref(), &addrs);
    let made = runtime()?.block_on(async {
        let h = Handles::new(pod_ns)?;
        let mut created = false;
        let made = async {
            let p = PodNet {
                host_if: &host_if,
                ifname: &owner.ifname,
                mtu: conf.mtu,
                addrs: &addrs,
                routes: &routes,
            };
            let made = net::setup(&h, &p, &mut created).await?;
            tracing::debug!(host_if = %host_if, "links, addresses and routes made");
            if let Some(sock) = &conf.agent_socket {
                weir_cni_proto::call(
                    sock,
                    &Request::Attach {
                        ifname: host_if.clone(),
                        ifindex: made.host.index,
                    },
                    AGENT_TIMEOUT,
                )
                .map_err(|e| {
                    CniError::new(
                        code::AGENT,
                        format!("the agent did not attach the data path to {host_if}"),
                    )
                    .details(e)
                })?;
            }
            Ok(made)
        }
        .await;
        // Undo the veth: its pod side and every route through it go with it.
        if made.is_err() && created {
            if let Err(u) = net::del_link(&h.host, &host_if).await {
                warn!("undo: delete {host_if}: {u}");
            }
        }
        made
    });
    let made = match made {
        Ok(m) => m,
        Err(e) => {
            // Then the addresses this ADD allocated.
            if let Err(u) = store.lock().and_then(|l| l.release_new(owner, &new)) {
                warn!("undo: release addresses of {}: {u}", owner.container_id);
            }
            return Err(e);
        }
    };
    let mine = CniResult {
        interfaces: vec![
            Interface {
                name: host_if,
                mac: made.host.mac,
                mtu: conf.mtu,
                sandbox: None,
            },
            Interface {
                name: owner.ifname.clone(),
                mac: made.pod.mac,
                mtu: conf.mtu,
                sandbox: Some(netns.display().to_string()),
            },
        ],
        ips: addrs
            .iter()
            .map(|a| IpConfig {
                address: host_cidr(*a).to_string(),
                gateway: Some(net::gateway_of(*a)),
                interface: Some(1),
            })
            .collect(),
        routes: routes
            .iter()
            // As host-local reports them: a gateway only where one was configured; the
            // others go through the interface's gateway (the `gateway` of its IPs).
            .map(|r| Route {
                dst: r.dst.to_string(),
                gw: r.gw,
            })
            .collect(),
        dns: Default::default(),
    };
    let result = match prev {
        Some(p) => p.chain(mine),
        None => mine,
    };
    Ok(result.to_json(&conf.version_str, conf.version))
}

fn new_of(got: &[Got]) -> Vec<IpAddr> {
    got.iter()
        .filter_map(|g| match g {
            Got::New(a) => Some(*a),
            Got::Held(_) => None,
        })
        .collect()
}

fn host_cidr(a: IpAddr) -> IpNetwork {
    IpNetwork::new(a, if a.is_ipv4() { 32 } else { 128 }).expect("full-length prefix is valid")
}

/// Removes what ADD made for `owner`: the veth (with its routes), the agent's link, the
/// addresses. Each step is a no-op when its object is already gone.
fn release(conf: &NetConf, owner: &Attachment) -> Result<Vec<IpAddr>> {
    let host_if = net::host_if(&owner.container_id, &owner.ifname);
    runtime()?.block_on(async { net::del_link(&net::connect()?, &host_if).await })?;
    if let Some(sock) = &conf.agent_socket {
        // Best effort: the agent also releases links of devices that are gone.
        if let Err(e) = weir_cni_proto::call(
            sock,
            &Request::Detach {
                ifname: host_if.clone(),
            },
            AGENT_TIMEOUT,
        ) {
            info!("agent not told of {host_if} going: {e}");
        }
    }
    let store = Store::new(&conf.data_dir, &conf.name)?;
    let l = store.lock()?;
    l.release(owner)
}

fn del(conf: &NetConf, owner: &Attachment) -> Result<()> {
    release(conf, owner).map(|_| ())
}

fn check_failed(msg: String) -> CniError {
    CniError::new(code::CHECK_FAILED, msg)
}

fn check(env: &Env, conf: &NetConf, owner: &Attachment) -> Result<()> {
    need_version(conf, Version::V0_4_0, "CHECK")?;
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(code::INVALID_CONFIG, "CHECK needs the prevResult of ADD"))?;
    let prev = CniResult::from_prev(prev)?;
    let netns = netns_of(env)?;
    let host_if = net::host_if(&owner.container_id, &owner.ifname);
    let Some(pod_idx) = prev
        .interfaces
        .iter()
        .position(|i| i.name == owner.ifname && i.sandbox.is_some())
    else {
        return Err(check_failed(format!(
            "prevResult has no interface {} in a sandbox",
            owner.ifname
        )));
    };
    let mine: Vec<IpNetwork> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(pod_idx))
        .map(|ip| {
            ip.address.parse::<IpNetwork>().map_err(|e| {
                CniError::new(
                    code::DECODE,
                    format!("prevResult: address {:?}: {e}", ip.address),
                )
            })
        })
        .collect::<Result<_>>()?;
    let store = Store::new(&conf.data_dir, &conf.name)?;
    let held = store.lock()?.held_by(owner)?;
    for a in &mine {
        if !held.contains(&a.ip()) {
            return Err(check_failed(format!(
                "address {} is not allocated to {}/{}",
                a.ip(),
                owner.container_id,
                owner.ifname
            )));
        }
    }
    let host_index = runtime()?.block_on(async {
        let h = Handles::open(netns)?;
        let pod = net::link(&h.pod, &owner.ifname).await?.ok_or_else(|| {
            check_failed(format!(
                "interface {} is missing in {}",
                owner.ifname,
                netns.display()
            ))
        })?;
        if !pod.up {
            return Err(check_failed(format!("interface {} is down", owner.ifname)));
        }
        let have = net::addrs(&h.pod, pod.index).await?;
        for a in &mine {
            if !have.contains(a) {
                return Err(check_failed(format!(
                    "interface {} in {} has no address {a}",
                    owner.ifname,
                    netns.display()
                )));
            }
        }
        let pod_routes = net::routes(&h.pod).await?;
        for r in &prev.routes {
            let Ok(dst) = r.dst.parse::<IpNetwork>() else {
                continue;
            };
            if !mine.iter().any(|a| a.is_ipv4() == dst.is_ipv4()) {
                continue;
            }
            if !pod_routes
                .iter()
                .any(|k| k.dst == dst && k.oif == Some(pod.index))
            {
                return Err(check_failed(format!(
                    "the pod has no route to {dst} through {}",
                    owner.ifname
                )));
            }
        }
        let host = net::link(&h.host, &host_if)
            .await?
            .ok_or_else(|| check_failed(format!("host-side interface {host_if} is missing")))?;
        if !host.up {
            return Err(check_failed(format!(
                "host-side interface {host_if} is down"
            )));
        }
        let host_routes = net::routes(&h.host).await?;
        for a in &mine {
            let want = host_cidr(a.ip());
            if !host_routes
                .iter()
                .any(|k| k.dst == want && k.oif == Some(host.index))
            {
                return Err(check_failed(format!(
                    "the host has no route to {want} through {host_if}"
                )));
            }
        }
        Ok(host.index)
    })?;
    if let Some(sock) = &conf.agent_socket {
        weir_cni_proto::call(
            sock,
            &Request::Check {
                ifname: host_if.clone(),
                ifindex: host_index,
            },
            AGENT_TIMEOUT,
        )
        .map_err(|e| check_failed(format!("data path on {host_if}: {e}")))?;
    }
    Ok(())
}

fn gc(conf: &NetConf) -> Result<()> {
    need_version(conf, Version::V1_1_0, "GC")?;
    let valid = conf.valid_attachments.as_ref().ok_or_else(|| {
        CniError::new(
            code::INVALID_CONFIG,
            "GC needs cni.dev/valid-attachments (an empty list reclaims everything)",
        )
    })?;
    let store = Store::new(&conf.data_dir, &conf.name)?;
    let scan = match store.dir().exists() {
        true => store.lock()?.scan()?,
        false => Default::default(),
    };
    for path in &scan.unreadable {
        warn!(
            record = %path.display(),
            "GC: an address record names no owner it can read; its address stays taken \
             until it is removed by hand"
        );
    }
    let owners: std::collections::BTreeSet<Attachment> = scan.owned.into_values().collect();
    for owner in owners.iter().filter(|o| !valid.contains(o)) {
        let freed = release(conf, owner)?;
        info!(
            container = %owner.container_id,
            ifname = %owner.ifname,
            addresses = ?freed,
            "GC reclaimed a stale attachment"
        );
    }
    Ok(())
}

fn status(conf: &NetConf) -> Result<()> {
    need_version(conf, Version::V1_1_0, "STATUS")?;
    let unavailable = |msg: String| CniError::new(code::NOT_AVAILABLE, msg);
    let sets = conf
        .range_sets()
        .map_err(|e| unavailable(format!("no address range: {e}")))?;
    let store = Store::new(&conf.data_dir, &conf.name)?;
    if let Some(full) = store.lock()?.exhausted(&sets)? {
        return Err(unavailable(format!("no free address in {full}")));
    }
    if let Some(sock) = &conf.agent_socket {
        weir_cni_proto::call(sock, &Request::Ping, AGENT_TIMEOUT)
            .map_err(|e| unavailable(format!("the weir agent is not ready: {e}")))?;
    }
    Ok(())
}
