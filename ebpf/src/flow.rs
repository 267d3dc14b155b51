//! The flow cache: an established flow's rewrite, kept per CPU, so that the flow's next
//! packets are translated with no conntrack lookup and written with no helper call.
//!
//! Why: the conntrack lookup (an LRU hash: a call into the kernel's hash table, and its
//! returns, each through the return thunk of SRSO-mitigated CPUs) and `bpf_skb_store_bytes`
//! are most of what an established packet costs, where a per-CPU array lookup (the verifier
//! inlines it: no call) and direct packet writes cost little (the per-packet benchmark's
//! `bound` rows measure both; `benches/RESULTS.md`).
//!
//! - `fill`: the conntrack path, having translated an established packet, leaves the slot of
//!   its tuple with what it did: the new addresses and ports, the checksum differences, the
//!   route into a pod (device and Ethernet addresses) or none (the kernel forwards). A packet
//!   the program routes any other way (through the neighbour table) leaves no slot.
//! - `lookup`: before conntrack, a packet whose tuple holds a live slot is handed to
//!   `tc_flow_write` by tail call. That program writes the packet directly; a program that
//!   does gets a prologue from the kernel that makes every cloned skb's header writable (a
//!   `bpf_skb_pull_data` call), so the write is a program of its own: the packets it does not
//!   rewrite never pay for it.
//!
//! A slot is used only while it is younger than `FLOW_SLOT_LIFETIME_NS` and its entry's
//! expiry, and while the generations it was filled under hold (see `FLOW_GEN_GLOBAL`):
//! any conntrack write of a tuple of that slot index, by a program or by user space, ends it.
//! Packets that change a flow's state (TCP SYN, FIN, RST), IPv4 with options, IPv6 with
//! extension headers and CHECKSUM_COMPLETE packets always take conntrack. IPv4 and IPv6 flows
//! have a map each (`FLOWS`, `FLOWS6`), as conntrack does.
use aya_ebpf::{
    bindings::TC_ACT_OK,
    helpers::generated::{bpf_get_smp_processor_id, bpf_redirect_peer},
    maps::{Array, PerCpuArray, ProgramArray},
    programs::TcContext,
};
use weir_common::{map, *};

use crate::{
    ct::set_fwd_key,
    lb::now_ns,
    maps::{count, count_raw, Scratch, SCRATCH},
    nat::{
        fold16, fold32, full_by_diff, ip_summed, partial_by_diff, Diffs, CHECKSUM_COMPLETE,
        CHECKSUM_PARTIAL,
    },
    parse::{ptr_at, TCP_FIN, TCP_RST, TCP_SYN},
};

/// Where the flow was translated: the first pad byte of a slot's key. The same tuple is
/// translated differently at an ingress (`handle`: routed) and on the way out (`reply_out`).
pub const AT_INGRESS: u8 = 0;
pub const AT_EGRESS: u8 = 1;

