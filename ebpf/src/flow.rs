//! The flow cache: an established IPv4 flow's rewrite, kept per CPU, so that the flow's next
//! packets are translated with no conntrack lookup and written with no helper call.
//!
//! Where the time of an established packet went (B8, its `bound` rows): the conntrack lookup
//! (an LRU hash: a call into the kernel's hash table, and its returns, each through the
//! return thunk of SRSO-mitigated CPUs) and `bpf_skb_store_bytes` took about 70 ns of it here,
//! where a per-CPU array lookup (the verifier inlines it: no call) and direct packet writes
//! take about 10.
//!
//! - `fill`: the conntrack path, having translated an established packet, leaves the slot of
//!   its tuple with what it did: the new addresses and ports, the checksum differences, the
//!   route into a pod (device and Ethernet addresses) or none (the kernel forwards).
//! - `lookup`: before conntrack, a packet whose tuple holds a live slot is handed to
//!   `tc_flow_write` by tail call. That program writes the packet directly; a program that
//!   does gets a prologue from the kernel that makes every cloned skb's header writable (a
//!   `bpf_skb_pull_data` call), so the write is a program of its own: the packets it does not
//!   rewrite never pay for it.
//!
//! A slot is used only while it is younger than `FLOW_SLOT_LIFETIME_NS` and its entry's
//! expiry, and while the generations it was filled under hold (see `FLOW_GEN_GLOBAL`):
//! any conntrack write of a tuple of that slot index, by a program or by user space, ends it.
//! Packets that change a flow's state (TCP SYN, FIN, RST), IPv6, IPv4 with options and
//! CHECKSUM_COMPLETE packets always take conntrack.
use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::generated::{bpf_get_smp_processor_id, bpf_redirect_peer},
    macros::map,
    maps::{Array, PerCpuArray, ProgramArray},
    programs::TcContext,
};
use weir_common::*;

