//! The node's pod veths as the programs know them (`LB_PODDEV_V1`): a packet routed to one is
//! handed straight into the pod (`bpf_redirect_peer`).
use std::io;

use crate::error::{fail, Context, Result};

use super::{
    conntrack::end_flow_cache,
    loader::{Datapath, HostRouting},
};

impl Datapath {
    /// Ends the flow cache's slots (see [`end_flow_cache`]): after a change of
    /// the pod veths, whose routes slots hold.
    fn end_flow_cache(&mut self) -> Result<()> {
        let name = weir_common::map_names::FLOW_GEN;
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} is missing from the eBPF object"))?;
        let mut gen =
            aya::maps::Array::try_from(map).with_context(|| format!("open map {name}"))?;
        end_flow_cache(&mut gen).with_context(|| format!("move the generation in {name}"))
    }

    /// The map of the node's pod veths (`LB_PODDEV_V1`, see `MAX_POD_DEVS`), which the
    /// programs hand packets into pods by.
    fn pod_devs_map(&mut self) -> Result<aya::maps::Array<&mut aya::maps::MapData, u32>> {
        let name = weir_common::map_names::POD_DEVS;
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} is missing from the eBPF object"))?;
        aya::maps::Array::try_from(map).with_context(|| format!("open map {name}"))
    }

    /// Records `ifindex` (in the agent's namespace) as a pod's host-side veth, whose packets
    /// the programs may hand straight into the pod (`bpf_redirect_peer`). Only a veth whose
    /// peer is in another network namespace can take that: a packet redirected to any other
    /// device would be dropped, so those are refused. So is a veth whose slot holds another
    /// (see `MAX_POD_DEVS`).
    /// With [`HostRouting::Kernel`], records nothing.
    pub fn add_pod_dev(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        use weir_common::MAX_POD_DEVS;
        if self.host_routing == HostRouting::Kernel {
            return Ok(());
        }
        if !veth_with_peer_elsewhere(ifindex)
            .with_context(|| format!("ask the kernel what device {ifname} is"))?
        {
            fail!("{ifname} (index {ifindex}) is not a veth whose peer is in another network namespace");
        }
        let mut map = self.pod_devs_map()?;
        let slot = ifindex % MAX_POD_DEVS;
        let held = map.get(&slot, 0).context("read a pod veth slot")?;
        if held != 0 && held != ifindex {
            fail!("{ifname} (index {ifindex}) shares slot {slot} with the veth of index {held}, recorded first");
        }
        map.set(slot, ifindex, 0)
            .with_context(|| format!("record {ifname} (index {ifindex}) as a pod veth"))?;
        self.end_flow_cache()
    }

    /// Forgets the pod veth of index `ifindex` (a device gone), if it is recorded.
    pub fn forget_pod_dev(&mut self, ifindex: u32) -> Result<()> {
        let mut map = self.pod_devs_map()?;
        let slot = ifindex % weir_common::MAX_POD_DEVS;
        if map.get(&slot, 0).context("read a pod veth slot")? == ifindex {
            map.set(slot, 0, 0)
                .with_context(|| format!("forget the pod veth of index {ifindex}"))?;
            self.end_flow_cache()?;
        }
        Ok(())
    }

    /// Forgets the pod veths not in `keep` (gone devices; any an earlier run left): a pass
    /// over every slot.
    pub fn retain_pod_devs(&mut self, keep: &std::collections::BTreeSet<u32>) -> Result<()> {
        let mut map = self.pod_devs_map()?;
        let mut forgot = false;
        for slot in 0..weir_common::MAX_POD_DEVS {
            let held = map.get(&slot, 0).context("read a pod veth slot")?;
            if held != 0 && !keep.contains(&held) {
                map.set(slot, 0, 0)
                    .with_context(|| format!("forget the pod veth of index {held}"))?;
                forgot = true;
            }
        }
        if forgot {
            self.end_flow_cache()?;
        }
        Ok(())
    }

    /// The pod veths recorded, by ifindex.
    pub fn pod_devs(&mut self) -> Result<Vec<u32>> {
        recorded_pod_devs(&self.pod_devs_map()?)
    }
}

/// The pod veths a `LB_PODDEV_V1` map records, by ifindex, in slot order.
pub fn recorded_pod_devs<T: std::borrow::Borrow<aya::maps::MapData>>(
    map: &aya::maps::Array<T, u32>,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for v in map.iter() {
        let v = v.with_context(|| format!("read {}", weir_common::map_names::POD_DEVS))?;
        if v != 0 {
            out.push(v);
        }
    }
    Ok(out)
}

/// Whether device `index` of the calling thread's namespace is a veth whose peer lives in
/// another network namespace (the kernel names that namespace in `IFLA_LINK_NETNSID`).
fn veth_with_peer_elsewhere(index: u32) -> io::Result<bool> {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
    use netlink_packet_route::{
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
        RouteNetlinkMessage,
    };
    let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetLink(msg));
    req.header.flags = NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)?;
    let (data, _) = sock.recv_from_full()?;
    let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data).map_err(io::Error::other)?;
    match m.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
            let veth = l.attributes.iter().any(|a| {
                matches!(a, LinkAttribute::LinkInfo(infos)
                    if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
            });
            let elsewhere = l
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
            Ok(veth && elsewhere)
        }
        NetlinkPayload::Error(e) => Err(e
            .code
            .map(|c| io::Error::from_raw_os_error(-c.get()))
            .unwrap_or_else(|| io::Error::other("no answer"))),
        _ => Err(io::Error::other("unexpected netlink answer")),
    }
}
