//! Routing a rewritten packet ourselves: a FIB lookup, then a redirect, as the kernel's
//! forwarding would do it. Needed for every packet whose source the programs rewrite: that
//! source may be an address of the node (a NodePort's, or the source NAT address), and the
//! kernel's input path drops a packet that arrives with a local source as a martian. Packets
//! whose lookup fails (no route, MTU exceeded, forwarding off) are left to the kernel, counted
//! as `route_fallback`.
//!
//! A packet routed to a pod of the node (its host-side veth is in `POD_DEVS`) is handed
//! straight into the pod's namespace (`bpf_redirect_peer`, as Cilium's host routing does), its
//! Ethernet addresses those the lookup found: no pass through the veth's queue and the node's
//! stack a second time. That is also done for packets whose source is kept (DNAT to a pod
//! here); any other of those is the kernel's to forward, as before.
//!
//! A routed packet's TTL (hop limit) is decremented, as the kernel's forwarding does; one that
//! arrives with 1 or less is left to the kernel too, whose forwarding drops it (with Time
//! Exceeded where it may), counted as `route_fallback` as well.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, BPF_FIB_LKUP_RET_NOT_FWDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC, TC_ACT_OK,
        TC_ACT_REDIRECT,
    },
    helpers::generated::{
        bpf_fib_lookup as fib_lookup_helper, bpf_redirect_neigh, bpf_redirect_peer,
    },
    programs::TcContext,
};
use weir_common::{Addr, Stat};

use crate::maps::{count, is_pod_dev, Scratch};

/// What `lookup` found. Not routed: the kernel's (no route, no hop left, MTU exceeded).
pub const ROUTE_NONE: u32 = 0;
/// A route out of a device that is no pod's (to another node, out of the cluster): the packet
/// is sent through the neighbour table (`bpf_redirect_neigh`) if routed here.
pub const ROUTE_NEIGH: u32 = 1;
/// A route into a pod of the node, link-layer addresses known (`bpf_redirect_peer`).
pub const ROUTE_POD: u32 = 2;
/// A route into a pod of the node whose neighbour entry is not resolved: through the
/// neighbour table, which resolves it.
pub const ROUTE_POD_NEIGH: u32 = 3;
/// A destination of the node itself (a hostNetwork endpoint, the node's DNS server): the
/// kernel's input path.
pub const ROUTE_LOCAL: u32 = 4;

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// The device the packet came in on.
#[inline(always)]
pub fn ingress_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: reading a field of our own context.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Fills the FIB lookup parameters but the addresses, for a packet entering on the context's
/// device.
#[inline(always)]
fn fill(ctx: &TcContext, s: &mut Scratch) {
    let v6 = s.pkt.v6;
    let f = &mut s.fib;
    f.family = if v6 { AF_INET6 } else { AF_INET };
    f.l4_protocol = s.pkt.proto;
    f.sport = 0;
    f.dport = 0;
    f.__bindgen_anon_1.tot_len = 0;
    f.ifindex = ingress_ifindex(ctx);
    f.__bindgen_anon_2.flowinfo = 0;
    f.__bindgen_anon_5.tbid = 0;
}

/// Copies `a` into an address field of the lookup: all 16 bytes for IPv6, the last 4 (the
/// IPv4 address of a mapped one) into the first word for IPv4.
#[inline(always)]
fn put(field: &mut [u32; 4], a: &Addr, v6: bool) {
    let w = a.words();
    *field = if v6 { w } else { [w[3], 0, 0, 0] };
}

