//! Conntrack, one map per family: an IPv4 flow is looked up under its 16-byte tuple
//! (`CT4`, `Ct4Key`), an IPv6 one under its 40-byte tuple (`CT6`, `CtKey`). Each operation
//! takes the tuple the scratch space holds for its direction (`fwd_key*`, `reply_key*`) and
//! the map of the packet's family (`s.pkt.v6`).
use aya_ebpf::bindings::BPF_NOEXIST;
use weir_common::*;

use crate::{
    flow::{invalidate, invalidate6},
    maps::{Scratch, CT4, CT6},
    parse::{Packet, TCP_FIN, TCP_RST},
};

/// Fills a conntrack key in place. Its pad bytes are left alone: the keys live in the per-CPU
/// scratch value, zeroed when the map was made and never written with anything else (a
/// struct literal here made LLVM copy the tuple through the stack and call `memset` for the
/// three pad bytes, on every packet).
#[inline(always)]
pub fn set_key(k: &mut CtKey, src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8) {
    k.src = *src;
    k.dst = *dst;
    k.sport = sport;
    k.dport = dport;
    k.proto = proto;
}

/// The same for an IPv4 tuple (the addresses IPv4-mapped).
#[inline(always)]
fn set_key4(k: &mut Ct4Key, src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8) {
    k.src = src.words()[3];
    k.dst = dst.words()[3];
    k.sport = sport;
    k.dport = dport;
    k.proto = proto;
}

/// Sets the forward tuple to the packet's own, in the key its family is looked up with.
#[inline(always)]
pub fn set_fwd_key(s: &mut Scratch) {
    let p = &s.pkt;
    if p.v6 {
        set_key(&mut s.fwd_key, &p.src, &p.dst, p.sport, p.dport, p.proto);
    } else {
        set_key4(&mut s.fwd_key4, &p.src, &p.dst, p.sport, p.dport, p.proto);
    }
}

/// Sets the forward tuple to that of a packet going against the one `s.reply_key` holds.
#[inline(always)]
pub fn set_fwd_key_reversed(s: &mut Scratch) {
    let r = &s.reply_key;
    if s.pkt.v6 {
        set_key(&mut s.fwd_key, &r.dst, &r.src, r.dport, r.sport, r.proto);
    } else {
        set_key4(&mut s.fwd_key4, &r.dst, &r.src, r.dport, r.sport, r.proto);
    }
}

/// Writes the packet's own tuple to `s.fwd_key` for an IPv4 packet too, which a new flow's
/// steps read (an IPv6 packet's is there already).
#[inline(always)]
pub fn set_full_fwd_key(s: &mut Scratch) {
    let p = &s.pkt;
    if !p.v6 {
        set_key(&mut s.fwd_key, &p.src, &p.dst, p.sport, p.dport, p.proto);
    }
}

/// Sets the reply tuple, in both keys for IPv4 (the full one is read back by a new flow's
/// steps).
#[inline(always)]
pub fn set_reply_key(s: &mut Scratch, src: &Addr, dst: &Addr, sport: u16, dport: u16, proto: u8) {
    set_key(&mut s.reply_key, src, dst, sport, dport, proto);
    if !s.pkt.v6 {
        set_key4(&mut s.reply_key4, src, dst, sport, dport, proto);
    }
}

/// Sets the reply tuple's destination port (a source port being claimed for source NAT).
#[inline(always)]
pub fn set_reply_dport(s: &mut Scratch, port: u16) {
    s.reply_key.dport = port;
    s.reply_key4.dport = port;
}

/// The entry of the forward tuple (`set_fwd_key`).
#[inline(always)]
pub fn fwd_entry(s: &Scratch) -> Option<*mut CtValue> {
    if s.pkt.v6 {
        CT6.get_ptr_mut(&s.fwd_key)
    } else {
        CT4.get_ptr_mut(&s.fwd_key4)
    }
}

/// The entry of the reply tuple (`set_reply_key`).
#[inline(always)]
pub fn reply_entry(s: &Scratch) -> Option<*mut CtValue> {
    if s.pkt.v6 {
        CT6.get_ptr_mut(&s.reply_key)
    } else {
        CT4.get_ptr_mut(&s.reply_key4)
    }
}

#[inline(always)]
pub fn remove_reply(s: &Scratch) {
    if s.pkt.v6 {
        let _ = CT6.remove(&s.reply_key);
        invalidate6(&s.reply_key);
    } else {
        let _ = CT4.remove(&s.reply_key4);
        invalidate(&s.reply_key4);
    }
}

/// Writes `s.fwd` under the forward tuple (which `set_full_fwd_key` also set for IPv4).
#[inline(always)]
pub fn insert_fwd(s: &Scratch) -> Result<(), Stat> {
    let r = if s.pkt.v6 {
        let r = CT6.insert(&s.fwd_key, &s.fwd, 0);
        invalidate6(&s.fwd_key);
        r
    } else {
        let r = CT4.insert(&s.fwd_key4, &s.fwd, 0);
        invalidate(&s.fwd_key4);
        r
    };
    r.map_err(|_| Stat::DropConntrackInsert)
}

/// Writes `s.rev` under the reply tuple; `only_new`: unless an entry is there.
#[inline(always)]
pub fn insert_reply(s: &Scratch, only_new: bool) -> bool {
    let flags = if only_new { BPF_NOEXIST as u64 } else { 0 };
    if s.pkt.v6 {
        let ok = CT6.insert(&s.reply_key, &s.rev, flags).is_ok();
        if ok {
            invalidate6(&s.reply_key);
        }
        ok
    } else {
        let ok = CT4.insert(&s.reply_key4, &s.rev, flags).is_ok();
        if ok {
            invalidate(&s.reply_key4);
        }
        ok
    }
}

/// Marks a flow closing on FIN or RST and pushes its expiry on, at most once a second (a
/// write per packet would bounce the cache line).
#[inline(always)]
pub fn refresh(e: &mut CtValue, p: &Packet, now: u64) {
    if p.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        e.flags |= CT_F_CLOSING;
    }
    let life = lifetime(p, e.flags & CT_F_CLOSING != 0);
    if e.expires_ns < now + life - 1_000_000_000 || e.flags & CT_F_CLOSING != 0 {
        let want = now + life;
        if e.flags & CT_F_CLOSING == 0 || want < e.expires_ns {
            e.expires_ns = want;
        }
    }
}

/// How long a flow lives without packets.
#[inline(always)]
pub fn lifetime(p: &Packet, closing: bool) -> u64 {
    if p.proto != PROTO_TCP {
        CT_LIFETIME_NONTCP_NS
    } else if closing {
        CT_LIFETIME_CLOSING_NS
    } else {
        CT_LIFETIME_TCP_NS
    }
}
