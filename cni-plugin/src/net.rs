//! The pod's links, addresses and routes, through netlink.
//!
//! A netlink socket belongs to the network namespace it was created in. The plugin runs on a
//! current-thread runtime, enters the pod's namespace just long enough to open a socket there,
//! and comes back: every later request goes to the right namespace without another `setns`.
use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    path::Path,
};

use futures_util::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
    AddressFamily,
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};
use sha2::{Digest, Sha256};

use crate::{
    config::Route,
    error::{code, io, CniError, Result},
};

/// The pod's gateway: link-local, on every host-side veth, so no pod address is spent on it.
pub const GATEWAY4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Host-side veth names start with this; the agent knows them by it.
pub const HOST_IF_PREFIX: &str = "weir";

/// The host side's name: stable for one attachment, so DEL and GC find it from the
/// container id and interface name alone.
pub fn host_if(container_id: &str, ifname: &str) -> String {
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{HOST_IF_PREFIX}{}", &hex[..15 - HOST_IF_PREFIX.len()])
}

fn nl(what: impl std::fmt::Display, e: rtnetlink::Error) -> CniError {
    CniError::new(code::NETLINK, format!("{what}: {}", describe(&e)))
}

fn describe(e: &rtnetlink::Error) -> String {
    match e {
        rtnetlink::Error::NetlinkError(m) => match m.code {
            Some(c) => std::io::Error::from_raw_os_error(-c.get()).to_string(),
            None => m.to_string(),
        },
        other => other.to_string(),
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Runs `f` with the calling thread in the namespace `ns`, then returns to where it was.
fn in_ns<T>(ns: &fs::File, f: impl FnOnce() -> T) -> Result<T> {
    use nix::sched::{setns, CloneFlags};
    let here = fs::File::open("/proc/thread-self/ns/net")
        .map_err(|e| CniError::new(code::IO, format!("open own network namespace: {e}")))?;
    setns(ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::new(code::IO, format!("enter the pod's namespace: {e}")))?;
    let out = f();
    setns(&here, CloneFlags::CLONE_NEWNET)
        .map_err(|e| CniError::new(code::IO, format!("return to the host namespace: {e}")))?;
    Ok(out)
}

/// A netlink handle in the calling thread's namespace.
pub fn connect() -> Result<Handle> {
    let (conn, handle, _) = rtnetlink::new_connection()
        .map_err(|e| CniError::new(code::IO, format!("open netlink socket: {e}")))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Netlink handles for the host's namespace and the pod's.
pub struct Handles {
    pub host: Handle,
    pub pod: Handle,
    pub pod_ns: fs::File,
}

impl Handles {
    pub fn open(netns: &Path) -> Result<Handles> {
        Handles::new(open_netns(netns)?)
    }

    pub fn new(pod_ns: fs::File) -> Result<Handles> {
        let host = connect()?;
        let pod = in_ns(&pod_ns, connect)??;
        Ok(Handles { host, pod, pod_ns })
    }
}

/// Opens the pod's network namespace: `netns` must name a network namespace, and not the one
/// the plugin runs in (the node's: configuring it as a pod would put a pod's addresses and
/// routes on the node).
pub fn open_netns(netns: &Path) -> Result<fs::File> {
    use std::os::{fd::AsRawFd, unix::fs::MetadataExt};
    let f = fs::File::open(netns).map_err(|e| {
        CniError::new(
            code::UNKNOWN_CONTAINER,
            format!("network namespace {}: {e}", netns.display()),
        )
    })?;
    // NS_GET_NSTYPE (_IO(0xb7, 0x3)): the type of the namespace a file is, or an error when it
    // is none.
    const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
    // SAFETY: the ioctl takes no argument and only reads the descriptor it is given.
    let kind = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind != libc::CLONE_NEWNET {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_NETNS {} is not a network namespace", netns.display()),
        )
        .details(
            "it must name a network namespace, such as /proc/PID/ns/net or a bind mount of one",
        ));
    }
    let own = fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| io("stat /proc/thread-self/ns/net", e))?;
    let pod = f
        .metadata()
        .map_err(|e| io(format!("stat {}", netns.display()), e))?;
    if (pod.dev(), pod.ino()) == (own.dev(), own.ino()) {
        return Err(CniError::new(
            code::INVALID_ENV,
            format!(
                "CNI_NETNS {} is the node's own network namespace, not a pod's",
                netns.display()
            ),
        ));
    }
    Ok(f)
}

