//! weir's eBPF programs: one entry point per attach point, each a one-liner over the shared
//! logic. No entry point can panic; errors become documented verdicts inside the logic.
#![no_std]
#![no_main]

mod bound;
mod ct;
mod flow;
mod icmp;
mod lb;
mod maps;
mod nat;
mod parse;
mod reject;
mod route;
mod sock;
mod tc;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use sock::Family;

/// Ingress of a pod's host-side veth: traffic from the pod, and replies of local backends.
#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    tc::handle(&ctx, false)
}

/// Egress of a pod's host-side veth: replies to the pod from a service endpoint on the node
/// itself (its own DNS server, a hostNetwork endpoint), which no ingress of ours sees.
#[classifier]
pub fn tc_to_pod(ctx: TcContext) -> i32 {
    tc::to_pod(&ctx)
}

/// Ingress of a node uplink: traffic from other nodes and outside the cluster.
#[classifier]
pub fn tc_from_netdev(ctx: TcContext) -> i32 {
    tc::handle(&ctx, true)
}

/// Egress of a node uplink: replies of flows an uplink's ingress translated to an endpoint on
/// the node that no program of ours sees the replies of (a pod whose veth carries none, the
/// node itself).
#[classifier]
pub fn tc_to_netdev(ctx: TcContext) -> i32 {
    tc::to_netdev(&ctx)
}

/// The flow cache's writer (see `flow`): reached by tail call from the four above, for a
/// packet of a flow the cache holds. Never attached.
#[classifier]
pub fn tc_flow_write(ctx: TcContext) -> i32 {
    flow::write(&ctx)
}

/// Returns at once. Never attached: B8 times it for what BPF_PROG_TEST_RUN itself costs per
/// run (the kernel's loop around the program), beside the real programs.
#[classifier]
pub fn tc_noop(_ctx: TcContext) -> i32 {
    0 // TC_ACT_OK
}

/// B8's lower bound of today's primitives (see `bound`). Never attached.
#[classifier]
pub fn tc_bound_ct_store(ctx: TcContext) -> i32 {
    bound::ct_store_peer(&ctx)
}

/// B8's lower bound of a per-CPU flow cache with direct writes (see `bound`). Never attached.
#[classifier]
pub fn tc_bound_percpu_direct(ctx: TcContext) -> i32 {
    bound::percpu_direct_peer(&ctx)
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Family::V4, false)
}

#[cgroup_sock_addr(connect6)]
pub fn sock_connect6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Family::V6, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Family::V4, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock::forward(&ctx, Family::V6, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V6)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V4)
}

#[cgroup_sock_addr(getpeername6)]
pub fn sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock::reverse(&ctx, Family::V6)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
