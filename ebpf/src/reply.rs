//! The reverse NAT of replies on their way out of a device (`tc_to_pod`, `tc_to_netdev`):
//! replies of flows an ingress translated to an endpoint on the node that no program saw on
//! the way.
use aya_ebpf::programs::TcContext;
use weir_common::*;

use crate::{
    ct::{fwd_entry, refresh},
    flow,
    lb::now_ns,
    maps::{count, Scratch},
    nat::rewrite,
};

/// The reverse NAT of a reply whose flow was translated at an ingress to an endpoint on the
/// node, on a packet already routed (on its way out of a device): whether it was one.
#[inline(always)]
pub fn reply_out(ctx: &TcContext, s: &mut Scratch) -> Result<bool, Stat> {
    // The packet's tuple is in the forward key: `flow::lookup` set it.
    let Some(entry) = fwd_entry(s) else {
        return Ok(false);
    };
    let p = &s.pkt;
    // SAFETY: an LRU value pointer stays valid for this program run.
    let e = unsafe { &mut *entry };
    let now = now_ns();
    // Hairpin and source-NATed flows have their replies translated where they come in.
    if e.dir != CT_DIR_REPLY || e.flags & (CT_F_HAIRPIN | CT_F_SNAT) != 0 || e.expires_ns <= now {
        return Ok(false);
    }
    refresh(e, p, now);
    // Copied out first: from the map value straight into the scratch slot, LLVM cannot tell
    // the two apart and calls `memmove`.
    let (nat_addr, nat_port) = (e.nat_addr, e.nat_port);
    s.chg_src.set(&p.src, &nat_addr, p.sport, nat_port);
    s.chg_dst.keep(&p.dst);
    if e.flags & CT_F_CLOSING == 0 {
        flow::fill(s, flow::AT_EGRESS, 0, Stat::RevNat, e.expires_ns);
    }
    // Already on its way out of the device: nothing to route.
    rewrite(ctx, s, false, false)?;
    count(Stat::RevNat);
    Ok(true)
}