#[derive(Debug, Clone)]
pub struct Link {
    pub index: u32,
    pub mac: String,
    pub up: bool,
}

fn link_of(m: &LinkMessage) -> Link {
    let mac = m
        .attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(b) => Some(
                b.iter()
                    .map(|x| format!("{x:02x}"))
                    .collect::<Vec<_>>()
                    .join(":"),
            ),
            _ => None,
        })
        .unwrap_or_default();
    Link {
        index: m.header.index,
        mac,
        up: m.header.flags.contains(LinkFlags::Up),
    }
}

/// The link called `name`, or None when there is none.
pub async fn link(h: &Handle, name: &str) -> Result<Option<Link>> {
    let mut s = h.link().get().match_name(name.to_string()).execute();
    match s.try_next().await {
        Ok(Some(m)) => Ok(Some(link_of(&m))),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl(format!("look up link {name}"), e)),
    }
}

/// Deletes the link called `name`; true if there was one.
pub async fn del_link(h: &Handle, name: &str) -> Result<bool> {
    let Some(l) = link(h, name).await? else {
        return Ok(false);
    };
    match h.link().del(l.index).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(libc::ENODEV) => Ok(false),
        Err(e) => Err(nl(format!("delete link {name}"), e)),
    }
}

/// What `setup` wants.
pub struct PodNet<'a> {
    pub host_if: &'a str,
    pub ifname: &'a str,
    pub mtu: Option<u32>,
    pub addrs: &'a [IpAddr],
    pub routes: &'a [Route],
}

pub struct Made {
    pub host: Link,
    pub pod: Link,
}

/// Writes a sysctl in the calling thread's namespace.
fn sysctl(key: &str, value: &str) -> Result<()> {
    let path = format!("/proc/sys/{key}");
    fs::write(&path, value).map_err(|e| CniError::new(code::IO, format!("write {path}: {e}")))
}

/// The routes the pod gets: the configured ones, or a default route per family it has.
pub fn pod_routes(configured: Option<&[Route]>, addrs: &[IpAddr]) -> Vec<Route> {
    let (v4, v6) = (
        addrs.iter().any(|a| a.is_ipv4()),
        addrs.iter().any(|a| a.is_ipv6()),
    );
    match configured {
        Some(rs) => rs
            .iter()
            .filter(|r| if r.dst.is_ipv4() { v4 } else { v6 })
            .cloned()
            .collect(),
        None => {
            let mut rs = Vec::new();
            if v4 {
                rs.push(Route {
                    dst: "0.0.0.0/0".parse().expect("valid CIDR"),
                    gw: None,
                });
            }
            if v6 {
                rs.push(Route {
                    dst: "::/0".parse().expect("valid CIDR"),
                    gw: None,
                });
            }
            rs
        }
    }
}

pub fn gateway_of(a: IpAddr) -> IpAddr {
    if a.is_ipv4() {
        GATEWAY4.into()
    } else {
        GATEWAY6.into()
    }
}