/// Runs the lookup `s.fib` holds: the helper's answer (`BPF_FIB_LKUP_RET_*`).
#[inline(always)]
fn run(ctx: &TcContext, s: &mut Scratch, flags: u32) -> i64 {
    // SAFETY: the context is the program's own; the parameters are a map value of the size
    // passed.
    unsafe {
        fib_lookup_helper(
            ctx.skb.skb as *mut _,
            &mut s.fib as *mut bpf_fib_lookup,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    }
}

/// Whether the node forwards a new flow's first packet, once sent to its backend (`s.fwd_key`
/// and `s.fwd`), back out of the device it came in on: to a backend on another node. Then
/// `s.fib` also holds the node's source address on that route (see `fib_src`).
#[inline(never)]
pub fn backend_is_behind_ingress(ctx: &TcContext, s: &mut Scratch) -> bool {
    fill(ctx, s);
    let v6 = s.pkt.v6;
    // SAFETY: plain integers in unions.
    unsafe {
        put(&mut s.fib.__bindgen_anon_3.ipv6_src, &s.fwd_key.src, v6);
        put(&mut s.fib.__bindgen_anon_4.ipv6_dst, &s.fwd.nat_addr, v6);
    }
    run(ctx, s, BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_SRC) == BPF_FIB_LKUP_RET_SUCCESS as i64
        && s.fib.ifindex == ingress_ifindex(ctx)
}

/// The source address the last successful lookup found (IPv4-mapped for IPv4).
#[inline(always)]
pub fn fib_src(s: &Scratch) -> Addr {
    // SAFETY: plain integers in a union; the family says which member the kernel wrote.
    let w = unsafe { s.fib.__bindgen_anon_3.ipv6_src };
    if s.pkt.v6 {
        Addr::from_words(w)
    } else {
        Addr::from_v4_word(w[0])
    }
}

/// Sets the addresses of the next `lookup`: the packet's once rewritten, from `src` to
/// `dst`. Separate from it, so that callers point at their scratch fields instead of passing
/// copies (the verifier sums the stack frames of a call chain).
#[inline(always)]
pub fn set_addrs(fib: &mut bpf_fib_lookup, src: &Addr, dst: &Addr, v6: bool) {
    // SAFETY: plain integers in unions.
    unsafe {
        put(&mut fib.__bindgen_anon_3.ipv6_src, src, v6);
        put(&mut fib.__bindgen_anon_4.ipv6_dst, dst, v6);
    }
}

/// Looks up the route of the packet between the addresses `set_addrs` gave (the result
/// stays in `s.fib` for `redirect`): one of the `ROUTE_` values. A packet with no hop left
/// (the rewrite of a routed one decrements it) is `ROUTE_NONE` without a lookup.
#[inline(never)]
pub fn lookup(ctx: &TcContext, s: &mut Scratch) -> u32 {
    // A packet with no hop left is the kernel's: no lookup for it.
    if s.pkt.ttl <= 1 {
        return ROUTE_NONE;
    }
    fill(ctx, s);
    let rc = run(ctx, s, 0);
    if rc == BPF_FIB_LKUP_RET_NOT_FWDED as i64 {
        return ROUTE_LOCAL;
    }
    let found = rc == BPF_FIB_LKUP_RET_SUCCESS as i64;
    if !found && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return ROUTE_NONE;
    }
    // The device is known either way; its link-layer addresses only when found.
    if !is_pod_dev(s.fib.ifindex) {
        ROUTE_NEIGH
    } else if found {
        ROUTE_POD
    } else {
        ROUTE_POD_NEIGH
    }
}

/// Writes the route into a pod the last `lookup` found (`ROUTE_POD`) into a conntrack entry's
/// `peer_addr`, laid out as `CT_F_POD_ROUTE` says (byte by byte: no copy on the stack, which
/// the callers have little of).
#[inline(always)]
pub fn remember(fib: &bpf_fib_lookup, into: &mut Addr) {
    let b = &mut into.0;
    b[..4].copy_from_slice(&fib.ifindex.to_ne_bytes());
    b[4..10].copy_from_slice(&fib.dmac);
    b[10..].copy_from_slice(&fib.smac);
}

/// Takes the route into a pod a conntrack entry remembers (`remember`) as if `lookup` had
/// found it: `ROUTE_POD` while its veth is still a pod's and the TTL allows a hop; otherwise
/// `ROUTE_NONE`, and the caller looks the route up.
#[inline(always)]
pub fn remembered(s: &mut Scratch, from: &Addr) -> u32 {
    let b = &from.0;
    let ifindex = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
    if s.pkt.ttl <= 1 || !is_pod_dev(ifindex) {
        return ROUTE_NONE;
    }
    s.fib.ifindex = ifindex;
    s.fib.dmac.copy_from_slice(&b[4..10]);
    s.fib.smac.copy_from_slice(&b[10..]);
    ROUTE_POD
}

/// Leaves a rewritten packet `lookup` refused to the kernel.
#[inline(always)]
pub fn fallback() -> i32 {
    count(Stat::RouteFallback);
    TC_ACT_OK as i32
}

/// Sends the packet on the route the last `lookup` found, or a conntrack entry remembered
/// (`route`: `ROUTE_POD`, or any other with a device): into the pod for `ROUTE_POD` (the
/// rewrite set its Ethernet addresses), else out of the device with link-layer addresses from
/// the neighbour table, falling back to the kernel's own path. Only at a TC ingress (a peer
/// redirect is only taken from there). Inlined: a BPF-to-BPF call costs a call and a return,
/// which return-thunk mitigations (AMD's SRSO "Safe RET") make dear.
#[inline(always)]
pub fn redirect(s: &mut Scratch, route: u32) -> i32 {
    if route == ROUTE_POD {
        // No fallback: the helper fails only for flags it does not know, and a remembered
        // route left nothing in `s.fib` for the neighbour table to use.
        count(Stat::Routed);
        count(Stat::RoutedToPod);
        // SAFETY: a helper on integers.
        return unsafe { bpf_redirect_peer(s.fib.ifindex, 0) } as i32;
    }
    // An IPv4 route may have an IPv6 next hop: the lookup says which family it wrote.
    s.nh.nh_family = s.fib.family as u32;
    // SAFETY: plain integers in unions.
    s.nh.__bindgen_anon_1.ipv6_nh = unsafe { s.fib.__bindgen_anon_4.ipv6_dst };
    // SAFETY: the next hop is a map value of the size passed.
    let rc = unsafe {
        bpf_redirect_neigh(
            s.fib.ifindex,
            &mut s.nh as *mut bpf_redir_neigh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    if rc != TC_ACT_REDIRECT as i64 {
        return fallback();
    }
    count(Stat::Routed);
    TC_ACT_REDIRECT as i32
}
