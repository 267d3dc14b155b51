//! Map keys, values and constants shared by the eBPF programs and user space.
//!
//! Every type is `#[repr(C)]` with explicit padding (the kernel hashes every byte of a key) and a
//! compile-time size check. Addresses are 16 bytes in network byte order; an IPv4 address is
//! stored IPv4-mapped (`::ffff:a.b.c.d`), so one set of maps serves both families. Ports are in
//! network byte order as they appear on the wire.
#![no_std]

use core::mem::size_of;

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_SCTP: u8 = 132;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_ICMPV6: u8 = 58;

/// Declares every map's name once: the constants of [`map_names`] (user space) and the macro
/// [`map!`] the eBPF side defines each map with, which gives it that name.
macro_rules! map_names {
    ($d:tt $($(#[$doc:meta])* $id:ident = $name:literal;)*) => {
        /// Map names as the kernel sees them (15 characters at most) and as pinned. A pinned
        /// map's name ends in the version of its layout (`_V1`, `_V2`); a layout change bumps
        /// that map's version, so an upgraded agent starts a new map instead of adopting one it
        /// would misread.
        pub mod map_names {
            $($(#[$doc])* pub const $id: &str = $name;)*
        }

        /// Defines the eBPF map called `map_names::$ID` (a `static` item after the name), with
        /// aya-ebpf's `#[map]`: `weir_common::map!(SVC, pub static SVC: HashMap<..> = ..;)`.
        #[macro_export]
        macro_rules! map {
            $(($id, $d($d item:tt)*) => {
                #[aya_ebpf::macros::map(name = $name)]
                $d($d item)*
            };)*
        }
    };
}

map_names! {$
    SVC = "LB_SVC_V1";
    BACKENDS = "LB_BE_V1";
    MAGLEV = "LB_MAGLEV_V1";
    AFFINITY = "LB_AFF_V1";
    /// Conntrack, one map per family: IPv4 flows keyed by `Ct4Key` (16 bytes), IPv6 flows by
    /// `CtKey`. Before them, `CT_V2` held both families under `CtKey` (the loader moves its
    /// flows).
    CT4 = "CT4_V1";
    CT6 = "CT6_V1";
    SOCK_REV = "LB_SKREV_V1";
    SOCK_FWD = "LB_SKFWD_V1";
    STATS = "STATS_V1";
    VIPNET = "LB_VIPNET_V1";
    NODE_LOCAL = "LB_NODELOC_V1";
    POD_DEVS = "LB_PODDEV_V1";
    /// The flow cache's generations (see `FLOW_GEN_GLOBAL`).
    FLOW_GEN = "LB_FLOWGEN_V1";
    /// The flow cache's slots, per CPU (not pinned: each load has its own).
    FLOWS = "FLOWS";
    FLOWS6 = "FLOWS6";
    /// The program array holding `tc_flow_write` (not pinned).
    FLOW_WRITE = "FLOW_WRITE";
    /// Per-CPU scratch space for one packet (not pinned).
    SCRATCH = "SCRATCH_V1";
}

/// Program names in the object, one per attach point.
pub mod prog_names {
    pub const TC_FROM_POD: &str = "tc_from_pod";
    pub const TC_FROM_NETDEV: &str = "tc_from_netdev";
    pub const TC_TO_POD: &str = "tc_to_pod";
    pub const TC_TO_NETDEV: &str = "tc_to_netdev";
    /// The flow cache's writer, reached by tail call from the four above (see `FLOW_SLOTS`).
    pub const TC_FLOW_WRITE: &str = "tc_flow_write";
    pub const CONNECT4: &str = "sock_connect4";
    pub const CONNECT6: &str = "sock_connect6";
    pub const SENDMSG4: &str = "sock_sendmsg4";
    pub const SENDMSG6: &str = "sock_sendmsg6";
    pub const RECVMSG4: &str = "sock_recvmsg4";
    pub const RECVMSG6: &str = "sock_recvmsg6";
    pub const GETPEERNAME4: &str = "sock_getpeername4";
    pub const GETPEERNAME6: &str = "sock_getpeername6";
}

/// What the loader fills in about the running kernel before loading the object.
pub mod kernel_facts {
    /// The helper number of the object's calls to the kfunc `bpf_cast_to_kern_ctx` (the
    /// `struct sk_buff` behind a TC program's context), which no helper has: the loader turns
    /// each such call into the kfunc call. Where the kernel has no such kfunc, the calls stay
    /// as they are behind `IP_SUMMED` = 0, and the verifier removes them as dead code.
    pub const CAST_TO_KERN_CTX_CALL: i32 = 0x0777_0001;
    /// The object's global (.rodata) telling where `ip_summed` is in `struct sk_buff`: its bit
    /// offset + 1; 0 where unknown.
    pub const IP_SUMMED: &str = "WEIR_IP_SUMMED";
    /// The object's globals giving the coarse monotonic clock as jiffies × `NS_PER_JIFFY` +
    /// `JIFFIES_OFFSET` (u64, wrapping); `NS_PER_JIFFY` 0 where unknown.
    pub const NS_PER_JIFFY: &str = "WEIR_NS_PER_JIFFY";
    pub const JIFFIES_OFFSET: &str = "WEIR_JIFFIES_OFFSET";
}

/// Service map entries: one master per frontend and one slot per endpoint. Sized for 100 000
/// services of 10 endpoints each (1.1 M); the map is not preallocated, so only what is used
/// costs memory.
pub const MAX_SERVICE_SLOTS: u32 = 2_097_152;
/// Backend ids: one per (frontend, endpoint). Not preallocated either.
pub const MAX_BACKENDS: u32 = 2_097_152;
pub const MAX_MAGLEV_SERVICES: u32 = 4_096;
pub const MAX_AFFINITY: u32 = 65_536;
/// Entries of each conntrack map (`CT4_V1`, `CT6_V1`), as Cilium sizes its per-family maps.
pub const MAX_CT: u32 = 262_144;
pub const MAX_SOCK: u32 = 65_536;
/// Slots of the node's pod veths (`LB_PODDEV_V1`): the host-side veth of ifindex `i` is
/// recorded in slot `i % MAX_POD_DEVS`, which holds `i` (0: none). An array, whose lookups the
/// verifier inlines. Far above the pods a node runs (110 by default); two live veths whose
/// indexes share a slot leave the later one unrecorded (its packets take the neighbour table).
pub const MAX_POD_DEVS: u32 = 4_096;

/// A bitmap of the IPv4 /16 prefixes that hold at least one service address: 65 536 bits in
/// 1 024 words. A packet whose destination is in no such prefix cannot be a new service flow,
/// so the per-packet path skips the service lookup (8 KiB stays in cache; the service map does
/// not).
pub const VIPNET_WORDS: u32 = 1024;

/// The word and bit of an IPv4 address's /16 in the bitmap.
pub const fn vipnet_slot(v4: [u8; 4]) -> (u32, u64) {
    let prefix = ((v4[0] as u32) << 8) | v4[1] as u32;
    (prefix >> 6, 1u64 << (prefix & 63))
}

/// Maglev lookup table size per service: a prime above 100 × the backends a service usually has,
/// which keeps reassignment on a backend change near 1 % (Cilium's rule, `M > 100·N`).
pub const MAGLEV_M: usize = 1021;
/// The table's storage: M rounded up to a power of two, so that the verifier, which tracks an
/// index through a bit mask, can prove every read in bounds. Entries past M are unused (zero).
pub const MAGLEV_TABLE_LEN: usize = 1024;

/// Conntrack lifetimes, the ones Cilium uses.
pub const CT_LIFETIME_TCP_NS: u64 = 21_600 * 1_000_000_000;
pub const CT_LIFETIME_NONTCP_NS: u64 = 60 * 1_000_000_000;
pub const CT_LIFETIME_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_LIFETIME_SYN_NS: u64 = 60 * 1_000_000_000;

/// An address: IPv6, or IPv4-mapped IPv6, in network byte order.
///
/// Aligned to 4 bytes (every struct here already places it so; the sizes below are checked):
/// the eBPF programs then copy and compare addresses by words, not by 2-byte halves.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Addr(pub [u8; 16]);

impl Addr {
    pub const fn from_v4(octets: [u8; 4]) -> Self {
        let [a, b, c, d] = octets;
        Addr([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d])
    }

    /// An address from the four 32-bit words the kernel's structures hold it in (as they lie
    /// in memory: network byte order). A plain reinterpretation: the eBPF programs build
    /// addresses with it as four word stores.
    pub fn from_words(w: [u32; 4]) -> Self {
        // SAFETY: 16 bytes either way, every bit pattern valid for both.
        Addr(unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(w) })
    }

    /// An IPv4-mapped address from the IPv4 address as it lies in memory.
    pub fn from_v4_word(w: u32) -> Self {
        Self::from_words([0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), w])
    }

    /// The four 32-bit words of the address as they lie in memory (the inverse of
    /// `from_words`).
    pub fn words(&self) -> [u32; 4] {
        // SAFETY: 16 bytes either way, every bit pattern valid for both.
        unsafe { core::mem::transmute::<[u8; 16], [u32; 4]>(self.0) }
    }

    pub fn is_v4(&self) -> bool {
        self.0[..10] == [0; 10] && self.0[10] == 0xff && self.0[11] == 0xff
    }
    pub fn v4_octets(&self) -> [u8; 4] {
        [self.0[12], self.0[13], self.0[14], self.0[15]]
    }
}

/// Frontend lookup key: a service address, port and protocol, plus a slot. Slot 0 holds the
/// master entry of the service; slots 1..=count hold one backend id each.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SvcKey {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    /// Which clients the entry serves: [`SCOPE_ALL`] or [`SCOPE_EXTERNAL`].
    pub scope: u8,
    pub slot: u16,
    pub _pad: u16,
}

/// A frontend entry for every client.
pub const SCOPE_ALL: u8 = 0;
/// A frontend entry for clients outside the node (traffic arriving on an uplink), looked up
/// before the `SCOPE_ALL` entry: externalTrafficPolicy `Local` gives external clients other
/// backends than pods and the node itself get.
pub const SCOPE_EXTERNAL: u8 = 1;

pub const SVC_F_MAGLEV: u16 = 1 << 0;
pub const SVC_F_AFFINITY: u16 = 1 << 1;
/// With no backend, drop instead of reject: the service has endpoints, none for this traffic
/// (a `Local` traffic policy and none on this node), as kube-proxy does.
pub const SVC_F_DROP_EMPTY: u16 = 1 << 2;
/// The cluster DNS Service: while the node's own DNS server holds its lease (`NodeLocal`), the
/// socket hooks send the service's traffic there instead of to a backend.
pub const SVC_F_NODE_LOCAL: u16 = 1 << 3;

/// The node's own server for `SVC_F_NODE_LOCAL` services (the agent's DNS), and its lease: the
/// agent renews it every poll while the server answers; past `expires_ns` (monotonic coarse
/// clock, as `bpf_ktime_get_coarse_ns`), traffic goes to the service's backends again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeLocal {
    /// IPv4-mapped; all zero: none for IPv4.
    pub addr4: Addr,
    /// All zero: none for IPv6.
    pub addr6: Addr,
    /// Network byte order.
    pub port: u16,
    pub _pad: [u8; 6],
    pub expires_ns: u64,
}

