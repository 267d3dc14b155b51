//! `tc_from_pod`, on a pod veth's ingress (its host side): service traffic from the pod, and
//! replies of endpoints in the pod.
use aya_ebpf::{macros::classifier, programs::TcContext};
use weir_ebpf::service;

#[classifier]
pub fn tc_from_pod(ctx: TcContext) -> i32 {
    service::ingress(&ctx, false)
}
