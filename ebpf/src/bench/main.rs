//! Benchmark-only programs, in an object of their own that the agent never loads: the
//! per-packet benchmark loads it beside the agent's object, sharing its pinned maps.
#![no_std]
#![no_main]

mod bound;

use aya_ebpf::{macros::classifier, programs::TcContext};

/// Returns at once: what BPF_PROG_TEST_RUN itself costs per run (the kernel's loop around the
/// program), timed beside the real programs.
#[classifier]
pub fn tc_noop(_ctx: TcContext) -> i32 {
    0 // TC_ACT_OK
}

/// The lower bound of the conntrack path's primitives (see `bound`).
#[classifier]
pub fn tc_bound_ct_store(ctx: TcContext) -> i32 {
    bound::ct_store_peer(&ctx)
}

/// The lower bound of a per-CPU flow cache with direct writes (see `bound`).
#[classifier]
pub fn tc_bound_percpu_direct(ctx: TcContext) -> i32 {
    bound::percpu_direct_peer(&ctx)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
