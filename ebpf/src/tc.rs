//! The per-packet path shared by `tc_from_pod` and `tc_from_netdev`: conntrack first (one
//! lookup serves both directions), then the service lookup for new flows.
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use weir_common::*;

use crate::{
    lb::{flow_hash, lookup_service, now_ns, select_backend},
    maps::{count, count_raw, Scratch, CT, SCRATCH, VIPNET},
    nat::{rewrite, Change},
    parse::{parse_out_of_line, Packet, TCP_FIN, TCP_RST},
    reject::reject,
};

const TC_ACT_SHOT: i32 = 2;

#[inline(always)]
/// `external`: the packet arrived on an uplink, from outside the node; it sees a service's
/// `SCOPE_EXTERNAL` entry where there is one.
pub fn handle(ctx: &TcContext, external: bool) -> i32 {
    let Some(s) = SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: the per-CPU scratch slot is ours for this run; programs do not nest on a CPU.
    let s = unsafe { &mut *s };
    let parsed = parse_out_of_line(ctx, &mut s.pkt);
    if parsed != 0 {
        count_raw(parsed & 0xff);
        return if parsed & 0x200 != 0 {
            TC_ACT_SHOT
        } else {
            TC_ACT_OK as i32
        };
    }
    match process(ctx, s, external) {
        Ok(verdict) => verdict,
        Err(stat) => {
            count(stat);
            TC_ACT_SHOT
        }
    }
}

/// Whether an IPv4 destination is in a /16 that holds a service address (see `VIPNET`).
#[inline(always)]
fn maybe_service(dst: &Addr) -> bool {
    let (word, bit) = vipnet_slot(dst.v4_octets());
    match VIPNET.get(word) {
        Some(w) => *w & bit != 0,
        None => true,
    }
}

#[inline(always)]
fn lifetime(p: &Packet, closing: bool) -> u64 {
    if p.proto != PROTO_TCP {
        CT_LIFETIME_NONTCP_NS
    } else if closing {
        CT_LIFETIME_CLOSING_NS
    } else {
        CT_LIFETIME_TCP_NS
    }
}

#[inline(always)]
fn process(ctx: &TcContext, s: &mut Scratch, external: bool) -> Result<i32, Stat> {
    let p = &s.pkt;
    s.fwd_key = CtKey {
        src: p.src,
        dst: p.dst,
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        _pad: [0; 3],
    };
    let syn = p.is_syn();
    if let Some(entry) = CT.get_ptr_mut(&s.fwd_key) {
        // SAFETY: an LRU value pointer stays valid for this program run.
        let e = unsafe { &mut *entry };
        let now = now_ns();
        // A SYN on a closing flow is a new connection that reuses the ports: it gets a fresh
        // backend choice and fresh entries, as Linux conntrack would do.
        let reopened = syn && e.flags & CT_F_CLOSING != 0 && e.dir == CT_DIR_FORWARD;
        if e.expires_ns > now && !reopened {
            if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                e.flags |= CT_F_CLOSING;
            }
            let life = lifetime(p, e.flags & CT_F_CLOSING != 0);
            // Refresh at most once a second: a write per packet would bounce the cache line.
            if e.expires_ns < now + life - 1_000_000_000 || e.flags & CT_F_CLOSING != 0 {
                let want = now + life;
                if e.flags & CT_F_CLOSING == 0 || want < e.expires_ns {
                    e.expires_ns = want;
                }
            }
            let (nat_addr, nat_port, dir, hairpin) =
                (e.nat_addr, e.nat_port, e.dir, e.flags & CT_F_HAIRPIN != 0);
            if dir == CT_DIR_FORWARD {
                let src = if hairpin {
                    Change::new(&p.src, &p.dst, p.sport, p.sport)
                } else {
                    Change::none()
                };
                let dst = Change::new(&p.dst, &nat_addr, p.dport, nat_port);
                rewrite(ctx, p, &src, &dst)?;
                count(Stat::DnatEstablished);
            } else {
                let dst = if hairpin {
                    Change::new(&p.dst, &p.src, p.dport, p.dport)
                } else {
                    Change::none()
                };
                let src = Change::new(&p.src, &nat_addr, p.sport, nat_port);
                rewrite(ctx, p, &src, &dst)?;
                count(Stat::RevNat);
            }
            return Ok(TC_ACT_OK as i32);
        }
    }

    Ok(new_flow(ctx, s, external))
}

/// A packet with no live conntrack entry: a new flow to a service, or not ours at all.
/// Out of line (its own stack frame), so it returns a plain verdict and counts its own drops.
#[inline(never)]
fn new_flow(ctx: &TcContext, s: &mut Scratch, external: bool) -> i32 {
    match try_new_flow(ctx, s, external) {
        Ok(v) => v,
        Err(stat) => {
            count(stat);
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn try_new_flow(ctx: &TcContext, s: &mut Scratch, external: bool) -> Result<i32, Stat> {
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
            s.reply_key = CtKey {
                src: p.dst,
                dst: p.src,
                sport: p.dport,
                dport: p.sport,
                proto: p.proto,
                _pad: [0; 3],
            };
            if let Some(e) = CT.get_ptr(&s.reply_key) {
                // SAFETY: an LRU value pointer stays valid for this program run.
                if unsafe { (*e).dir } == CT_DIR_REPLY {
                    let _ = CT.remove(&s.reply_key);
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
        return Ok(reject(ctx, s));
    }
    let now = now_ns();
    let hash = flow_hash(&p.src, p.sport, p.proto);
    let (backend_id, be) = select_backend(&p.dst, p.dport, p.proto, scope, &master, &p.src, hash)?;
    let hairpin = be.addr == p.src;
    let closing = p.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    s.fwd = CtValue {
        nat_addr: be.addr,
        nat_port: be.port,
        dir: CT_DIR_FORWARD,
        flags: if hairpin { CT_F_HAIRPIN } else { 0 },
        backend_id,
        svc_id: master.svc_id,
        _pad: 0,
        expires_ns: now + lifetime(p, closing),
    };
    // The reply comes from the backend to the client, or, for a hairpin flow, to the VIP that
    // became the source.
    s.reply_key = CtKey {
        src: be.addr,
        dst: if hairpin { p.dst } else { p.src },
        sport: be.port,
        dport: p.sport,
        proto: p.proto,
        _pad: [0; 3],
    };
    s.rev = s.fwd;
    s.rev.nat_addr = p.dst;
    s.rev.nat_port = p.dport;
    s.rev.dir = CT_DIR_REPLY;
    // Reply entry first: once the forward entry exists, the reply can come back.
    CT.insert(&s.reply_key, &s.rev, 0)
        .map_err(|_| Stat::DropConntrackInsert)?;
    CT.insert(&s.fwd_key, &s.fwd, 0)
        .map_err(|_| Stat::DropConntrackInsert)?;
    let src = if hairpin {
        Change::new(&p.src, &p.dst, p.sport, p.sport)
    } else {
        Change::none()
    };
    let dst = Change::new(&p.dst, &be.addr, p.dport, be.port);
    rewrite(ctx, p, &src, &dst)?;
    if hairpin {
        count(Stat::Hairpin);
    }
    count(Stat::DnatNew);
    Ok(TC_ACT_OK as i32)
}