/// Creates the veth pair with its pod side already in the pod's namespace, and everything
/// around it. On error the caller deletes the host side, which takes the pod side with it.
/// Returns as soon as the pair exists through `created`, so the caller knows what to undo.
pub async fn setup(h: &Handles, p: &PodNet<'_>, created: &mut bool) -> Result<Made> {
    let has6 = p.addrs.iter().any(|a| a.is_ipv6());
    if link(&h.pod, p.ifname).await?.is_some() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!(
                "interface {} already exists in the pod's namespace",
                p.ifname
            ),
        ));
    }
    let mut peer = LinkUnspec::new_with_name(p.ifname).setns_by_fd(h.pod_ns.as_raw_fd());
    let mut host = LinkMessageBuilder::<LinkVeth>::new_with_info_kind(InfoKind::Veth)
        .name(p.host_if.to_string());
    if let Some(mtu) = p.mtu {
        peer = peer.mtu(mtu);
        host = host.mtu(mtu);
    }
    let msg = host
        .set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())))
        .build();
    h.host.link().add(msg).execute().await.map_err(|e| {
        nl(
            format!("create veth {} (pod side {})", p.host_if, p.ifname),
            e,
        )
    })?;
    *created = true;
    tracing::debug!("veth created");
    let missing =
        |n: &str| CniError::new(code::NETLINK, format!("link {n} vanished after creation"));
    let host_link = link(&h.host, p.host_if)
        .await?
        .ok_or_else(|| missing(p.host_if))?;
    let pod_link = link(&h.pod, p.ifname)
        .await?
        .ok_or_else(|| missing(p.ifname))?;

    // No duplicate address detection: the addresses are ours alone, and DAD would hold IPv6
    // back for a second or more.
    if has6 {
        sysctl(&format!("net/ipv6/conf/{}/accept_dad", p.host_if), "0")?;
        let ifname = p.ifname.to_string();
        in_ns(&h.pod_ns, move || {
            sysctl(&format!("net/ipv6/conf/{ifname}/accept_dad"), "0")
        })??;
    }

    // Host side: the link-local gateway the pod routes through.
    for fam6 in [false, true] {
        if !p.addrs.iter().any(|a| a.is_ipv6() == fam6) {
            continue;
        }
        let (gw, len): (IpAddr, u8) = if fam6 {
            (GATEWAY6.into(), 64)
        } else {
            (GATEWAY4.into(), 32)
        };
        add_addr(&h.host, host_link.index, gw, len)
            .await
            .map_err(|e| nl(format!("add {gw}/{len} to {}", p.host_if), e))?;
    }
    set_up(&h.host, host_link.index, p.host_if).await?;

    // Pod side: its addresses, the gateway on-link, the routes through it.
    set_up(&h.pod, pod_link.index, p.ifname).await?;
    for a in p.addrs {
        let len = if a.is_ipv4() { 32 } else { 128 };
        add_addr(&h.pod, pod_link.index, *a, len)
            .await
            .map_err(|e| nl(format!("add {a}/{len} to {} in the pod", p.ifname), e))?;
    }
    if p.addrs.iter().any(|a| a.is_ipv4()) {
        add_route(&h.pod, GATEWAY4.into(), 32, None, pod_link.index, true)
            .await
            .map_err(|e| nl(format!("route {GATEWAY4} dev {} in the pod", p.ifname), e))?;
    }
    for r in p.routes {
        let gw = r.gw.unwrap_or_else(|| gateway_of(r.dst.ip()));
        add_route(
            &h.pod,
            r.dst.network(),
            r.dst.prefix(),
            Some(gw),
            pod_link.index,
            false,
        )
        .await
        .map_err(|e| nl(format!("route {} via {gw} in the pod", r.dst), e))?;
    }

    // Host side: a host route to each pod address.
    for a in p.addrs {
        let len = if a.is_ipv4() { 32 } else { 128 };
        add_route(&h.host, *a, len, None, host_link.index, true)
            .await
            .map_err(|e| nl(format!("route {a}/{len} dev {}", p.host_if), e))?;
    }
    Ok(Made {
        host: Link {
            up: true,
            ..host_link
        },
        pod: Link {
            up: true,
            ..pod_link
        },
    })
}