/// Master entry (slot 0): `count`, `flags`, `svc_id`, `affinity_timeout_s` are meaningful.
/// Backend slot (slot ≥ 1): `backend_id` is meaningful.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcValue {
    pub backend_id: u32,
    pub count: u16,
    pub flags: u16,
    /// Identifies the service port for affinity, Maglev and status; never 0 for a service.
    pub svc_id: u32,
    pub affinity_timeout_s: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: Addr,
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}

/// Maglev lookup table of one service: `MAGLEV_M` backend ids, then unused padding.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MaglevTable {
    pub backends: [u32; MAGLEV_TABLE_LEN],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    pub client: Addr,
    pub svc_id: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub _pad: u32,
    pub last_used_ns: u64,
}

/// The 5-tuple of a packet as it is seen on the wire, in one direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub src: Addr,
    pub dst: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The 5-tuple of an IPv4 packet, the key of `CT4_V1`: 16 bytes where `CtKey` takes 40, and
/// the kernel hashes and compares every byte of a key on each packet's lookup. Addresses are
/// words as they lie in the packet (network byte order; `Addr::words()[3]` of the mapped
/// address), so the programs copy them with one load and store each.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Ct4Key {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// Slots of the flow cache, per CPU and family: the rewrite of an established flow's packets as
/// its conntrack entry gave it, so that the flow's next packets on that CPU are translated
/// with no conntrack lookup and written with no helper call. A slot holds one flow; flows
/// whose tuples hash alike take it in turns, each falling back to conntrack meanwhile.
pub const FLOW_SLOTS: u32 = 1024;

