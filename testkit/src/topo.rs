//! Topology the tests build beyond what the sandbox needs: pods wired by hand (no CNI), a shared
//! segment between nodes (`Lan`), and what programs sit on a node's devices.
use anyhow::{bail, Context, Result};
use weir_proxy::{
    datapath::{tc_ingress, TcProgram},
    tools::sim::topo::{pod_ip4, pod_ip6, pod_netns, Netns, Node, Pod, GATEWAY4, GATEWAY6},
};

/// What the tests do with a simulated node besides what the sandbox does.
pub trait NodeExt {
    /// The programs on the TC ingress of `dev`, a device of the node.
    fn tc_ingress(&self, dev: &str) -> Result<Vec<TcProgram>>;
    /// The ids of `tc_from_pod` programs on the TC ingress of `dev`, with whether each is a
    /// clsact filter.
    fn pod_programs(&self, dev: &str) -> Result<Vec<(u32, bool)>>;
    /// Adds pod `name` with 198.18.1.`n` and fd00:18::`n`, its veth wired by hand as a routed
    /// CNI would (no weir-cni, no agent asked).
    fn add_pod(&mut self, name: &str, n: u8) -> Result<&Pod>;
}

impl NodeExt for Node {
    fn tc_ingress(&self, dev: &str) -> Result<Vec<TcProgram>> {
        let dev = dev.to_string();
        Ok(self.ns.run(move || tc_ingress(&dev))??)
    }

    fn pod_programs(&self, dev: &str) -> Result<Vec<(u32, bool)>> {
        Ok(self
            .tc_ingress(dev)?
            .into_iter()
            .filter(|p| p.name == weir_common::prog_names::TC_FROM_POD)
            .map(|p| (p.id, p.filter))
            .collect())
    }

    fn add_pod(&mut self, name: &str, n: u8) -> Result<&Pod> {
        let ns = pod_netns(&self.tag, name)?;
        let host_if = format!("w{}{}", &self.tag[..self.tag.len().min(8)], n);
        let (ip4, ip6) = (pod_ip4(n), pod_ip6(n));
        let pod = Pod {
            name: name.into(),
            ns,
            ip4,
            ip6,
            host_if,
            via_cni: false,
        };
        wire(&self.ns, &pod)?;
        self.pods.push(pod);
        Ok(self.pods.last().expect("just pushed"))
    }
}

/// The veth pair, addresses and routes of a pod, as a routed CNI sets them up.
fn wire(node: &Netns, pod: &Pod) -> Result<()> {
    let (ns, host_if) = (&pod.ns, pod.host_if.as_str());
    let (ip4, ip6) = (pod.ip4, pod.ip6);
    node.ip(&[
        "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
    ])?;
    node.sysctl(&format!("net.ipv6.conf.{host_if}.accept_dad"), "0")?;
    node.ip(&["link", "set", host_if, "up"])?;
    node.ip(&["addr", "add", &format!("{GATEWAY4}/32"), "dev", host_if])?;
    node.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{GATEWAY6}/64"),
        "dev",
        host_if,
        "nodad",
    ])?;
    node.ip(&["route", "add", &format!("{ip4}/32"), "dev", host_if])?;
    node.ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", host_if])?;
    ns.ip(&["link", "set", "eth0", "up"])?;
    ns.ip(&["addr", "add", &format!("{ip4}/32"), "dev", "eth0"])?;
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{ip6}/128"),
        "dev",
        "eth0",
        "nodad",
    ])?;
    ns.ip(&["route", "add", GATEWAY4, "dev", "eth0", "scope", "link"])?;
    // Only the test ranges are routed: nothing can leave for any other address.
    ns.ip(&[
        "route",
        "add",
        "198.18.0.0/15",
        "via",
        GATEWAY4,
        "dev",
        "eth0",
    ])?;
    ns.ip(&[
        "-6", "route", "add", "fd00::/8", "via", GATEWAY6, "dev", "eth0",
    ])?;
    Ok(())
}

/// A shared link-layer segment: a bridge in its own namespace `weir-<tag>-lan`, which other
/// namespaces join through a veth each (the uplinks of nodes, an outside client).
#[derive(Debug)]
pub struct Lan {
    pub ns: Netns,
    ports: u32,
    /// Checksums in software on the links joined from now on (see `software_checksums`).
    software_checksums: bool,
}

impl Lan {
    pub fn create(tag: &str) -> Result<Self> {
        let ns = Netns::create(&format!("weir-{tag}-lan"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Lan {
            ns,
            ports: 0,
            software_checksums: false,
        })
    }

    /// Turns checksum offloads off on both ends of every link joined from now on: a sender
    /// computes its L4 checksums in full (a forwarded CHECKSUM_PARTIAL packet is completed
    /// on the way out), and every receiver checks them instead of trusting the veth. A
    /// rewrite that leaves a wrong checksum then loses the packet, as a real NIC would.
    pub fn software_checksums(&mut self) {
        self.software_checksums = true;
    }

    /// Gives `ns` a device `dev` on the segment with addresses `addrs` (CIDR notation).
    pub fn join(&mut self, ns: &Netns, dev: &str, addrs: &[&str]) -> Result<()> {
        let port = format!("p{}", self.ports);
        self.ports += 1;
        self.ns.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", dev, "netns", &ns.name,
        ])?;
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"])?;
        ns.sysctl(&format!("net.ipv6.conf.{dev}.accept_dad"), "0")?;
        if self.software_checksums {
            offloads_off(&self.ns, &port)?;
            offloads_off(ns, dev)?;
        }
        ns.ip(&["link", "set", dev, "up"])?;
        for a in addrs {
            if a.contains(':') {
                ns.ip(&["-6", "addr", "add", a, "dev", dev, "nodad"])?;
            } else {
                ns.ip(&["addr", "add", a, "dev", dev])?;
            }
        }
        Ok(())
    }
}

/// `ethtool -K dev tx off rx off` in `ns`.
fn offloads_off(ns: &Netns, dev: &str) -> Result<()> {
    let out = ns
        .command("ethtool")?
        .args(["-K", dev, "tx", "off", "rx", "off"])
        .output()
        .context("run `ethtool` (`cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "ethtool -K {dev} tx off rx off in {}: {}",
            ns.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
