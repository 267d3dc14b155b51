//! Every map of the object. Pinned by name, so a restarted agent adopts them.
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray};
use weir_common::{map, *};

// Service maps are updated while read: without preallocation an update is RCU-safe and a reader
// never sees an element recycled under it.
const BPF_F_NO_PREALLOC: u32 = 1;

map! {
    SVC,
    pub static SVC: HashMap<SvcKey, SvcValue> =
        HashMap::pinned(MAX_SERVICE_SLOTS, BPF_F_NO_PREALLOC);
}

map! {
    BACKENDS,
    pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(MAX_BACKENDS, BPF_F_NO_PREALLOC);
}

map! {
    MAGLEV,
    pub static MAGLEV: HashMap<u32, MaglevTable> =
        HashMap::pinned(MAX_MAGLEV_SERVICES, BPF_F_NO_PREALLOC);
}

map! {
    AFFINITY,
    pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
        LruHashMap::pinned(MAX_AFFINITY, 0);
}

map! {
    CT4,
    /// Conntrack of IPv4 flows, under their 16-byte tuple (see `Ct4Key`).
    pub static CT4: LruHashMap<Ct4Key, CtValue> = LruHashMap::pinned(MAX_CT, 0);
}

map! {
    CT6,
    /// Conntrack of IPv6 flows.
    pub static CT6: LruHashMap<CtKey, CtValue> = LruHashMap::pinned(MAX_CT, 0);
}

map! {
    SOCK_REV,
    pub static SOCK_REV: LruHashMap<SockKey, SockValue> = LruHashMap::pinned(MAX_SOCK, 0);
}

map! {
    SOCK_FWD,
    pub static SOCK_FWD: LruHashMap<SockKey, SockValue> = LruHashMap::pinned(MAX_SOCK, 0);
}

/// Per-CPU scratch space for one packet: the parsed headers and the conntrack entries of a new
/// flow. On the stack they would not fit the 512 bytes a call chain may use.
#[repr(C)]
pub struct Scratch {
    pub pkt: crate::parse::Packet,
    /// A flow's tuples as the packets of each direction carry them. `fwd_key` is the packet's
    /// own, written for every IPv6 packet, and for an IPv4 one once it is a new flow; the
    /// conntrack lookups of an IPv4 flow use `fwd_key4`, `reply_key4` (see `ct`).
    pub fwd_key: CtKey,
    pub reply_key: CtKey,
    pub fwd_key4: Ct4Key,
    pub reply_key4: Ct4Key,
    pub fwd: CtValue,
    pub rev: CtValue,
    /// The rewrite of an established flow's packet (here, not on the stack: the verifier sums
    /// the frames of a call chain).
    pub chg_src: crate::nat::Change,
    pub chg_dst: crate::nat::Change,
    /// The ICMP error being built by the reject path.
    pub icmp: [u8; 112],
    /// FIB lookup parameters and result (see `route`).
    pub fib: aya_ebpf::bindings::bpf_fib_lookup,
    /// The next hop handed to the neighbour table.
    pub nh: aya_ebpf::bindings::bpf_redir_neigh,
    /// A rewrite into a pod, built for its one store (see `nat`).
    pub eth4: crate::nat::V4Frame,
    pub eth6: crate::nat::V6Frame,
    /// The packet's flow cache slot index (`FLOW_SLOTS`: none), the generation it would be
    /// filled under, and the packet's checksum kind for the cache's writer (see `flow`).
    pub flow_idx: u32,
    pub flow_csum: u8,
    pub flow_gen: u64,
}

map! {
    SCRATCH,
    pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
}

map! {
    VIPNET,
    pub static VIPNET: Array<u64> = Array::pinned(VIPNET_WORDS, 0);
}

map! {
    NODE_LOCAL,
    pub static NODE_LOCAL: Array<NodeLocal> = Array::pinned(1, 0);
}

map! {
    POD_DEVS,
    /// The host-side veths of the node's pods (the agent's, as it finds them; see
    /// `MAX_POD_DEVS`): a packet routed to one is handed straight into the pod
    /// (`route::redirect`).
    pub static POD_DEVS: Array<u32> = Array::pinned(MAX_POD_DEVS, 0);
}

/// Whether `ifindex` is a pod's host-side veth (see `POD_DEVS`).
#[inline(always)]
pub fn is_pod_dev(ifindex: u32) -> bool {
    match POD_DEVS.get(ifindex % MAX_POD_DEVS) {
        Some(v) => *v == ifindex && ifindex != 0,
        None => false,
    }
}

map! {
    STATS,
    pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(STAT_COUNT, 0);
}

#[inline(always)]
pub fn count(stat: Stat) {
    count_raw(stat as u32)
}

#[inline(always)]
pub fn count_raw(stat: u32) {
    if let Some(c) = STATS.get_ptr_mut(stat) {
        // SAFETY: a per-CPU slot is only touched by this CPU, and programs do not nest on it.
        unsafe { *c += 1 };
    }
}