/// Index of the cache's global generation in `LB_FLOWGEN_V1`, after one generation per slot
/// index. A slot is used only while the sum of both is what it was filled with: the programs
/// move a slot index's own whenever they write or remove a conntrack entry whose tuple hashes
/// to it, user space the global one whenever it changes conntrack or the pod veths.
pub const FLOW_GEN_GLOBAL: u32 = FLOW_SLOTS;

/// A slot of the flow cache lives at most this long (it is then filled again from
/// conntrack, whose entry it refreshes, see `CT_LIFETIME_*`), and never past its entry's
/// expiry.
pub const FLOW_SLOT_LIFETIME_NS: u64 = 1_000_000_000;

/// The flow cache's slot index of an IPv4 tuple (also its generation's in `LB_FLOWGEN_V1`).
#[inline(always)]
pub fn flow_slot(k: &Ct4Key) -> u32 {
    let ports = ((k.sport as u32) << 16) | k.dport as u32;
    let h = (k.src ^ k.dst.rotate_left(16) ^ ports ^ k.proto as u32).wrapping_mul(0x9e37_79b1);
    h >> (32 - FLOW_SLOTS.trailing_zeros())
}

/// The flow cache's slot index of an IPv6 tuple (also its generation's in `LB_FLOWGEN_V1`).
#[inline(always)]
pub fn flow_slot6(k: &CtKey) -> u32 {
    let (s, d) = (k.src.words(), k.dst.words());
    let ports = ((k.sport as u32) << 16) | k.dport as u32;
    let x = s[0] ^ s[1] ^ s[2] ^ s[3] ^ (d[0] ^ d[1] ^ d[2] ^ d[3]).rotate_left(16);
    let h = (x ^ ports ^ k.proto as u32).wrapping_mul(0x9e37_79b1);
    h >> (32 - FLOW_SLOTS.trailing_zeros())
}

