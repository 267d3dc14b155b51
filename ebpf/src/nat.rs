//! Address and port rewrites. Bytes are written with `bpf_skb_store_bytes`, one call for the
//! addresses, the ports and the IPv4 header checksum together, never with direct packet
//! access: a TC program that writes packet data directly gets a prologue that un-clones every
//! skb it sees, and TCP transmits clones, so every packet on the device, service or not, would
//! pay a copy. The helper makes only the rewritten packets writable.
//!
//! Checksums are updated by difference, computed here: the IPv4 header's is written with the
//! addresses; for L4, one `bpf_l4_csum_replace` for the pseudo-header part (addresses) and one
//! for the rest (ports), which a CHECKSUM_PARTIAL packet (what veth hands over) must not see:
//! only the kernel knows which kind of checksum the packet carries.
use aya_ebpf::programs::TcContext;
use weir_common::{Addr, Stat, PROTO_UDP};

use crate::{
    maps::Scratch,
    parse::{ptr_at, Packet},
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

/// Running one's complement sums of (new - old).
struct Diffs {
    addr: u64,
    port: u64,
}

#[inline(always)]
fn fold32(mut s: u64) -> u32 {
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff_ffff) + (s >> 32);
    s as u32
}

#[inline(always)]
fn fold16(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// Rewrites the source and the destination of the packet as `s.chg_src` and `s.chg_dst` say;
/// `hop`: the program routes the packet, and decrements its TTL (hop limit) as a router does;
/// `eth`: it goes into a pod, with the Ethernet addresses `s.fib` holds (written in the same
/// store as the rest where the header allows).
#[inline(always)]
pub fn rewrite(ctx: &TcContext, s: &mut Scratch, hop: bool, eth: bool) -> Result<(), Stat> {
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

/// Adds one side's differences (new - old) to `d`.
#[inline(always)]
fn diff(p: &Packet, c: &Change, d: &mut Diffs) {
    if !c.on {
        return;
    }
    if p.v6 {
        let (o, n) = (c.old_addr.words(), c.new_addr.words());
        let mut i = 0;
        while i < 4 {
            d.addr += (!o[i]) as u64 + n[i] as u64;
            i += 1;
        }
    } else {
        d.addr += (!c.old_addr.words()[3]) as u64 + c.new_addr.words()[3] as u64;
    }
    if c.old_port != c.new_port {
        d.port += (!c.old_port) as u64 + c.new_port as u64;
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

/// A rewrite into a pod, IPv4 without options: from the Ethernet addresses to the ports, in
/// one store (built in the scratch space: the call chain's stack is short).
#[repr(C)]
pub struct V4Frame {
    macs: [u8; 12],
    head: Head,
    hdr: V4Header,
    ports: [u16; 2],
}

/// The same for IPv6: the hop limit is in `head`.
#[repr(C)]
pub struct V6Frame {
    macs: [u8; 12],
    head: Head,
    // Bytes, not `Addr`: its alignment would put padding before them.
    src: [u8; 16],
    dst: [u8; 16],
    ports: [u16; 2],
}

const _: () = {
    assert!(core::mem::size_of::<V4Frame>() == 38);
    assert!(core::mem::size_of::<V6Frame>() == 58);
};

/// Sets the Ethernet addresses of a frame being built: destination, then source.
#[inline(always)]
fn set_macs(macs: &mut [u8; 12], fib: &aya_ebpf::bindings::bpf_fib_lookup) {
    macs[..6].copy_from_slice(&fib.dmac);
    macs[6..].copy_from_slice(&fib.smac);
}

/// The same, then the ports, when no options lie between: one store writes a whole rewrite,
/// TTL and header checksum included.
#[repr(C)]
struct V4Span {
    hdr: V4Header,
    ports: [u16; 2],
}

/// The bytes of an IPv6 packet from the source address to the destination port.
#[repr(C)]
struct V6Span {
    src: Addr,
    dst: Addr,
    ports: [u16; 2],
}

#[inline(always)]
fn rewrite_inner(ctx: &TcContext, s: &mut Scratch, hop: bool, eth: bool) -> Result<(), Stat> {
    let (p, src, dst) = (&s.pkt, &s.chg_src, &s.chg_dst);
    let mut d = Diffs { addr: 0, port: 0 };
    diff(p, src, &mut d);
    diff(p, dst, &mut d);
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
    let failed = |_| Stat::DropRewriteFailed;
    if p.v6 && eth {
        let f = &mut s.eth6;
        set_macs(&mut f.macs, &s.fib);
        f.head = read_head(ctx).ok_or(Stat::DropRewriteFailed)?;
        if hop {
            // The hop limit: the IPv6 header's eighth byte, the head's tenth.
            let [flow, _] = f.head[4].to_ne_bytes();
            f.head[4] = u16::from_ne_bytes([flow, p.ttl - 1]);
        }
        f.src = sa.0;
        f.dst = da.0;
        f.ports = [sp, dp];
        ctx.store(0, &s.eth6, 0).map_err(failed)?;
    } else if p.v6 {
        let span = V6Span {
            src: sa,
            dst: da,
            ports: [sp, dp],
        };
        ctx.store(p.l3_off + 8, &span, 0).map_err(failed)?;
        if hop {
            ctx.store(p.l3_off + 7, &(p.ttl - 1), 0).map_err(failed)?;
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
        let hdr = V4Header {
            ttl,
            proto: p.proto,
            csum,
            src: sa.v4_octets(),
            dst: da.v4_octets(),
        };
        if eth && p.l4_off == p.l3_off + 20 {
            let f = &mut s.eth4;
            set_macs(&mut f.macs, &s.fib);
            f.head = read_head(ctx).ok_or(Stat::DropRewriteFailed)?;
            f.hdr = hdr;
            f.ports = [sp, dp];
            ctx.store(0, &s.eth4, 0).map_err(failed)?;
        } else if p.l4_off == p.l3_off + 20 {
            let span = V4Span {
                hdr,
                ports: [sp, dp],
            };
            ctx.store(p.l3_off + 8, &span, 0).map_err(failed)?;
        } else {
            if eth {
                set_macs(&mut s.eth4.macs, &s.fib);
                ctx.store(0, &s.eth4.macs, 0).map_err(failed)?;
            }
            ctx.store(p.l3_off + 8, &hdr, 0).map_err(failed)?;
            ctx.store(p.l4_off, &[sp, dp], 0).map_err(failed)?;
        }
    }
    let mangled = if p.proto == PROTO_UDP && !p.v6 {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    if d.addr != 0 {
        ctx.l4_csum_replace(
            p.csum_off,
            0,
            fold32(d.addr) as u64,
            BPF_F_PSEUDO_HDR | mangled,
        )
        .map_err(failed)?;
    }
    if d.port != 0 {
        let diff = fold16(fold32(d.port)) as u64;
        ctx.l4_csum_replace(p.csum_off, 0, diff, mangled)
            .map_err(failed)?;
    }
    Ok(())
}
