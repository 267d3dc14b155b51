//! Address and port rewrites. Bytes are written with `bpf_skb_store_bytes`, one call for the
//! addresses, the ports and the IPv4 header checksum together, never with direct packet
//! access: a TC program that writes packet data directly gets a prologue that calls
//! `bpf_skb_pull_data` on every cloned skb it sees (to make its header writable), and TCP
//! transmits clones, so every TCP data segment on the device, service or not, would pay that
//! helper call (a copy where the header is shared). The store makes only the rewritten
//! packets writable.
//!
//! Checksums are updated by difference, computed here: the IPv4 header's is written with the
//! addresses, and so is the L4 checksum, once the program knows how the packet carries it
//! (`skb->ip_summed`, read through the kfunc `bpf_cast_to_kern_ctx`): a full checksum takes
//! the addresses and the ports, a CHECKSUM_PARTIAL packet's field (what veth hands over: the
//! pseudo-header's sum, which the device completes) the addresses only. A CHECKSUM_COMPLETE
//! packet's `skb->csum` moves with the pseudo-header, which only `bpf_l4_csum_replace` does;
//! it is called for those, and where the kernel's layout is unknown (see `l4_csum_first`).
use core::ffi::c_void;

use aya_ebpf::{helpers::generated::bpf_skb_store_bytes, programs::TcContext};
use weir_common::{kernel_facts::CAST_TO_KERN_CTX_CALL, Addr, Stat, PROTO_TCP, PROTO_UDP};

use crate::{
    maps::Scratch,
    parse::{hdr_ptr, ptr_at, Packet},
};

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

/// One side of a rewrite: the old and new address and port; `on == false` leaves it alone.
/// Plain values (no references or Options): LLVM turns those into pointer arithmetic the
/// verifier refuses.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Change {
    pub old_addr: Addr,
    pub new_addr: Addr,
    pub old_port: u16,
    pub new_port: u16,
    pub on: bool,
}

impl Change {
    /// Rewrites `old_addr:old_port` to `new_addr:new_port`. In place: a `Change` built and
    /// then assigned goes through the stack (a copy per field, and a `memset` call for
    /// `none`).
    #[inline(always)]
    pub fn set(&mut self, old_addr: &Addr, new_addr: &Addr, old_port: u16, new_port: u16) {
        self.old_addr = *old_addr;
        self.new_addr = *new_addr;
        self.old_port = old_port;
        self.new_port = new_port;
        self.on = true;
    }

    /// No rewrite of an address that stays `addr` (which `new_addr` then holds).
    #[inline(always)]
    pub fn keep(&mut self, addr: &Addr) {
        self.new_addr = *addr;
        self.on = false;
    }

    /// No rewrite; nothing else is read.
    #[inline(always)]
    pub fn none(&mut self) {
        self.on = false;
    }
}

/// Where `ip_summed` is in the kernel's `struct sk_buff`: its bit offset + 1, 0 where unknown.
/// Set by the loader from the kernel's BTF (`weir_common::kernel_facts`). The object's
/// .rodata is read-only to programs and frozen, so the verifier knows this value: the offset
/// below is a constant to it, and the branch a value rules out is dead code it removes.
#[unsafe(no_mangle)]
static WEIR_IP_SUMMED: u32 = 0;

pub(crate) const CHECKSUM_COMPLETE: u8 = 2;
pub(crate) const CHECKSUM_PARTIAL: u8 = 3;

/// The packet's `skb->ip_summed` (CHECKSUM_NONE, _UNNECESSARY, _COMPLETE or _PARTIAL), read
/// from the kernel's `struct sk_buff`: `bpf_cast_to_kern_ctx` gives it (the verifier turns
/// the call into a register move), one byte load reads it. `None` where the loader did not
/// find where it is.
#[inline(always)]
pub(crate) fn ip_summed(ctx: &TcContext) -> Option<u8> {
    // SAFETY: a read of a global; volatile, so that LLVM does not fold the 0 it was built with.
    let at = unsafe { core::ptr::read_volatile(&WEIR_IP_SUMMED) };
    if at == 0 {
        return None;
    }
    let bit = at - 1;
    // SAFETY: the loader makes this call the kfunc `bpf_cast_to_kern_ctx` (which takes the
    // context and returns the sk_buff behind it) wherever it sets `WEIR_IP_SUMMED`; the
    // verifier checks the byte read against the kernel's BTF of `struct sk_buff`.
    let byte = unsafe {
        let cast: unsafe extern "C" fn(*mut c_void) -> *const u8 =
            core::mem::transmute(CAST_TO_KERN_CTX_CALL as usize);
        let skb = cast(ctx.skb.skb as *mut c_void);
        core::ptr::read_volatile(skb.add((bit >> 3) as usize))
    };
    Some((byte >> (bit & 7)) & 3)
}