impl CtKey {
    /// The `CT4_V1` key of an IPv4 tuple; None for IPv6.
    pub fn to_v4(&self) -> Option<Ct4Key> {
        if !(self.src.is_v4() && self.dst.is_v4()) {
            return None;
        }
        Some(Ct4Key {
            src: self.src.words()[3],
            dst: self.dst.words()[3],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            _pad: [0; 3],
        })
    }
}

impl From<Ct4Key> for CtKey {
    fn from(k: Ct4Key) -> Self {
        CtKey {
            src: Addr::from_v4_word(k.src),
            dst: Addr::from_v4_word(k.dst),
            sport: k.sport,
            dport: k.dport,
            proto: k.proto,
            _pad: [0; 3],
        }
    }
}

/// Forward entry (client → service): rewrite the destination to `nat_addr:nat_port`.
pub const CT_DIR_FORWARD: u8 = 0;
/// Reply entry (backend → client): rewrite the source to `nat_addr:nat_port` (the VIP).
pub const CT_DIR_REPLY: u8 = 1;

/// Hairpin flow (the client is its own backend): the source is rewritten to the VIP as well
/// (forward: the source becomes `peer`; reply: the destination becomes `peer`).
pub const CT_F_HAIRPIN: u8 = 1 << 0;
/// A FIN or RST was seen; the entry lives `CT_LIFETIME_CLOSING_NS` more.
pub const CT_F_CLOSING: u8 = 1 << 1;
/// Source-NATed flow (external traffic to an endpoint on another node): forward packets leave
/// from `peer` (a node address and a port of `SNAT_PORTS`); replies go back to `peer` (the
/// client).
pub const CT_F_SNAT: u8 = 1 << 2;
/// A forward entry whose packets the kernel forwards: its backend is not in a pod on the
/// node (another node's pod, an address outside the cluster, the node itself), found by the
/// first packet's route lookup. Later packets skip the lookup. The kernel's forwarding keeps
/// what the node's own rules do to such traffic (a masquerade towards an address outside the
/// cluster, say).
pub const CT_F_KERNEL_ROUTE: u8 = 1 << 3;
/// An entry whose packets go into a pod of the node, by the route its first packet's lookup
/// found, remembered in `peer_addr`'s 16 bytes: the host-side veth's ifindex (native order),
/// then the Ethernet destination and source, in the order of the header. Only where neither
/// `CT_F_HAIRPIN` nor `CT_F_SNAT` is set, which need the peer. Later packets skip the lookup
/// while the veth is still a pod's (`LB_PODDEV_V1`).
pub const CT_F_POD_ROUTE: u8 = 1 << 4;

