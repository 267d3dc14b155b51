//! The service path of a packet entering the node's stack (`tc_from_pod`, `tc_from_netdev`):
//! conntrack first (one lookup serves both directions), then the service lookup for new flows.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::bpf_get_prandom_u32, programs::TcContext};
use weir_common::*;

use crate::{
    ct::{
        fwd_entry, insert_fwd, insert_reply, lifetime, refresh, remove_reply, reply_entry,
        set_full_fwd_key, set_reply_dport, set_reply_key,
    },
    flow, icmp,
    lb::{flow_hash, lookup_service, maybe_service, node_local_server, now_ns, select_backend},
    maps::{count, Scratch},
    nat::{rewrite, rewrite_call},
    parse::{parsed, PARSED_ICMP, TCP_FIN, TCP_RST},
    reject::reject,
    route::{
        backend_is_behind_ingress, fallback, fib_src, lookup, redirect, remember, remembered,
        set_addrs, ROUTE_LOCAL, ROUTE_NEIGH, ROUTE_NONE, ROUTE_POD, ROUTE_POD_NEIGH,
    },
};

const TC_ACT_SHOT: i32 = 2;

/// A packet entering the node's stack. `external`: it arrived on an uplink, from outside the
/// node; it sees a service's `SCOPE_EXTERNAL` entry where there is one.
#[inline(always)]
pub fn ingress(ctx: &TcContext, external: bool) -> i32 {
    let s = match parsed(ctx) {
        Ok(s) => s,
        Err(PARSED_ICMP) => return icmp::error(ctx, true),
        Err(code) if code & 0x200 != 0 => return TC_ACT_SHOT,
        Err(_) => return TC_ACT_OK as i32,
    };
    flow::lookup(ctx, s, flow::AT_INGRESS);
    match process(ctx, s, external) {
        Ok(verdict) => verdict,
        Err(stat) => {
            count(stat);
            TC_ACT_SHOT
        }
    }
}

/// How a translated packet the lookup found `route` for goes on: routed here (`ROUTE_POD`,
/// `ROUTE_NEIGH`) or by the kernel (`ROUTE_NONE`). One whose source is kept is only routed
/// into a pod: any other is the kernel's to forward, with what the node's own rules do to it.
#[inline(always)]
fn routed(rewrites_source: bool, route: u32) -> u32 {
    match route {
        ROUTE_POD => ROUTE_POD,
        ROUTE_POD_NEIGH => ROUTE_NEIGH,
        ROUTE_NEIGH if rewrites_source => ROUTE_NEIGH,
        _ => ROUTE_NONE,
    }
}

/// Whether the lookup of a flow's packet whose source is kept found it not to go into a pod
/// of the node, for good: its forward entry then gets `CT_F_KERNEL_ROUTE`.
#[inline(always)]
fn never_to_a_pod(route: u32) -> bool {
    route == ROUTE_NEIGH || route == ROUTE_LOCAL
}