/// Running one's complement sums of (new - old).
pub(crate) struct Diffs {
    pub addr: u64,
    pub port: u64,
}

#[inline(always)]
pub(crate) fn fold32(mut s: u64) -> u32 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s as u32
}

#[inline(always)]
pub(crate) fn fold16(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Rewrites the source and the destination of the packet as `s.chg_src` and `s.chg_dst` say;
/// `hop`: the program routes the packet, and decrements its TTL (hop limit) as a router does;
/// `eth`: it goes into a pod, with the Ethernet addresses `s.fib` holds (written in the same
/// store as the rest where the header allows). Inlined, for the established paths, whose
/// frames fit the verifier's stack limit with it: a call and a return less per packet.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, s: &mut Scratch, hop: bool, eth: bool) -> Result<(), Stat> {
    rewrite_inner(ctx, s, hop, eth)
}

/// The same, out of line, for the new-flow path, whose call chain is deeper.
#[inline(always)]
pub fn rewrite_call(ctx: &TcContext, s: &mut Scratch, hop: bool, eth: bool) -> Result<(), Stat> {
    let how = (hop as u32) | ((eth as u32) << 1);
    if rewrite_out_of_line(ctx, s, how) == 0 {
        Ok(())
    } else {
        Err(Stat::DropRewriteFailed)
    }
}

/// Out of line: one copy of the code instead of one per call site. Returns 0 or -1.
#[inline(never)]
fn rewrite_out_of_line(ctx: &TcContext, s: &mut Scratch, how: u32) -> i32 {
    match rewrite_inner(ctx, s, how & 1 != 0, how & 2 != 0) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

/// Adds an address change (new - old, one's complement, unfolded) to `d`: its last word for
/// IPv4.
#[inline(always)]
pub(crate) fn add_addr_diff(d: &mut u64, old: &Addr, new: &Addr, v6: bool) {
    let (o, n) = (old.words(), new.words());
    if v6 {
        let mut i = 0;
        while i < 4 {
            *d += (!o[i]) as u64 + n[i] as u64;
            i += 1;
        }
    } else {
        *d += (!o[3]) as u64 + n[3] as u64;
    }
}

/// A 16-bit field's change (new - old, one's complement, unfolded).
#[inline(always)]
pub(crate) fn diff16(old: u16, new: u16) -> u64 {
    (!old) as u64 + new as u64
}

/// Adds one side's differences (new - old) to `d`.
#[inline(always)]
pub(crate) fn diff(p: &Packet, c: &Change, d: &mut Diffs) {
    if !c.on {
        return;
    }
    add_addr_diff(&mut d.addr, &c.old_addr, &c.new_addr, p.v6);
    if c.old_port != c.new_port {
        d.port += diff16(c.old_port, c.new_port);
    }
}

/// The bytes of an IPv4 header from the TTL to the destination address.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct V4Header {
    ttl: u8,
    proto: u8,
    csum: u16,
    src: [u8; 4],
    dst: [u8; 4],
}

/// Where `V4Frame::head` and `V6Frame::head` start: the EtherType, then the IP header's first
/// 8 bytes (the IPv6 hop limit the last), written back as they are. Read from the packet by
/// the rewrite into a pod, the only one that needs them, not by the parser, which every
/// packet pays for.
const HEAD_OFF: usize = 12;

/// The 10 bytes at `HEAD_OFF`, as 16-bit words: read and written by words (as bytes, LLVM
/// copied part of them with a call to `memmove`).
type Head = [u16; 5];

/// Reads the bytes at `HEAD_OFF` by 16-bit words.
#[inline(always)]
fn read_head(ctx: &TcContext) -> Option<Head> {
    let p = ptr_at::<Head>(ctx, HEAD_OFF)?;
    // SAFETY: `ptr_at` checked the bounds. A plain (aligned) read, so that LLVM loads words
    // instead of bytes: packet data starts at an even offset of its buffer, and a BPF load
    // has no alignment fault (the verifier checks packet alignment only when asked to, on
    // architectures without efficient unaligned access).
    Some(unsafe { p.read() })
}