/// The ports source NAT hands out, above Linux's default ephemeral range (32768–60999) so that
/// they do not meet the node's own connections.
pub const SNAT_PORT_MIN: u16 = 61_000;
pub const SNAT_PORT_COUNT: u32 = 65_536 - SNAT_PORT_MIN as u32;
/// Random ports tried before a new flow is dropped for want of one.
pub const SNAT_TRIES: u32 = 8;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub nat_addr: Addr,
    /// The other side's rewrite, for hairpin and source-NATed flows (see `CT_F_SNAT`).
    pub peer_addr: Addr,
    pub nat_port: u16,
    pub peer_port: u16,
    pub dir: u8,
    pub flags: u8,
    pub _pad: u16,
    pub backend_id: u32,
    pub svc_id: u32,
    pub expires_ns: u64,
}

/// Socket-level reverse translation: (socket cookie, backend) → service address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub cookie: u64,
    pub addr: Addr,
    pub port: u16,
    pub _pad: [u8; 6],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockValue {
    pub addr: Addr,
    pub port: u16,
    pub _pad: u16,
    /// For `LB_SKFWD`: the backend chosen for this socket and service.
    pub backend_id: u32,
}

/// Per-CPU counters, indexed by this enum: every verdict and every drop reason.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    PassNoService = 0,
    PassNonIp,
    PassOtherProto,
    DnatNew,
    DnatEstablished,
    RevNat,
    Hairpin,
    AffinityHit,
    MaglevSelect,
    RejectNoBackend,
    DropMalformed,
    DropTruncated,
    DropRewriteFailed,
    DropBackendMissing,
    DropRejectFailed,
    SockConnect,
    SockSendmsg,
    SockRevXlate,
    SockRejectNoBackend,
    SockBackendMissing,
    /// A new flow whose conntrack entries could not be written.
    DropConntrackInsert,
    /// A new flow to a service whose endpoints are all elsewhere while its traffic policy is
    /// `Local`.
    DropNoLocalBackend,
    /// The same, seen by the socket hooks.
    SockDropNoLocalBackend,
    /// A new external flow to an endpoint on another node, source-NATed.
    SnatNew,
    /// A new external flow dropped: no free SNAT port towards its endpoint.
    DropSnatNoPort,
    /// A translated packet the program routed itself (a FIB lookup, then a redirect), instead
    /// of the kernel's forwarding. Needed where the source was rewritten (replies, hairpin and
    /// source-NATed flows: the new source may be an address of the node, which the kernel's
    /// input path drops as a martian); done for the others too, to skip a pass through the
    /// stack (see `RoutedToPod`).
    Routed,
    /// A packet to route whose FIB lookup failed: left to the kernel.
    RouteFallback,
    /// A socket of a pod sent to the node's own DNS server (`SVC_F_NODE_LOCAL`).
    SockNodeLocal,
    /// A new flow of the per-packet path sent to the node's own DNS server.
    NodeLocal,
    /// Of the `Routed` packets, those handed straight into a pod on the node
    /// (`bpf_redirect_peer` to a device of `LB_PODDEV_V1`): no second pass through the node's
    /// stack and the veth's queue.
    RoutedToPod,
    /// An ICMP error (destination unreachable, fragmentation needed or packet too big, time
    /// exceeded, parameter problem) about a packet of a translated flow, translated as that
    /// flow's packets are: the header it quotes, and the addresses of the error itself, so
    /// that the socket it is for finds it (PMTU discovery, a refused UDP port).
    IcmpErrorNat,
    /// An established flow's packet translated from the flow cache (see `FLOW_SLOTS`), with
    /// no conntrack lookup. Counted besides the packet's own verdict (`dnat_established`,
    /// `rev_nat`, `routed`, `routed_to_pod`).
    FlowCacheHit,
}