#[inline(always)]
fn process(ctx: &TcContext, s: &mut Scratch, external: bool) -> Result<i32, Stat> {
    // The packet's tuple is in the forward key: `flow::lookup` set it.
    let p = &s.pkt;
    let syn = p.is_syn();
    if let Some(entry) = fwd_entry(s) {
        // SAFETY: an LRU value pointer stays valid for this program run.
        let e = unsafe { &mut *entry };
        let now = now_ns();
        // A SYN on a closing flow is a new connection that reuses the ports: it gets a fresh
        // backend choice and fresh entries, as Linux conntrack would do.
        let reopened = syn && e.flags & CT_F_CLOSING != 0 && e.dir == CT_DIR_FORWARD;
        if e.expires_ns > now && !reopened {
            refresh(e, p, now);
            let (nat_addr, nat_port, dir) = (e.nat_addr, e.nat_port, e.dir);
            let (peer, peer_addr, peer_port) = (
                e.flags & (CT_F_HAIRPIN | CT_F_SNAT) != 0,
                e.peer_addr,
                e.peer_port,
            );
            if dir == CT_DIR_FORWARD {
                if peer {
                    s.chg_src.set(&p.src, &peer_addr, p.sport, peer_port);
                } else {
                    s.chg_src.none();
                }
                s.chg_dst.set(&p.dst, &nat_addr, p.dport, nat_port);
            } else {
                if peer {
                    s.chg_dst.set(&p.dst, &peer_addr, p.dport, peer_port);
                } else {
                    s.chg_dst.keep(&p.dst);
                }
                s.chg_src.set(&p.src, &nat_addr, p.sport, nat_port);
            }
            // A packet whose source is rewritten is routed here (see `route.rs`), and so is
            // one into a pod of the node: looked up first, so that the rewrite also counts
            // the hop.
            let route = route_established(ctx, s, e);
            // Into a pod, or on as it is: the flow's next packets take the cache.
            let kept = route == ROUTE_NONE && !s.chg_src.on;
            if e.flags & CT_F_CLOSING == 0 && (route == ROUTE_POD || kept) {
                let stat = if dir == CT_DIR_FORWARD {
                    Stat::DnatEstablished
                } else {
                    Stat::RevNat
                };
                let into = if kept { 0 } else { s.fib.ifindex };
                flow::fill(s, flow::AT_INGRESS, into, stat, e.expires_ns);
            }
            rewrite(ctx, s, route != ROUTE_NONE, route == ROUTE_POD)?;
            count(if dir == CT_DIR_FORWARD {
                Stat::DnatEstablished
            } else {
                Stat::RevNat
            });
            if route != ROUTE_NONE {
                return Ok(redirect(s, route));
            }
            if s.chg_src.on {
                return Ok(fallback());
            }
            return Ok(TC_ACT_OK as i32);
        }
    }

    // The steps of a new flow are out of line and called one after the other from here, never
    // from each other: the verifier sums the stack frames of a call chain (512 bytes at most).
    match new_flow(s, external) {
        NEXT_REJECT => Ok(reject(ctx, s)),
        NEXT_COMMIT => Ok(commit_new_flow(ctx, s, false)),
        NEXT_COMMIT_MAY_SNAT => Ok(commit_new_flow(ctx, s, true)),
        verdict => Ok(verdict),
    }
}

/// How an established flow's packet (its rewrite in `s.chg_src`, `s.chg_dst`) goes on: a
/// `ROUTE_` value, as `routed` gives it. The entry remembers what the flow's lookup found: a
/// route into a pod (taken while the veth is a pod's, with no lookup), or that the kernel
/// forwards the flow. Out of line: its caller's frame is the program's, in every call chain.
#[inline(never)]
fn route_established(ctx: &TcContext, s: &mut Scratch, e: &mut CtValue) -> u32 {
    let peer = e.flags & (CT_F_HAIRPIN | CT_F_SNAT) != 0;
    if e.flags & CT_F_KERNEL_ROUTE != 0 {
        return ROUTE_NONE;
    }
    if !peer && e.flags & CT_F_POD_ROUTE != 0 && remembered(s, &e.peer_addr) == ROUTE_POD {
        return ROUTE_POD;
    }
    // The addresses as they are to be (`keep` when unchanged).
    let from = if s.chg_src.on {
        &s.chg_src.new_addr
    } else {
        &s.pkt.src
    };
    set_addrs(&mut s.fib, from, &s.chg_dst.new_addr, s.pkt.v6);
    let found = lookup(ctx, s);
    note_route(
        &s.fib,
        &mut e.flags,
        &mut e.peer_addr,
        found,
        peer,
        s.chg_src.on,
    );
    routed(s.chg_src.on, found)
}

/// Records in an entry (its `flags`, and `peer_addr` unless the flow needs its peer) what
/// the lookup for its packets found: a route into a pod (`CT_F_POD_ROUTE`), or, for a flow
/// whose source is kept, none into a pod (`CT_F_KERNEL_ROUTE`).
#[inline(always)]
fn note_route(
    fib: &aya_ebpf::bindings::bpf_fib_lookup,
    flags: &mut u8,
    peer_addr: &mut Addr,
    found: u32,
    needs_peer: bool,
    rewrites_source: bool,
) {
    if found == ROUTE_POD && !needs_peer {
        remember(fib, peer_addr);
        *flags |= CT_F_POD_ROUTE;
    } else if !rewrites_source && never_to_a_pod(found) {
        *flags = (*flags & !CT_F_POD_ROUTE) | CT_F_KERNEL_ROUTE;
    } else {
        *flags &= !CT_F_POD_ROUTE;
    }
}

/// What `new_flow` leaves to its caller, besides a final verdict.
const NEXT_REJECT: i32 = 100;
/// The backend is chosen (`s.fwd`): write the flow's entries and rewrite the packet.
const NEXT_COMMIT: i32 = 101;
/// The same, for external traffic any endpoint may serve: source NAT if the backend is
/// elsewhere.
const NEXT_COMMIT_MAY_SNAT: i32 = 102;