/// The L4 header from the ports to the checksum field (TCP: 18 bytes, UDP: 8), as it is to
/// be; the store writes the ports alone when the checksum is not part of it.
type L4Head = [u16; 9];

/// A rewrite into a pod, IPv4 without options: from the Ethernet addresses to the L4
/// checksum, in one store. Without the Ethernet addresses, the store starts at `hdr`. Built
/// in the scratch space: the verifier sums the stack frames of a call chain.
#[repr(C)]
pub struct V4Frame {
    macs: [u8; 12],
    head: Head,
    hdr: V4Header,
    l4: L4Head,
}

/// The same for IPv6: the hop limit is in `head`; without the Ethernet addresses, the store
/// starts at `src`.
#[repr(C)]
pub struct V6Frame {
    macs: [u8; 12],
    head: Head,
    // Bytes, not `Addr`: its alignment would put padding before them.
    src: [u8; 16],
    dst: [u8; 16],
    l4: L4Head,
}

const _: () = {
    assert!(core::mem::size_of::<V4Frame>() == 52);
    assert!(core::mem::size_of::<V6Frame>() == 72);
};

/// Where the store of a rewrite starts in a frame: its first field from `HEAD_OFF` + 10
/// (`hdr`, `src`) when the Ethernet addresses are kept.
const NO_ETH: usize = 12 + 10;

/// Sets the Ethernet addresses of a frame being built: destination, then source.
#[inline(always)]
fn set_macs(macs: &mut [u8; 12], fib: &aya_ebpf::bindings::bpf_fib_lookup) {
    macs[..6].copy_from_slice(&fib.dmac);
    macs[6..].copy_from_slice(&fib.smac);
}

/// `len` bytes of the scratch space at `from` into the packet at `off`.
#[inline(always)]
pub fn store(ctx: &TcContext, off: usize, from: *const u8, len: usize) -> Result<(), Stat> {
    // SAFETY: `from` points into the scratch slot with at least `len` bytes after it; the
    // verifier checks both against the map value and the packet.
    let rc = unsafe {
        bpf_skb_store_bytes(
            ctx.skb.skb as *mut _,
            off as u32,
            from as *const c_void,
            len as u32,
            0,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Stat::DropRewriteFailed)
    }
}

/// One's complement addition of two 32-bit partial sums (the kernel's `csum_add`).
#[inline(always)]
fn addc(a: u32, b: u32) -> u32 {
    let r = a.wrapping_add(b);
    r.wrapping_add((r < a) as u32)
}

/// A full checksum field `sum` updated by `diff`, as the kernel's `csum_replace_by_diff`
/// computes it, `mangled`: a UDP checksum that comes out 0 is written as 0xffff.
#[inline(always)]
pub(crate) fn full_by_diff(sum: u16, diff: u32, mangled: bool) -> u16 {
    mangle(!fold16(addc(diff, 0xffff_0000 | (!sum) as u32)), mangled)
}

/// The same for a CHECKSUM_PARTIAL packet, whose field holds the pseudo-header's sum.
#[inline(always)]
pub(crate) fn partial_by_diff(sum: u16, diff: u32, mangled: bool) -> u16 {
    mangle(fold16(addc(sum as u32, diff)), mangled)
}

/// A UDP checksum field of 0 means "none" (IPv4) or is refused (IPv6): a computed 0 is
/// written as 0xffff (`BPF_F_MARK_MANGLED_0`, as the kernel's `CSUM_MANGLED_0`).
#[inline(always)]
fn mangle(v: u16, mangled: bool) -> u16 {
    if mangled && v == 0 {
        0xffff
    } else {
        v
    }
}