async fn set_up(h: &Handle, index: u32, name: &str) -> Result<()> {
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| nl(format!("set {name} up"), e))
}

async fn add_addr(h: &Handle, index: u32, a: IpAddr, len: u8) -> Result<(), rtnetlink::Error> {
    let mut req = h.address().add(index, a, len);
    if a.is_ipv6() {
        let m = req.message_mut();
        m.header.flags |= AddressHeaderFlags::Nodad;
        m.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    req.execute().await
}

fn invalid(e: impl std::fmt::Display) -> rtnetlink::Error {
    rtnetlink::Error::InvalidNla(e.to_string())
}

async fn add_route(
    h: &Handle,
    dst: IpAddr,
    len: u8,
    gw: Option<IpAddr>,
    oif: u32,
    on_link: bool,
) -> Result<(), rtnetlink::Error> {
    let mut b = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(dst, len)
        .map_err(invalid)?
        .output_interface(oif);
    if let Some(gw) = gw {
        b = b.gateway(gw).map_err(invalid)?;
    }
    if on_link {
        b = b.scope(RouteScope::Link);
    }
    h.route().add(b.build()).execute().await
}

/// A route as the kernel lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
    pub oif: Option<u32>,
}

fn route_addr(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some((*a).into()),
        RouteAddress::Inet6(a) => Some((*a).into()),
        _ => None,
    }
}

fn kernel_route(m: &RouteMessage) -> Option<KernelRoute> {
    let v4 = m.header.address_family == AddressFamily::Inet;
    let mut dst = None;
    let mut gw = None;
    let mut oif = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = route_addr(d),
            RouteAttribute::Gateway(g) => gw = route_addr(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let dst = dst.unwrap_or(if v4 {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    });
    let dst = IpNetwork::new(dst, m.header.destination_prefix_length).ok()?;
    Some(KernelRoute { dst, gw, oif })
}

/// The main table's routes of both families.
pub async fn routes(h: &Handle) -> Result<Vec<KernelRoute>> {
    let mut out = Vec::new();
    for msg in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut s = h.route().get(msg).execute();
        while let Some(m) = s.try_next().await.map_err(|e| nl("list routes", e))? {
            out.extend(kernel_route(&m));
        }
    }
    Ok(out)
}

/// The addresses (with prefix lengths) on the link `index`.
pub async fn addrs(h: &Handle, index: u32) -> Result<Vec<IpNetwork>> {
    let mut out = Vec::new();
    let mut s = h.address().get().set_link_index_filter(index).execute();
    while let Some(m) = s.try_next().await.map_err(|e| nl("list addresses", e))? {
        if m.header.index != index {
            continue;
        }
        for a in &m.attributes {
            if let AddressAttribute::Address(ip) = a {
                if let Ok(n) = IpNetwork::new(*ip, m.header.prefix_len) {
                    out.push(n);
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_side_names_are_stable_short_and_distinct() {
        let a = host_if("c0ffee", "eth0");
        assert_eq!(a, host_if("c0ffee", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(a.starts_with(HOST_IF_PREFIX));
        assert_ne!(a, host_if("c0ffee", "eth1"));
        assert_ne!(a, host_if("c0ffef", "eth0"));
    }

    #[test]
    fn without_configured_routes_each_family_gets_a_default_route() {
        let addrs: Vec<IpAddr> = vec!["198.18.1.2".parse().unwrap()];
        let r = pod_routes(None, &addrs);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].dst.to_string(), "0.0.0.0/0");
        let configured = vec![
            Route {
                dst: "198.18.0.0/15".parse().unwrap(),
                gw: None,
            },
            Route {
                dst: "fd00::/8".parse().unwrap(),
                gw: None,
            },
        ];
        // A route of a family the pod has no address of is left out.
        assert_eq!(
            pod_routes(Some(&configured), &addrs),
            configured[..1].to_vec()
        );
    }
}
