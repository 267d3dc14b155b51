//! `tc_flow_write`, never attached: reached by tail call from the four TC programs for a packet
//! of a flow the flow cache holds, it writes the cached rewrite into the packet (see `flow`).
//! A program of its own because a program that writes packet data directly gets the kernel's
//! unclone prologue: the packets it does not take never pay for it.
use aya_ebpf::{macros::classifier, programs::TcContext};
use weir_ebpf::flow;

#[classifier]
pub fn tc_flow_write(ctx: TcContext) -> i32 {
    flow::write(&ctx)
}