/// The L4 checksum field to write with the rewrite's store.
///
/// Where the program knows the packet's `ip_summed`, and it is not CHECKSUM_COMPLETE, the
/// field is computed here with no helper call: a full checksum (CHECKSUM_NONE, _UNNECESSARY)
/// moves by the addresses and the ports, a CHECKSUM_PARTIAL packet's field (the
/// pseudo-header's sum, which the device completes) by the addresses only.
///
/// Otherwise the helper updates the pseudo-header part (here, before the store): it alone can
/// move a CHECKSUM_COMPLETE packet's `skb->csum` with it. The port part belongs in a full
/// checksum only, and what the helper wrote tells which the packet has: a full checksum
/// moves by -D, a partial sum by +D, two different values for any D != 0 (one's complement).
/// So the port part is added here and written in the store, instead of a second helper call.
///
/// `Ok(Some(sum))`: the field to store; `Ok(None)`: the field is right as it is, or,
/// `*port_call` set, the helper adds the port part after the store: no address change, D = 0,
/// or a field neither formula gives. `*addr_call`: if the field is not stored after all
/// (`fill_l4`), the helper must add the address part too.
#[inline(always)]
fn l4_csum_first(
    ctx: &TcContext,
    p: &Packet,
    d: &Diffs,
    flags: u64,
    port_call: &mut bool,
    addr_call: &mut bool,
) -> Result<Option<u16>, Stat> {
    let mangled = flags & BPF_F_MARK_MANGLED_0 != 0;
    let before = hdr_ptr::<u16>(ctx, p.csum_off).ok_or(Stat::DropRewriteFailed)?;
    // SAFETY: `ptr_at` checked the bounds.
    let sum0 = unsafe { before.read() };
    let addr = fold32(d.addr);
    if let Some(kind) = ip_summed(ctx) {
        if kind != CHECKSUM_COMPLETE {
            if mangled && sum0 == 0 {
                // A UDP datagram without a checksum, which the helper would leave too.
                return Ok(None);
            }
            *addr_call = d.addr != 0;
            if kind == CHECKSUM_PARTIAL {
                return Ok(if d.addr != 0 {
                    Some(partial_by_diff(sum0, addr, mangled))
                } else {
                    None
                });
            }
            let port = fold16(fold32(d.port)) as u32;
            let mut sum = sum0;
            if d.addr != 0 {
                sum = full_by_diff(sum, addr, mangled);
            }
            if d.port != 0 {
                sum = full_by_diff(sum, port, mangled);
            }
            return Ok(if sum != sum0 { Some(sum) } else { None });
        }
    }
    if d.addr != 0 {
        ctx.l4_csum_replace(p.csum_off, 0, addr as u64, BPF_F_PSEUDO_HDR | flags)
            .map_err(|_| Stat::DropRewriteFailed)?;
    }
    if d.port == 0 || (mangled && sum0 == 0) {
        // Nothing more, or a UDP datagram without a checksum, which the helper leaves too.
        return Ok(None);
    }
    let port = fold16(fold32(d.port)) as u32;
    let after = hdr_ptr::<u16>(ctx, p.csum_off).ok_or(Stat::DropRewriteFailed)?;
    // SAFETY: `ptr_at` checked the bounds (after the helper, which may move the data).
    let sum1 = unsafe { after.read() };
    let (full, partial) = (
        full_by_diff(sum0, addr, mangled),
        partial_by_diff(sum0, addr, mangled),
    );
    if d.addr == 0 || full == partial || (sum1 != full && sum1 != partial) {
        *port_call = true;
        Ok(None)
    } else if sum1 == full {
        Ok(Some(full_by_diff(sum1, port, mangled)))
    } else {
        Ok(None)
    }
}

/// Fills `l4` with the packet's ports as they are to be and, with `sum`, the header bytes up
/// to the checksum field and the field: how many bytes of it the store writes.
#[inline(always)]
fn fill_l4(
    ctx: &TcContext,
    p: &Packet,
    l4: &mut L4Head,
    ports: [u16; 2],
    sum: Option<u16>,
    port_call: &mut bool,
) -> usize {
    l4[0] = ports[0];
    l4[1] = ports[1];
    let Some(sum) = sum else {
        return 4;
    };
    if p.proto == PROTO_TCP {
        // Sequence and acknowledgement numbers, offset and flags, window: as they are.
        if let Some(mid) = hdr_ptr::<[u16; 6]>(ctx, p.l4_off + 4) {
            // SAFETY: `ptr_at` checked the bounds.
            let mid = unsafe { mid.read() };
            l4[2] = mid[0];
            l4[3] = mid[1];
            l4[4] = mid[2];
            l4[5] = mid[3];
            l4[6] = mid[4];
            l4[7] = mid[5];
            l4[8] = sum;
            return 18;
        }
    } else if let Some(len) = hdr_ptr::<u16>(ctx, p.l4_off + 4) {
        // SAFETY: `ptr_at` checked the bounds.
        l4[2] = unsafe { len.read() };
        l4[3] = sum;
        return 8;
    }
    // Not in the linear data (the parser read these bytes, so this does not happen): the
    // helper adds the port part after the store, to the field as it is.
    *port_call = true;
    4
}