/// A flow's rewrite but its addresses, the same for both families.
#[repr(C)]
pub struct Rewrite {
    /// The generations it was filled under (slot index's + global).
    pub gen: u64,
    /// Used until then (the coarse clock, `now_ns`).
    pub until_ns: u64,
    /// The pod's veth the packet is handed into, its Ethernet addresses in `macs`; 0: the
    /// packet goes on as it is (the kernel forwards it).
    pub ifindex: u32,
    /// The ports as they are to be, as they lie in the packet.
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

/// An IPv4 flow's slot: the packet's tuple (with `AT_*` in its first pad byte), the rewrite,
/// the addresses as they are to be (as they lie in the packet).
#[repr(C)]
pub struct Slot {
    pub key: Ct4Key,
    pub rw: Rewrite,
    pub src: u32,
    pub dst: u32,
}

/// An IPv6 flow's slot.
#[repr(C)]
pub struct Slot6 {
    pub key: CtKey,
    pub rw: Rewrite,
    pub src: Addr,
    pub dst: Addr,
}

map! {
    FLOWS,
    /// The cache, per CPU (a flow's packets mostly stay on one). Not pinned: a new run starts
    /// empty.
    pub static FLOWS: PerCpuArray<Slot> = PerCpuArray::with_max_entries(FLOW_SLOTS, 0);
}

map! {
    FLOWS6,
    pub static FLOWS6: PerCpuArray<Slot6> = PerCpuArray::with_max_entries(FLOW_SLOTS, 0);
}

map! {
    FLOW_GEN,
    /// The generations (see `FLOW_GEN_GLOBAL`), of both families' slot indices. Pinned, so that
    /// user space moves the global one.
    pub static FLOW_GEN: Array<u64> = Array::pinned(FLOW_SLOTS + 1, 0);
}

map! {
    FLOW_WRITE,
    /// `tc_flow_write`, at index 0 (the loader puts it there).
    pub static FLOW_WRITE: ProgramArray = ProgramArray::with_max_entries(1, 0);
}

/// The generation a slot of index `idx` is filled under, now.
#[inline(always)]
fn generation(idx: u32) -> u64 {
    let own = FLOW_GEN.get(idx).copied().unwrap_or(0);
    own.wrapping_add(FLOW_GEN.get(FLOW_GEN_GLOBAL).copied().unwrap_or(0))
}

/// Ends the slots of slot index `idx`, on every CPU: called after each conntrack write of a
/// tuple of it (`invalidate`, `invalidate6`).
///
/// Not an atomic add (Rust has none for the BPF target): two CPUs moving it at once may both
/// write. Each adds 1 and its own number times 2^32, so their values differ from each other
/// and from any the other read: whichever write comes last, a slot filled under a value read
/// before it no longer matches.
#[inline(always)]
fn end(idx: u32) {
    if let Some(g) = FLOW_GEN.get_ptr_mut(idx) {
        // SAFETY: a helper without arguments; a map value, read and written whole.
        unsafe {
            let cpu = bpf_get_smp_processor_id() as u64;
            let v = core::ptr::read_volatile(g);
            core::ptr::write_volatile(g, v.wrapping_add(1 + (cpu << 32)));
        }
    }
}

/// Ends the slots of an IPv4 tuple.
#[inline(always)]
pub fn invalidate(k: &Ct4Key) {
    end(flow_slot(k));
}

/// Ends the slots of an IPv6 tuple.
#[inline(always)]
pub fn invalidate6(k: &CtKey) {
    end(flow_slot6(k));
}

/// Where an IPv4 and an IPv6 packet's L4 header starts when the cache takes it: right after
/// an IPv4 header without options, an IPv6 header without extension headers.
const L4_4: usize = 14 + 20;
const L4_6: usize = 14 + 40;

/// Whether the packet may be translated from the cache at all: no IPv4 options or IPv6
/// extension headers, no SYN, FIN or RST.
#[inline(always)]
fn cacheable(s: &Scratch) -> bool {
    let p = &s.pkt;
    p.l3_off == 14
        && p.l4_off == if p.v6 { L4_6 } else { L4_4 }
        && (p.proto != PROTO_TCP || p.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0)
}

/// The rewrite of the IPv4 packet's slot (its tuple in `s.fwd_key4`) if it holds the flow;
/// sets the index and reads its generation.
#[inline(always)]
fn find4(s: &mut Scratch, at: u8) -> Option<&'static Rewrite> {
    let idx = flow_slot(&s.fwd_key4);
    s.flow_idx = idx;
    s.flow_gen = generation(idx);
    // SAFETY: a per-CPU slot, ours for this run.
    let slot = unsafe { &*FLOWS.get_ptr(idx)? };
    let (a, b) = (&slot.key, &s.fwd_key4);
    let same = a.src == b.src
        && a.dst == b.dst
        && a.sport == b.sport
        && a.dport == b.dport
        && a.proto == b.proto
        && a._pad[0] == at;
    same.then_some(&slot.rw)
}

/// The same for an IPv6 packet.
#[inline(always)]
fn find6(s: &mut Scratch, at: u8) -> Option<&'static Rewrite> {
    let idx = flow_slot6(&s.fwd_key);
    s.flow_idx = idx;
    s.flow_gen = generation(idx);
    // SAFETY: a per-CPU slot, ours for this run.
    let slot = unsafe { &*FLOWS6.get_ptr(idx)? };
    let (a, b) = (&slot.key, &s.fwd_key);
    let same = a.src.words() == b.src.words()
        && a.dst.words() == b.dst.words()
        && a.sport == b.sport
        && a.dport == b.dport
        && a.proto == b.proto
        && a._pad[0] == at;
    same.then_some(&slot.rw)
}

