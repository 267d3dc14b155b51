//! Address and port rewrites. Addresses and ports are written with direct packet access and the
//! IPv4 header checksum is updated in the program (RFC 1624); the L4 checksum goes through
//! `bpf_l4_csum_replace` with a precomputed difference, because only the kernel knows whether
//! the packet's checksum is complete or CHECKSUM_PARTIAL (what veth hands over), and the two
//! need different updates. Two helper calls per packet at most: the pseudo-header part
//! (addresses) and the rest (ports), which a CHECKSUM_PARTIAL packet must not see.
use aya_ebpf::programs::TcContext;
use weir_common::{Addr, Stat, PROTO_UDP};

use crate::parse::Packet;

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
    #[inline(always)]
    pub fn new(old_addr: &Addr, new_addr: &Addr, old_port: u16, new_port: u16) -> Self {
        Change {
            old_addr: *old_addr,
            new_addr: *new_addr,
            old_port,
            new_port,
            on: true,
        }
    }

    #[inline(always)]
    pub fn none() -> Self {
        Change {
            old_addr: Addr([0; 16]),
            new_addr: Addr([0; 16]),
            old_port: 0,
            new_port: 0,
            on: false,
        }
    }
}

/// Running one's complement sums of (new - old).
struct Diffs {
    addr: u64,
    port: u64,
    ip: u32,
}

#[inline(always)]
fn ptr_mut<T>(ctx: &TcContext, off: usize) -> Option<*mut T> {
    // SAFETY: reading two fields of our own context; volatile so LLVM keeps them two loads.
    let (start, end) = unsafe {
        (
            core::ptr::read_volatile(&(*ctx.skb.skb).data) as usize,
            core::ptr::read_volatile(&(*ctx.skb.skb).data_end) as usize,
        )
    };
    // Offsets come from the scratch map: bound them, or the verifier refuses the pointer math.
    if off > 256 || start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
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

#[inline(always)]
fn word(a: &Addr, i: usize) -> u32 {
    u32::from_ne_bytes([a.0[i], a.0[i + 1], a.0[i + 2], a.0[i + 3]])
}

/// Rewrites the source and the destination of the packet as the two changes say.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, p: &Packet, src: &Change, dst: &Change) -> Result<(), Stat> {
    if rewrite_out_of_line(ctx, p, src, dst) == 0 {
        Ok(())
    } else {
        Err(Stat::DropRewriteFailed)
    }
}

/// Out of line: one copy of the code instead of one per call site. Returns 0 or -1.
#[inline(never)]
fn rewrite_out_of_line(ctx: &TcContext, p: &Packet, src: &Change, dst: &Change) -> i32 {
    match rewrite_inner(ctx, p, src, dst) {
        Ok(()) => 0,
        Err(_) => -1,
    }
}

#[inline(always)]
fn side(ctx: &TcContext, p: &Packet, c: &Change, is_dst: bool, d: &mut Diffs) -> Result<(), Stat> {
    if !c.on {
        return Ok(());
    }
    if p.v6 {
        let off = p.l3_off + if is_dst { 24 } else { 8 };
        let ptr = ptr_mut::<[u8; 16]>(ctx, off).ok_or(Stat::DropRewriteFailed)?;
        // SAFETY: bounds checked by ptr_mut.
        unsafe { *ptr = c.new_addr.0 };
        let mut i = 0;
        while i < 16 {
            d.addr += (!word(&c.old_addr, i)) as u64 + word(&c.new_addr, i) as u64;
            i += 4;
        }
    } else {
        let off = p.l3_off + if is_dst { 16 } else { 12 };
        let ptr = ptr_mut::<[u8; 4]>(ctx, off).ok_or(Stat::DropRewriteFailed)?;
        let (o, n) = (word(&c.old_addr, 12), word(&c.new_addr, 12));
        // SAFETY: bounds checked by ptr_mut.
        unsafe { *ptr = n.to_ne_bytes() };
        d.addr += (!o) as u64 + n as u64;
        d.ip += (!(o as u16)) as u32
            + (!((o >> 16) as u16)) as u32
            + (n as u16) as u32
            + ((n >> 16) as u16) as u32;
    }
    if c.old_port != c.new_port {
        let off = p.l4_off + if is_dst { 2 } else { 0 };
        let ptr = ptr_mut::<u16>(ctx, off).ok_or(Stat::DropRewriteFailed)?;
        // SAFETY: bounds checked by ptr_mut.
        unsafe { ptr.write_unaligned(c.new_port) };
        d.port += (!c.old_port) as u64 + c.new_port as u64;
    }
    Ok(())
}

#[inline(always)]
fn rewrite_inner(ctx: &TcContext, p: &Packet, src: &Change, dst: &Change) -> Result<(), Stat> {
    let mut d = Diffs {
        addr: 0,
        port: 0,
        ip: 0,
    };
    side(ctx, p, src, false, &mut d)?;
    side(ctx, p, dst, true, &mut d)?;
    if !p.v6 {
        let ptr = ptr_mut::<u16>(ctx, p.l3_off + 10).ok_or(Stat::DropRewriteFailed)?;
        // SAFETY: bounds checked by ptr_mut.
        unsafe {
            let old = ptr.read_unaligned();
            ptr.write_unaligned(!fold16((!old) as u32 + fold16(d.ip) as u32));
        }
    }
    // Packet pointers are dead from here on: the helpers may move the data.
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
        .map_err(|_| Stat::DropRewriteFailed)?;
    }
    if d.port != 0 {
        let diff = fold16(fold32(d.port)) as u64;
        ctx.l4_csum_replace(p.csum_off, 0, diff, mangled)
            .map_err(|_| Stat::DropRewriteFailed)?;
    }
    Ok(())
}
