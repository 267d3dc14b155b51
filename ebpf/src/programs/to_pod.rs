//! `tc_to_pod`, on a pod veth's egress: replies to the pod from a service endpoint on the node
//! itself (its own DNS server, a hostNetwork endpoint), which no ingress of ours sees.
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use weir_ebpf::{
    flow, icmp,
    maps::count,
    parse::{parsed, PARSED_ICMP},
    reply::reply_out,
};

const TC_ACT_SHOT: i32 = 2;

#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    to_pod(&ctx)
}

/// A packet leaving for a pod. Only the node's own packets (no ingress device) can be replies
/// of a flow the pod opened to a service endpoint on the node; they get the reverse NAT the
/// ingress of a pod's veth gives replies of endpoints in pods. A forwarded packet was handled
/// at the ingress it came in on: it costs one load here.
#[inline(always)]
pub fn to_pod(ctx: &TcContext) -> i32 {
    // SAFETY: the context is the kernel's __sk_buff for this run; a 4-byte field read.
    if unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.skb.skb).ingress_ifindex)) } != 0
    {
        return TC_ACT_OK as i32;
    }
    // The node's own packet: never dropped here for its shape.
    let s = match parsed(ctx) {
        Ok(s) => s,
        Err(PARSED_ICMP) => return icmp::error(ctx, false),
        Err(_) => return TC_ACT_OK as i32,
    };
    flow::lookup(ctx, s, flow::AT_EGRESS);
    match reply_out(ctx, s) {
        Ok(_) => TC_ACT_OK as i32,
        Err(stat) => {
            count(stat);
            TC_ACT_SHOT
        }
    }
}