#[inline(always)]
fn rewrite_inner(ctx: &TcContext, s: &mut Scratch, hop: bool, eth: bool) -> Result<(), Stat> {
    let (p, src, dst) = (&s.pkt, &s.chg_src, &s.chg_dst);
    let mut d = Diffs { addr: 0, port: 0 };
    diff(p, src, &mut d);
    diff(p, dst, &mut d);
    // UDP, both families: a checksum that comes out 0 is sent as 0xffff, as the kernel's NAT
    // does (an IPv6 receiver drops a 0, and an IPv4 one would read "no checksum").
    let flags = if p.proto == PROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    let (mut port_call, mut addr_call) = (false, false);
    let sum = l4_csum_first(ctx, p, &d, flags, &mut port_call, &mut addr_call)?;
    // The packet's addresses and ports as they are to be: written in one store (two for an
    // IPv4 header with options) instead of one per field; what does not change is written
    // back as it was.
    let (sa, sp) = if src.on {
        (src.new_addr, src.new_port)
    } else {
        (p.src, p.sport)
    };
    let (da, dp) = if dst.on {
        (dst.new_addr, dst.new_port)
    } else {
        (p.dst, p.dport)
    };
    if p.v6 {
        let f = &mut s.eth6;
        let l4 = fill_l4(ctx, p, &mut f.l4, [sp, dp], sum, &mut port_call);
        f.src = sa.0;
        f.dst = da.0;
        if eth {
            set_macs(&mut f.macs, &s.fib);
            f.head = read_head(ctx).ok_or(Stat::DropRewriteFailed)?;
            if hop {
                // The hop limit: the IPv6 header's eighth byte, the head's tenth.
                let [flow, _] = f.head[4].to_ne_bytes();
                f.head[4] = u16::from_ne_bytes([flow, p.ttl - 1]);
            }
            store(ctx, 0, f as *const V6Frame as *const u8, NO_ETH + 32 + l4)?;
        } else {
            store(ctx, p.l3_off + 8, f.src.as_ptr(), 32 + l4)?;
            if hop {
                ctx.store(p.l3_off + 7, &(p.ttl - 1), 0)
                    .map_err(|_| Stat::DropRewriteFailed)?;
            }
        }
    } else {
        // The header checksum by difference (RFC 1624: HC' = ~(~HC + ~m + m')), as
        // `bpf_l3_csum_replace` would compute it, without the call: the addresses, and the
        // TTL, which shares a 16-bit word with the protocol.
        let ttl = if hop { p.ttl - 1 } else { p.ttl };
        let mut ip = d.addr;
        if hop {
            ip += (!u16::from_ne_bytes([p.ttl, p.proto])) as u64
                + u16::from_ne_bytes([ttl, p.proto]) as u64;
        }
        let csum = if ip != 0 {
            !fold16(fold32((!p.ip_csum) as u64 + ip))
        } else {
            p.ip_csum
        };
        let f = &mut s.eth4;
        let l4 = fill_l4(ctx, p, &mut f.l4, [sp, dp], sum, &mut port_call);
        f.hdr = V4Header {
            ttl,
            proto: p.proto,
            csum,
            src: sa.v4_octets(),
            dst: da.v4_octets(),
        };
        if eth {
            set_macs(&mut f.macs, &s.fib);
        }
        if p.l4_off == p.l3_off + 20 {
            if eth {
                f.head = read_head(ctx).ok_or(Stat::DropRewriteFailed)?;
                store(ctx, 0, f as *const V4Frame as *const u8, NO_ETH + 12 + l4)?;
            } else {
                store(
                    ctx,
                    p.l3_off + 8,
                    &f.hdr as *const V4Header as *const u8,
                    12 + l4,
                )?;
            }
        } else {
            // Options between the header and the ports: the Ethernet addresses, the header
            // from the TTL, and the L4 header, each in its own store.
            if eth {
                store(ctx, 0, f.macs.as_ptr(), 12)?;
            }
            store(
                ctx,
                p.l3_off + 8,
                &f.hdr as *const V4Header as *const u8,
                12,
            )?;
            store(ctx, p.l4_off, f.l4.as_ptr() as *const u8, l4)?;
        }
    }
    if port_call {
        if addr_call {
            ctx.l4_csum_replace(
                p.csum_off,
                0,
                fold32(d.addr) as u64,
                BPF_F_PSEUDO_HDR | flags,
            )
            .map_err(|_| Stat::DropRewriteFailed)?;
        }
        let diff = fold16(fold32(d.port)) as u64;
        ctx.l4_csum_replace(p.csum_off, 0, diff, flags)
            .map_err(|_| Stat::DropRewriteFailed)?;
    }
    Ok(())
}