/// Sets the packet's tuple (`set_fwd_key`: the key the conntrack path then looks up with, for
/// every packet) and slot index, and reads the generation its slot would be filled under
/// (`s.flow_gen`), before conntrack is looked at: a change made after that read moves the
/// generation past it. Then, if the slot holds the flow, hands the packet to
/// `tc_flow_write`, which does not return here. Returns when the packet is not for the cache
/// (or the tail call failed): the conntrack path goes on.
#[inline(always)]
pub fn lookup(ctx: &TcContext, s: &mut Scratch, at: u8) {
    set_fwd_key(s);
    s.flow_idx = FLOW_SLOTS;
    if !cacheable(s) {
        return;
    }
    let v6 = s.pkt.v6;
    let found = if v6 { find6(s, at) } else { find4(s, at) };
    let Some(rw) = found else {
        return;
    };
    if rw.gen != s.flow_gen || rw.until_ns <= now_ns() || (rw.ifindex != 0 && s.pkt.ttl <= 1) {
        return;
    }
    // The packet must hold its L4 checksum in its linear data, which the writer cannot fall
    // back from; and its checksum kind must be one the writer computes.
    let l4 = if v6 { L4_6 } else { L4_4 };
    if ptr_at::<u16>(ctx, l4 + if s.pkt.proto == PROTO_TCP { 16 } else { 6 }).is_none() {
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
    let (p, src, dst) = (&s.pkt, &s.chg_src, &s.chg_dst);
    let (sa, da) = (
        if src.on { &src.new_addr } else { &p.src },
        if dst.on { &dst.new_addr } else { &p.dst },
    );
    let rw = if p.v6 {
        // SAFETY: a per-CPU slot, ours for this run.
        let Some(slot) = FLOWS6.get_ptr_mut(s.flow_idx).map(|x| unsafe { &mut *x }) else {
            return;
        };
        slot.key = s.fwd_key;
        slot.key._pad[0] = at;
        slot.src = *sa;
        slot.dst = *da;
        &mut slot.rw
    } else {
        // SAFETY: a per-CPU slot, ours for this run.
        let Some(slot) = FLOWS.get_ptr_mut(s.flow_idx).map(|x| unsafe { &mut *x }) else {
            return;
        };
        // The scratch keys' pad bytes are 0 (see `ct::set_key`).
        slot.key = s.fwd_key4;
        slot.key._pad[0] = at;
        slot.src = sa.words()[3];
        slot.dst = da.words()[3];
        &mut slot.rw
    };
    let mut d = Diffs { addr: 0, port: 0 };
    crate::nat::diff(p, src, &mut d);
    crate::nat::diff(p, dst, &mut d);
    rw.gen = s.flow_gen;
    let until = now_ns() + FLOW_SLOT_LIFETIME_NS;
    rw.until_ns = if expires_ns < until {
        expires_ns
    } else {
        until
    };
    rw.ifindex = ifindex;
    rw.sport = if src.on { src.new_port } else { p.sport };
    rw.dport = if dst.on { dst.new_port } else { p.dport };
    let (dm, sm) = (&s.fib.dmac, &s.fib.smac);
    for i in 0..3 {
        rw.macs[i] = u16::from_ne_bytes([dm[2 * i], dm[2 * i + 1]]);
        rw.macs[3 + i] = u16::from_ne_bytes([sm[2 * i], sm[2 * i + 1]]);
    }
    // A hop: the TTL, the first byte of its 16-bit word with the protocol as it lies in
    // memory, goes down by one, which adds the complement of that word's 1 to the IPv4
    // header's sum, as `nat::rewrite_inner` computes it.
    let hop = if ifindex != 0 {
        (!u16::from_ne_bytes([1, 0])) as u64
    } else {
        0
    };
    rw.ip_diff = fold32(d.addr + hop);
    rw.l4_addr = fold32(d.addr);
    rw.l4_port = fold16(fold32(d.port)) as u32;
    rw.stat = stat as u8;
}

/// Writes `words` into the packet from `f` on.
///
/// # Safety
/// `f` points at packet data with room for the words, checked by `ptr_at`.
#[inline(always)]
unsafe fn put(f: *mut u16, words: &[u16]) {
    for (i, w) in words.iter().enumerate() {
        // SAFETY: the caller's bounds.
        unsafe { *f.add(i) = *w };
    }
}

/// A routed packet's Ethernet addresses and TTL (hop limit, at `ttl_off`), for a rewrite
/// into a pod.
///
/// # Safety
/// `f` points at the packet's start, with room past `ttl_off`, checked by `ptr_at`.
#[inline(always)]
unsafe fn head(f: *mut u16, rw: &Rewrite, ttl_off: usize) {
    if rw.ifindex != 0 {
        // SAFETY: the caller's bounds.
        unsafe {
            put(f, &rw.macs);
            *(f as *mut u8).add(ttl_off) -= 1;
        }
    }
}

/// An address's bytes as 16-bit words.
#[inline(always)]
fn halves(a: &Addr) -> [u16; 8] {
    let b = &a.0;
    let mut w = [0u16; 8];
    for (i, w) in w.iter_mut().enumerate() {
        *w = u16::from_ne_bytes([b[2 * i], b[2 * i + 1]]);
    }
    w
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
    let v6 = s.pkt.v6;
    let udp = s.pkt.proto == PROTO_UDP;
    let csum_off = if v6 { L4_6 } else { L4_4 } + if udp { 6 } else { 16 };
    let Some(l4) = ptr_at::<u16>(ctx, csum_off) else {
        count(Stat::DropRewriteFailed);
        return TC_ACT_SHOT;
    };
    let l4 = l4 as *mut u16;
    // The slot's rewrite, written through the packet pointer from the Ethernet header to the
    // ports (`ptr_at` checks their bounds, and the checksum field's above; this program may
    // write packet data). Words at even offsets (see `parse::half`).
    let rw = if v6 {
        // SAFETY: a per-CPU slot, ours for this run.
        let Some(slot) = FLOWS6.get_ptr(s.flow_idx).map(|x| unsafe { &*x }) else {
            return TC_ACT_SHOT;
        };
        let Some(f) = ptr_at::<[u16; (L4_6 + 4) / 2]>(ctx, 0) else {
            count(Stat::DropRewriteFailed);
            return TC_ACT_SHOT;
        };
        let f = f as *mut u16;
        // SAFETY: above.
        unsafe {
            head(f, &slot.rw, 14 + 7);
            put(f.add((14 + 8) / 2), &halves(&slot.src));
            put(f.add((14 + 24) / 2), &halves(&slot.dst));
            put(f.add(L4_6 / 2), &[slot.rw.sport, slot.rw.dport]);
        }
        &slot.rw
    } else {
        // SAFETY: a per-CPU slot, ours for this run.
        let Some(slot) = FLOWS.get_ptr(s.flow_idx).map(|x| unsafe { &*x }) else {
            return TC_ACT_SHOT;
        };
        let Some(f) = ptr_at::<[u16; (L4_4 + 4) / 2]>(ctx, 0) else {
            count(Stat::DropRewriteFailed);
            return TC_ACT_SHOT;
        };
        let f = f as *mut u16;
        let (sa, da) = (slot.src.to_ne_bytes(), slot.dst.to_ne_bytes());
        // SAFETY: above.
        unsafe {
            head(f, &slot.rw, 14 + 8);
            let ip_csum = f.add((14 + 10) / 2);
            if slot.rw.ip_diff != 0 {
                *ip_csum = !fold16(fold32((!*ip_csum) as u64 + slot.rw.ip_diff as u64));
            }
            put(
                f.add((14 + 12) / 2),
                &[
                    u16::from_ne_bytes([sa[0], sa[1]]),
                    u16::from_ne_bytes([sa[2], sa[3]]),
                    u16::from_ne_bytes([da[0], da[1]]),
                    u16::from_ne_bytes([da[2], da[3]]),
                    slot.rw.sport,
                    slot.rw.dport,
                ],
            );
        }
        &slot.rw
    };
    // UDP, as `nat` has it: a checksum that comes out 0 is written 0xffff, and a datagram
    // without one (IPv4) keeps it.
    let mangled = udp;
    // SAFETY: `ptr_at` checked the field's bounds.
    unsafe {
        // The L4 checksum as `nat::l4_csum_first` computes it for a packet whose kind it
        // knows: an IPv4 UDP datagram without one keeps it.
        let sum0 = *l4;
        if !(mangled && sum0 == 0) {
            let mut sum = sum0;
            if s.flow_csum == CHECKSUM_PARTIAL {
                if rw.l4_addr != 0 {
                    sum = partial_by_diff(sum, rw.l4_addr, mangled);
                }
            } else {
                if rw.l4_addr != 0 {
                    sum = full_by_diff(sum, rw.l4_addr, mangled);
                }
                if rw.l4_port != 0 {
                    sum = full_by_diff(sum, rw.l4_port, mangled);
                }
            }
            *l4 = sum;
        }
    }
    count(Stat::FlowCacheHit);
    count_raw(rw.stat as u32);
    if rw.ifindex == 0 {
        return TC_ACT_OK as i32;
    }
    count(Stat::Routed);
    count(Stat::RoutedToPod);
    // SAFETY: a helper on integers.
    unsafe { bpf_redirect_peer(rw.ifindex, 0) as i32 }
}
