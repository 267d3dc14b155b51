//! Lower bounds for the per-packet benchmark, never attached: what the kernel's part of an
//! established packet into a pod costs with no logic of ours around it, so that the benchmark can
//! say how much of a figure is ours. Both take an IPv4 TCP frame without options at fixed offsets,
//! look its tuple up, write the packet's first 52 bytes back unchanged (what the rewrite into a pod
//! writes: Ethernet addresses to the TCP checksum) and redirect into the device whose index
//! `skb->mark` holds, as an established flow's packet into a pod does.
use aya_ebpf::{bindings::TC_ACT_OK, helpers::generated::bpf_redirect_peer, programs::TcContext};

use weir_ebpf::{
    maps::{CT4, SCRATCH},
    nat::store,
    parse::{byte, half, ptr_at, word},
};

/// Bytes the rewrite of an IPv4 packet into a pod stores (`nat::V4Frame`).
const FRAME: usize = 52;

/// The tuple at its fixed offsets into the scratch key; `None` when the frame is short.
#[inline(always)]
fn key(ctx: &TcContext) -> Option<(*const [u8; FRAME], &'static mut weir_ebpf::maps::Scratch)> {
    let f = ptr_at::<[u8; FRAME]>(ctx, 0)?;
    // SAFETY: the per-CPU scratch slot is ours for this run.
    let s = unsafe { &mut *SCRATCH.get_ptr_mut(0)? };
    let k = &mut s.fwd_key4;
    k.src = word(f, 26);
    k.dst = word(f, 30);
    k.sport = half(f, 34);
    k.dport = half(f, 36);
    k.proto = byte(f, 23);
    Some((f, s))
}

/// The redirect into the pod: the target's index from `skb->mark`.
#[inline(always)]
fn into_pod(ctx: &TcContext) -> i32 {
    // SAFETY: reading a field of our own context; a helper on integers.
    unsafe { bpf_redirect_peer((*ctx.skb.skb).mark, 0) as i32 }
}

/// Today's primitives: the conntrack lookup (`CT4`, an LRU hash), one
/// `bpf_skb_store_bytes`, `bpf_redirect_peer`.
#[inline(always)]
pub fn ct_store_peer(ctx: &TcContext) -> i32 {
    let Some((f, s)) = key(ctx) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: the key is a scratch field.
    if unsafe { CT4.get(&s.fwd_key4) }.is_none() {
        return TC_ACT_OK as i32;
    }
    // The bytes to store, built in the scratch slot as the rewrite builds its frame.
    let buf = s.icmp.as_mut_ptr() as *mut u16;
    // SAFETY: `ptr_at` checked the frame's bounds; the scratch field holds 112 bytes.
    unsafe {
        for i in 0..FRAME / 2 {
            core::ptr::write_volatile(
                buf.add(i),
                core::ptr::read_volatile((f as *const u16).add(i)),
            );
        }
    }
    if store(ctx, 0, s.icmp.as_ptr(), FRAME).is_err() {
        return TC_ACT_OK as i32;
    }
    into_pod(ctx)
}

/// What a per-CPU flow cache with direct packet writes could reach at best: a per-CPU array
/// lookup (inlined by the verifier: no call), a compare of the tuple, the bytes written
/// through the packet pointer (the program gets the kernel's unclone prologue), the redirect.
#[inline(always)]
pub fn percpu_direct_peer(ctx: &TcContext) -> i32 {
    let Some((f, s)) = key(ctx) else {
        return TC_ACT_OK as i32;
    };
    if s.reply_key4.src != s.fwd_key4.src
        || s.reply_key4.dst != s.fwd_key4.dst
        || s.reply_key4.sport != s.fwd_key4.sport
    {
        s.reply_key4.src = s.fwd_key4.src;
        s.reply_key4.dst = s.fwd_key4.dst;
        s.reply_key4.sport = s.fwd_key4.sport;
    }
    // SAFETY: `ptr_at` checked the frame's bounds; the bytes written are those read.
    unsafe {
        let p = f as *mut u16;
        for i in 0..FRAME / 2 {
            core::ptr::write_volatile(p.add(i), core::ptr::read_volatile(p.add(i)));
        }
    }
    into_pod(ctx)
}