use crate::{
    lb::now_ns,
    maps::{count, count_raw, Scratch, SCRATCH},
    nat::{
        fold16, fold32, full_by_diff, ip_summed, partial_by_diff, Diffs, CHECKSUM_COMPLETE,
        CHECKSUM_PARTIAL,
    },
    parse::{ptr_at, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Where the flow was translated: `key._pad[0]` of a slot. The same tuple is translated
/// differently at an ingress (`handle`: routed) and on the way out (`reply_out`).
pub const AT_INGRESS: u8 = 0;
pub const AT_EGRESS: u8 = 1;

/// One flow's rewrite. Addresses and ports as they lie in the packet.
#[repr(C)]
pub struct Slot {
    /// The packet's tuple, with `AT_*` in its first pad byte.
    pub key: Ct4Key,
    /// The generations it was filled under (slot index's + global).
    pub gen: u64,
    /// Used until then (the coarse clock, `now_ns`).
    pub until_ns: u64,
    /// The pod's veth the packet is handed into, its Ethernet addresses in `macs`; 0: the
    /// packet goes on as it is (the kernel forwards it).
    pub ifindex: u32,
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    /// Destination, then source, as 16-bit words.
    pub macs: [u16; 6],
    /// The IPv4 header checksum's difference (addresses, and the TTL when routed); 0: none.
    pub ip_diff: u32,
    /// The L4 checksum's differences of the addresses and of the ports, as `nat` applies
    /// them; 0: none.
    pub l4_addr: u32,
    pub l4_port: u32,
    /// The verdict's counter (`DnatEstablished`, `RevNat`).
    pub stat: u8,
    pub _pad: [u8; 3],
}

/// The cache, per CPU (a flow's packets mostly stay on one). Not pinned: a new run starts
/// empty.
#[map(name = "FLOWS")]
pub static FLOWS: PerCpuArray<Slot> = PerCpuArray::with_max_entries(FLOW_SLOTS, 0);

/// The generations (see `FLOW_GEN_GLOBAL`). Pinned, so that user space moves the global one.
#[map(name = "LB_FLOWGEN_V1")]
pub static FLOW_GEN: Array<u64> = Array::pinned(FLOW_SLOTS + 1, 0);

/// `tc_flow_write`, at index 0 (the loader puts it there).
#[map(name = "FLOW_WRITE")]
pub static FLOW_WRITE: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The generation a slot of index `idx` is filled under, now.
#[inline(always)]
fn generation(idx: u32) -> u64 {
    let own = FLOW_GEN.get(idx).copied().unwrap_or(0);
    own.wrapping_add(FLOW_GEN.get(FLOW_GEN_GLOBAL).copied().unwrap_or(0))
}

/// Ends the slots of a tuple, on every CPU: called after each conntrack write of it.
///
/// Not an atomic add (Rust has none for the BPF target): two CPUs moving it at once may both
/// write. Each adds 1 and its own number times 2^32, so their values differ from each other
/// and from any the other read: whichever write comes last, a slot filled under a value read
/// before it no longer matches.
#[inline(always)]
pub fn invalidate(k: &Ct4Key) {
    if let Some(g) = FLOW_GEN.get_ptr_mut(flow_slot(k)) {
        // SAFETY: a helper without arguments; a map value, read and written whole.
        unsafe {
            let cpu = bpf_get_smp_processor_id() as u64;
            let v = core::ptr::read_volatile(g);
            core::ptr::write_volatile(g, v.wrapping_add(1 + (cpu << 32)));
        }
    }
}

/// Whether the packet may be translated from the cache at all: IPv4 without options, no
/// SYN, FIN or RST.
#[inline(always)]
fn cacheable(s: &Scratch) -> bool {
    let p = &s.pkt;
    !p.v6
        && p.l3_off == 14
        && p.l4_off == 14 + 20
        && (p.proto != PROTO_TCP || p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0)
}

/// Sets `s.fwd_key4` to the packet's tuple (as `set_fwd_key`) and reads the generation its
/// slot would be filled under (`s.flow_gen`), before conntrack is looked at: a change made
/// after that read moves the generation past it. Then, if the slot holds the flow, hands the
/// packet to `tc_flow_write`, which does not return here. Returns when the packet is not for
/// the cache (or the tail call failed): the conntrack path goes on.
#[inline(always)]
pub fn lookup(ctx: &TcContext, s: &mut Scratch, at: u8) {
    s.flow_idx = FLOW_SLOTS;
    if !cacheable(s) {
        return;
    }
    let p = &s.pkt;
    let k = &mut s.fwd_key4;
    k.src = p.src.words()[3];
    k.dst = p.dst.words()[3];
    k.sport = p.sport;
    k.dport = p.dport;
    k.proto = p.proto;
    let idx = flow_slot(k);
    s.flow_idx = idx;
    s.flow_gen = generation(idx);
    let Some(slot) = FLOWS.get_ptr(idx) else {
        return;
    };
    // SAFETY: a per-CPU slot, ours for this run.
    let slot = unsafe { &*slot };
    let (a, b) = (&slot.key, &s.fwd_key4);
    if a.src != b.src
        || a.dst != b.dst
        || a.sport != b.sport
        || a.dport != b.dport
        || a.proto != b.proto
        || a._pad[0] != at
        || slot.gen != s.flow_gen
        || slot.until_ns <= now_ns()
        || (slot.ifindex != 0 && p.ttl <= 1)
    {
        return;
    }
    // The packet must hold its L4 checksum in its linear data, which the writer cannot fall
    // back from; and its checksum kind must be one the writer computes.
    let csum_end = if p.proto == PROTO_TCP {
        14 + 20 + 18
    } else {
        14 + 20 + 8
    };
    if ptr_at::<[u8; 14 + 20 + 8]>(ctx, csum_end - (14 + 20 + 8)).is_none() {
        return;
    }
    match ip_summed(ctx) {
        Some(kind) if kind != CHECKSUM_COMPLETE => s.flow_csum = kind,
        _ => return,
    }
    // SAFETY: a tail call into our own program array; on success it does not return.
    unsafe { FLOW_WRITE.tail_call(ctx, 0) };
}

/// Fills the packet's slot (`lookup` set its key and index) with the rewrite in `s.chg_src`
/// and `s.chg_dst`, handed into the pod of `ifindex` (Ethernet addresses in `s.fib`) or left
/// as it is (`ifindex` 0), counted as `stat`, until `expires_ns` at the latest.
#[inline(always)]
pub fn fill(s: &Scratch, at: u8, ifindex: u32, stat: Stat, expires_ns: u64) {
    if s.flow_idx >= FLOW_SLOTS {
        return;
    }
    let Some(slot) = FLOWS.get_ptr_mut(s.flow_idx) else {
        return;
    };
    // SAFETY: a per-CPU slot, ours for this run.
    let slot = unsafe { &mut *slot };
    let (p, src, dst) = (&s.pkt, &s.chg_src, &s.chg_dst);
    let mut d = Diffs { addr: 0, port: 0 };
    crate::nat::diff(p, src, &mut d);
    crate::nat::diff(p, dst, &mut d);
    let k = &s.fwd_key4;
    slot.key.src = k.src;
    slot.key.dst = k.dst;
    slot.key.sport = k.sport;
    slot.key.dport = k.dport;
    slot.key.proto = k.proto;
    slot.key._pad[0] = at;
    slot.gen = s.flow_gen;
    let until = now_ns() + FLOW_SLOT_LIFETIME_NS;
    slot.until_ns = if expires_ns < until {
        expires_ns
    } else {
        until
    };
    slot.ifindex = ifindex;
    (slot.src, slot.sport) = if src.on {
        (src.new_addr.words()[3], src.new_port)
    } else {
        (k.src, p.sport)
    };
    (slot.dst, slot.dport) = if dst.on {
        (dst.new_addr.words()[3], dst.new_port)
    } else {
        (k.dst, p.dport)
    };
    let (dm, sm) = (&s.fib.dmac, &s.fib.smac);
    for i in 0..3 {
        slot.macs[i] = u16::from_ne_bytes([dm[2 * i], dm[2 * i + 1]]);
        slot.macs[3 + i] = u16::from_ne_bytes([sm[2 * i], sm[2 * i + 1]]);
    }
    // A hop: the TTL, the first byte of its 16-bit word with the protocol as it lies in
    // memory, goes down by one, which adds the complement of that word's 1 to the header's
    // sum, as `nat::rewrite_inner` computes it.
    let hop = if ifindex != 0 {
        (!u16::from_ne_bytes([1, 0])) as u64
    } else {
        0
    };
    slot.ip_diff = fold32(d.addr + hop);
    slot.l4_addr = fold32(d.addr);
    slot.l4_port = fold16(fold32(d.port)) as u32;
    slot.stat = stat as u8;
}

/// `tc_flow_write`: the rewrite of the slot `lookup` found, written into the packet, and the
/// packet's verdict. Computes what `nat::rewrite` would, byte for byte (the fixtures check
/// both against the same expected frames).
#[inline(always)]
pub fn write(ctx: &TcContext) -> i32 {
    const TC_ACT_SHOT: i32 = 2;
    let Some(s) = SCRATCH.get_ptr(0) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: the per-CPU scratch slot, as `lookup` left it for this packet.
    let s = unsafe { &*s };
    let Some(slot) = FLOWS.get_ptr(s.flow_idx) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: a per-CPU slot, ours for this run.
    let slot = unsafe { &*slot };
    let udp = s.pkt.proto == PROTO_UDP;
    let csum_off = if udp { 14 + 20 + 6 } else { 14 + 20 + 16 };
    let (Some(f), Some(l4)) = (ptr_at::<[u16; 19]>(ctx, 0), ptr_at::<u16>(ctx, csum_off)) else {
        count(Stat::DropRewriteFailed);
        return TC_ACT_SHOT;
    };
    let (f, l4) = (f as *mut u16, l4 as *mut u16);
    // SAFETY: `ptr_at` checked the bounds of the 38 bytes from the Ethernet header to the
    // ports and of the checksum field; this program may write packet data. Words at even
    // offsets (see `parse::half`).
    unsafe {
        if slot.ifindex != 0 {
            for i in 0..6 {
                *f.add(i) = slot.macs[i];
            }
            *(f as *mut u8).add(14 + 8) -= 1;
        }
        let ip_csum = f.add((14 + 10) / 2);
        if slot.ip_diff != 0 {
            *ip_csum = !fold16(fold32((!*ip_csum) as u64 + slot.ip_diff as u64));
        }
        let (sa, da) = (slot.src.to_ne_bytes(), slot.dst.to_ne_bytes());
        let a = f.add((14 + 12) / 2);
        *a = u16::from_ne_bytes([sa[0], sa[1]]);
        *a.add(1) = u16::from_ne_bytes([sa[2], sa[3]]);
        *a.add(2) = u16::from_ne_bytes([da[0], da[1]]);
        *a.add(3) = u16::from_ne_bytes([da[2], da[3]]);
        *f.add((14 + 20) / 2) = slot.sport;
        *f.add((14 + 22) / 2) = slot.dport;
        // The L4 checksum as `nat::l4_csum_first` computes it for a packet whose kind it
        // knows: a UDP datagram without one keeps it.
        let sum0 = *l4;
        if !(udp && sum0 == 0) {
            let mut sum = sum0;
            if s.flow_csum == CHECKSUM_PARTIAL {
                if slot.l4_addr != 0 {
                    sum = partial_by_diff(sum, slot.l4_addr, udp);
                }
            } else {
                if slot.l4_addr != 0 {
                    sum = full_by_diff(sum, slot.l4_addr, udp);
                }
                if slot.l4_port != 0 {
                    sum = full_by_diff(sum, slot.l4_port, udp);
                }
            }
            *l4 = sum;
        }
    }
    count(Stat::FlowCacheHit);
    count_raw(slot.stat as u32);
    if slot.ifindex == 0 {
        return TC_ACT_OK as i32;
    }
    count(Stat::Routed);
    count(Stat::RoutedToPod);
    // SAFETY: a helper on integers.
    unsafe { bpf_redirect_peer(slot.ifindex, 0) as i32 }
}
