//! `tc_to_netdev`, on an uplink's egress: replies of flows an uplink's ingress translated to an
//! endpoint on the node that no program of ours sees the replies of (a pod whose veth carries
//! none, the node itself).
use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use weir_common::{Stat, SVC_F_DROP_EMPTY};
use weir_ebpf::{
    flow, icmp,
    lb::{lookup_service, maybe_service},
    maps::count,
    parse::{parsed, PARSED_ICMP},
    reply::reply_out,
};

const TC_ACT_SHOT: i32 = 2;

#[classifier]
pub fn tc_to_netdev(ctx: TcContext) -> i32 {
    to_netdev(&ctx)
}

/// A packet leaving the node by an uplink, the node's own or forwarded. Replies of flows an
/// uplink's ingress translated to an endpoint on the node get their reverse NAT here when no
/// program saw them on the way: the node's own (a hostNetwork endpoint), and a pod's when pod
/// veths carry no program (every pod's sockets are balanced at `connect`). A packet still
/// addressed to a Service that drops its traffic (no endpoint on the node for a `Local`
/// policy) is dropped, as kube-proxy drops it: the socket hooks leave it untranslated for the
/// per-packet path, and with no program on the pod's veth this is where it meets one.
/// Nothing else is touched, whatever its shape.
#[inline(always)]
pub fn to_netdev(ctx: &TcContext) -> i32 {
    let s = match parsed(ctx) {
        Ok(s) => s,
        Err(PARSED_ICMP) => return icmp::error(ctx, false),
        Err(_) => return TC_ACT_OK as i32,
    };
    flow::lookup(ctx, s, flow::AT_EGRESS);
    match reply_out(ctx, s) {
        Ok(true) => TC_ACT_OK as i32,
        Ok(false) => {
            let p = &s.pkt;
            if !p.v6 && !maybe_service(&p.dst) {
                return TC_ACT_OK as i32;
            }
            match lookup_service(&p.dst, p.dport, p.proto, false) {
                Some((m, _)) if m.count == 0 && m.flags & SVC_F_DROP_EMPTY != 0 => {
                    count(Stat::DropNoLocalBackend);
                    TC_ACT_SHOT
                }
                _ => TC_ACT_OK as i32,
            }
        }
        Err(stat) => {
            count(stat);
            TC_ACT_SHOT
        }
    }
}
