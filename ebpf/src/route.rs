//! Routing a rewritten packet ourselves: a FIB lookup, then a redirect through the neighbour
//! table, as the kernel's forwarding would do it. Needed for every packet whose source the
//! programs rewrite: that source may be an address of the node (a NodePort's, or the source NAT
//! address), and the kernel's input path drops a packet that arrives with a local source as a
//! martian. Packets whose lookup fails (no route, MTU exceeded, forwarding off) are left to the
//! kernel, counted as `route_fallback`.
//!
//! A routed packet's TTL (hop limit) is decremented, as the kernel's forwarding does; one that
//! arrives with 1 or less is left to the kernel too, whose forwarding drops it (with Time
//! Exceeded where it may), counted as `route_fallback` as well.
use aya_ebpf::{
    bindings::{
        bpf_fib_lookup, bpf_redir_neigh, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH,
        BPF_FIB_LOOKUP_SRC, TC_ACT_OK, TC_ACT_REDIRECT,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup_helper, bpf_redirect_neigh},
    programs::TcContext,
};
use weir_common::{Addr, Stat};

use crate::maps::{count, Scratch};

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

/// Runs the lookup `s.fib` holds; true on a route the packet would be forwarded by.
#[inline(always)]
fn run(ctx: &TcContext, s: &mut Scratch, flags: u32) -> bool {
    // SAFETY: the context is the program's own; the parameters are a map value of the size
    // passed.
    let rc = unsafe {
        fib_lookup_helper(
            ctx.skb.skb as *mut _,
            &mut s.fib as *mut bpf_fib_lookup,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            flags,
        )
    };
    rc == BPF_FIB_LKUP_RET_SUCCESS as i64
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
    run(ctx, s, BPF_FIB_LOOKUP_SKIP_NEIGH | BPF_FIB_LOOKUP_SRC)
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

/// Looks up the route of the packet once rewritten to go from `src` to `dst` (the result
/// stays in `s.fib` for `redirect`). True when the program is to send it itself: a route was
/// found, and the TTL allows one more hop (the rewrite then decrements it).
#[inline(never)]
pub fn lookup(ctx: &TcContext, s: &mut Scratch, src: &Addr, dst: &Addr) -> bool {
    // A packet with no hop left is the kernel's: no lookup for it.
    if s.pkt.ttl <= 1 {
        return false;
    }
    fill(ctx, s);
    let v6 = s.pkt.v6;
    // SAFETY: plain integers in unions.
    unsafe {
        put(&mut s.fib.__bindgen_anon_3.ipv6_src, src, v6);
        put(&mut s.fib.__bindgen_anon_4.ipv6_dst, dst, v6);
    }
    run(ctx, s, BPF_FIB_LOOKUP_SKIP_NEIGH)
}

/// Leaves a rewritten packet `lookup` refused to the kernel.
#[inline(always)]
pub fn fallback() -> i32 {
    count(Stat::RouteFallback);
    TC_ACT_OK as i32
}

/// Sends the packet out of the device the last `lookup` found, with link-layer addresses from
/// the neighbour table. Falls back to the kernel's own path.
#[inline(never)]
pub fn redirect(s: &mut Scratch) -> i32 {
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