/// A packet with no live conntrack entry: a new flow to a service, or not ours at all.
/// Out of line (its own stack frame), so it returns a plain verdict or a `NEXT_` step, and
/// counts its own drops.
#[inline(never)]
fn new_flow(s: &mut Scratch, external: bool) -> i32 {
    match try_new_flow(s, external) {
        Ok(v) => v,
        Err(stat) => {
            count(stat);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_new_flow(s: &mut Scratch, external: bool) -> Result<i32, Stat> {
    let p = &s.pkt;
    let service = if !p.v6 && !maybe_service(&p.dst) {
        None
    } else {
        lookup_service(&p.dst, p.dport, p.proto, external)
    };
    let Some((master, scope)) = service else {
        // A connection that is not a service's, on the 4-tuple of an earlier service flow's
        // replies (the client reused its port, say to reach the backend directly): that reply
        // entry is stale and would rewrite the new connection's replies. Only SYNs pay this.
        if p.is_syn() {
            let (src, dst, sport, dport, proto) = (p.dst, p.src, p.dport, p.sport, p.proto);
            set_reply_key(s, &src, &dst, sport, dport, proto);
            if let Some(e) = reply_entry(s) {
                // SAFETY: an LRU value pointer stays valid for this program run.
                if unsafe { (*e).dir } == CT_DIR_REPLY {
                    remove_reply(s);
                }
            }
        }
        count(Stat::PassNoService);
        return Ok(TC_ACT_OK as i32);
    };
    if master.count == 0 {
        if master.flags & SVC_F_DROP_EMPTY != 0 {
            count(Stat::DropNoLocalBackend);
            return Ok(TC_ACT_SHOT);
        }
        return Ok(NEXT_REJECT);
    }
    let now = now_ns();
    let closing = p.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    // The cluster DNS Service, while the node's own server holds its lease: to that server.
    // Its replies leave from the node itself, and `to_pod` gives them the service's address.
    if master.flags & SVC_F_NODE_LOCAL != 0 {
        if let Some((addr, port)) = node_local_server(p.v6) {
            s.fwd = CtValue {
                nat_addr: addr,
                peer_addr: p.dst,
                nat_port: port,
                peer_port: p.sport,
                dir: CT_DIR_FORWARD,
                flags: 0,
                _pad: 0,
                backend_id: 0,
                svc_id: master.svc_id,
                expires_ns: now + lifetime(p, closing),
            };
            count(Stat::NodeLocal);
            return Ok(NEXT_COMMIT);
        }
    }
    let hash = flow_hash(&p.src, p.sport, p.proto);
    let (backend_id, be) = select_backend(&p.dst, p.dport, p.proto, scope, &master, &p.src, hash)?;
    let hairpin = be.addr == p.src;
    s.fwd = CtValue {
        nat_addr: be.addr,
        // Hairpin: the source becomes the VIP; source NAT replaces it below.
        peer_addr: p.dst,
        nat_port: be.port,
        peer_port: p.sport,
        dir: CT_DIR_FORWARD,
        flags: if hairpin { CT_F_HAIRPIN } else { 0 },
        _pad: 0,
        backend_id,
        svc_id: master.svc_id,
        expires_ns: now + lifetime(p, closing),
    };
    Ok(if external && scope == SCOPE_ALL && !hairpin {
        NEXT_COMMIT_MAY_SNAT
    } else {
        NEXT_COMMIT
    })
}

/// Writes the conntrack entries of the new flow `s.fwd` describes (backend chosen) and
/// rewrites its first packet. Out of line, with its own stack frame; counts its own drops.
#[inline(never)]
fn commit_new_flow(ctx: &TcContext, s: &mut Scratch, may_snat: bool) -> i32 {
    match try_commit_new_flow(ctx, s, may_snat) {
        Ok(v) => v,
        Err(stat) => {
            count(stat);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_commit_new_flow(ctx: &TcContext, s: &mut Scratch, may_snat: bool) -> Result<i32, Stat> {
    // The steps below read the flow's tuple from `s.fwd_key`.
    set_full_fwd_key(s);
    // External traffic any endpoint may serve (not a `Local` policy's), to an endpoint the
    // node reaches back out of the device the traffic came in on: one on another node. Its
    // replies would go from there straight to the client, who expects them from the frontend.
    // As kube-proxy masquerades it, the source becomes the node's address on that route and a
    // port of `SNAT_PORT_MIN..`. An endpoint on this node sees the client's own address.
    let snat = may_snat && backend_is_behind_ingress(ctx, s);
    if snat {
        s.fwd.flags |= CT_F_SNAT;
        s.fwd.peer_addr = fib_src(s);
    }
    let rewrites_source = s.fwd.flags & (CT_F_HAIRPIN | CT_F_SNAT) != 0;
    // The reply comes from the backend to the client, or to the source the client was given
    // (the VIP for a hairpin flow, the node's address for a source-NATed one). It leaves from
    // the frontend, to the client.
    let reply_dst = if rewrites_source {
        s.fwd.peer_addr
    } else {
        s.fwd_key.src
    };
    let (nat_addr, nat_port, sport, proto) = (
        s.fwd.nat_addr,
        s.fwd.nat_port,
        s.fwd_key.sport,
        s.fwd_key.proto,
    );
    set_reply_key(s, &nat_addr, &reply_dst, nat_port, sport, proto);
    s.rev = s.fwd;
    s.rev.nat_addr = s.fwd_key.dst;
    s.rev.nat_port = s.fwd_key.dport;
    s.rev.peer_addr = s.fwd_key.src;
    s.rev.peer_port = s.fwd_key.sport;
    s.rev.dir = CT_DIR_REPLY;
    // Routed here (see `process`); looked up before the forward entry is written, which
    // remembers a flow the kernel forwards. A source-NATed flow's route is the one
    // `backend_is_behind_ingress` just found (`s.fib` holds it, next hop included).
    let route = if snat {
        if s.pkt.ttl > 1 {
            ROUTE_NEIGH
        } else {
            ROUTE_NONE
        }
    } else {
        let from = if rewrites_source {
            &s.fwd.peer_addr
        } else {
            &s.fwd_key.src
        };
        set_addrs(&mut s.fib, from, &s.fwd.nat_addr, s.pkt.v6);
        let found = lookup(ctx, s);
        note_route(
            &s.fib,
            &mut s.fwd.flags,
            &mut s.fwd.peer_addr,
            found,
            rewrites_source,
            rewrites_source,
        );
        routed(rewrites_source, found)
    };
    // Reply entry first: once the forward entry exists, the reply can come back.
    if snat {
        let port = claim_snat_port(s, now_ns());
        if port == 0 {
            return Err(Stat::DropSnatNoPort);
        }
        s.fwd.peer_port = port as u16;
    } else if !insert_reply(s, false) {
        return Err(Stat::DropConntrackInsert);
    }
    insert_fwd(s)?;
    // In the scratch space, as an established packet's: this frame is in a call chain.
    if rewrites_source {
        s.chg_src.set(
            &s.fwd_key.src,
            &s.fwd.peer_addr,
            s.fwd_key.sport,
            s.fwd.peer_port,
        );
    } else {
        s.chg_src.none();
    }
    s.chg_dst.set(
        &s.fwd_key.dst,
        &s.fwd.nat_addr,
        s.fwd_key.dport,
        s.fwd.nat_port,
    );
    rewrite_call(ctx, s, route != ROUTE_NONE, route == ROUTE_POD)?;
    if s.fwd.flags & CT_F_HAIRPIN != 0 {
        count(Stat::Hairpin);
    }
    if snat {
        count(Stat::SnatNew);
    }
    count(Stat::DnatNew);
    if route != ROUTE_NONE {
        return Ok(redirect(s, route));
    }
    if rewrites_source {
        return Ok(fallback());
    }
    Ok(TC_ACT_OK as i32)
}

/// Claims a free source port towards the endpoint for a source-NATed flow by writing the reply
/// entry (`s.reply_key`, `s.rev`) with it. A port is free when no entry holds it, or only one
/// that expired. Returns the port in network byte order, or 0 when `SNAT_TRIES` random ports
/// were all taken.
#[inline(never)]
fn claim_snat_port(s: &mut Scratch, now: u64) -> u32 {
    let mut i = 0;
    while i < SNAT_TRIES {
        // SAFETY: a helper without arguments.
        let r = unsafe { bpf_get_prandom_u32() };
        let port =
            (SNAT_PORT_MIN as u32 + ((r as u64 * SNAT_PORT_COUNT as u64) >> 32) as u32) as u16;
        set_reply_dport(s, port.to_be());
        if insert_reply(s, true) {
            return port.to_be() as u32;
        }
        if let Some(e) = reply_entry(s) {
            // SAFETY: an LRU value pointer stays valid for this program run.
            if unsafe { (*e).expires_ns } <= now && insert_reply(s, false) {
                return port.to_be() as u32;
            }
        }
        i += 1;
    }
    0
}