pub const STAT_COUNT: u32 = Stat::FlowCacheHit as u32 + 1;

pub const STAT_NAMES: [&str; STAT_COUNT as usize] = [
    "pass_no_service",
    "pass_non_ip",
    "pass_other_proto",
    "dnat_new",
    "dnat_established",
    "rev_nat",
    "hairpin",
    "affinity_hit",
    "maglev_select",
    "reject_no_backend",
    "drop_malformed",
    "drop_truncated",
    "drop_rewrite_failed",
    "drop_backend_missing",
    "drop_reject_failed",
    "sock_connect",
    "sock_sendmsg",
    "sock_rev_xlate",
    "sock_reject_no_backend",
    "sock_backend_missing",
    "drop_conntrack_insert",
    "drop_no_local_backend",
    "sock_drop_no_local_backend",
    "snat_new",
    "drop_snat_no_port",
    "routed",
    "route_fallback",
    "sock_node_local",
    "node_local",
    "routed_to_pod",
    "icmp_error_nat",
    "flow_cache_hit",
];

const _: () = {
    assert!(size_of::<Addr>() == 16);
    assert!(size_of::<SvcKey>() == 24);
    assert!(size_of::<SvcValue>() == 16);
    assert!(size_of::<Backend>() == 20);
    assert!(size_of::<MaglevTable>() == 4 * MAGLEV_TABLE_LEN);
    assert!(size_of::<AffinityKey>() == 24);
    assert!(size_of::<AffinityValue>() == 16);
    assert!(size_of::<CtKey>() == 40);
    assert!(size_of::<Ct4Key>() == 16);
    assert!(size_of::<CtValue>() == 56);
    assert!(size_of::<SockKey>() == 32);
    assert!(size_of::<SockValue>() == 24);
    assert!(size_of::<NodeLocal>() == 48);
    // The programs pick the address of a family by index from `addr4` (lb.rs).
    assert!(
        core::mem::offset_of!(NodeLocal, addr6) == core::mem::offset_of!(NodeLocal, addr4) + 16
    );
};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: every type is repr(C), Copy, made of integers, with no implicit padding (the sizes
    // are asserted above), so every bit pattern is valid.
    unsafe impl aya::Pod for SvcKey {}
    unsafe impl aya::Pod for SvcValue {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for MaglevTable {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for Ct4Key {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for SockKey {}
    unsafe impl aya::Pod for SockValue {}
    unsafe impl aya::Pod for NodeLocal {}
}
