//! `tc_from_netdev`, on an uplink's ingress: traffic from other nodes and from outside the
//! cluster (NodePort, LoadBalancer, externalIPs), which sees a Service's external entries.
use aya_ebpf::{macros::classifier, programs::TcContext};
use weir_ebpf::service;

#[classifier]
pub fn tc_from_netdev(ctx: TcContext) -> i32 {
    service::ingress(&ctx, true)
}
