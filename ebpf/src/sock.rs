//! Socket-level load balancing: `connect` and `sendmsg` translate a service address into a
//! backend before a packet exists; `recvmsg` and `getpeername` translate it back, so the
//! application only ever sees the service address.
use aya_ebpf::{
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use weir_common::*;

use crate::{
    lb::{lookup_service, node_local_server, select_backend},
    maps::{count, BACKENDS, SOCK_FWD, SOCK_REV},
};

const ECONNREFUSED: i32 = 111;
/// cgroup sock_addr verdicts.
const ALLOW: i32 = 1;
const REJECT: i32 = 0;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

#[inline(always)]
fn sa(ctx: &SockAddrContext) -> *mut bpf_sock_addr {
    ctx.sock_addr
}

#[inline(always)]
fn user_addr(ctx: &SockAddrContext, fam: Family) -> Addr {
    // SAFETY: the context is the kernel's bpf_sock_addr for this call.
    unsafe {
        match fam {
            Family::V4 => Addr::from_v4_word((*sa(ctx)).user_ip4),
            Family::V6 => {
                // Each word read on its own: the verifier allows 4-byte context loads only
                // (copied as an array, LLVM loads 8 bytes at a time).
                let w = core::ptr::addr_of!((*sa(ctx)).user_ip6).cast::<u32>();
                Addr::from_words([
                    core::ptr::read_volatile(w),
                    core::ptr::read_volatile(w.add(1)),
                    core::ptr::read_volatile(w.add(2)),
                    core::ptr::read_volatile(w.add(3)),
                ])
            }
        }
    }
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, fam: Family, addr: &Addr, port: u16) {
    let w = addr.words();
    // SAFETY: the context is the kernel's bpf_sock_addr for this call; these fields are writable
    // in the hooks that call this.
    unsafe {
        match fam {
            Family::V4 => (*sa(ctx)).user_ip4 = w[3],
            Family::V6 => {
                // Each word is written separately: the verifier allows 4-byte stores only.
                (*sa(ctx)).user_ip6[0] = w[0];
                (*sa(ctx)).user_ip6[1] = w[1];
                (*sa(ctx)).user_ip6[2] = w[2];
                (*sa(ctx)).user_ip6[3] = w[3];
            }
        }
        (*sa(ctx)).user_port = port as u32;
    }
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u16 {
    // SAFETY: as above. The port sits in network byte order in the low 16 bits.
    unsafe { (*sa(ctx)).user_port as u16 }
}

#[inline(always)]
fn proto(ctx: &SockAddrContext) -> u8 {
    // SAFETY: as above.
    unsafe { (*sa(ctx)).protocol as u8 }
}

#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: get_socket_cookie on a sock_addr context is defined by the kernel.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// `connect` (TCP, connected UDP) and `sendmsg` (unconnected UDP).
#[inline(always)]
pub fn forward(ctx: &SockAddrContext, fam: Family, sendmsg: bool) -> i32 {
    let proto = proto(ctx);
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return ALLOW;
    }
    let vip = user_addr(ctx, fam);
    let vport = user_port(ctx);
    let Some((master, scope)) = lookup_service(&vip, vport, proto, false) else {
        return ALLOW;
    };
    if master.flags & SVC_F_NODE_LOCAL != 0 && node_local(ctx, fam, &vip, vport) {
        return ALLOW;
    }
    if master.count == 0 && master.flags & SVC_F_DROP_EMPTY != 0 {
        // kube-proxy drops this traffic: leave the address alone, and the per-packet path,
        // which sees the same entry, drops the packets.
        count(Stat::SockDropNoLocalBackend);
        return ALLOW;
    }
    if master.count == 0 {
        count(Stat::SockRejectNoBackend);
        // SAFETY: a helper on an integer; kube-proxy's REJECT surfaces as ECONNREFUSED too.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    }
    let cookie = cookie(ctx);
    let fwd_key = SockKey {
        cookie,
        addr: vip,
        port: vport,
        _pad: [0; 6],
    };
    // An unconnected UDP socket keeps talking to the backend it got first, like a flow would.
    if sendmsg {
        // SAFETY: copied out at once.
        if let Some(prev) = unsafe { SOCK_FWD.get(&fwd_key).copied() } {
            // SAFETY: copied out at once.
            if let Some(be) = unsafe { BACKENDS.get(&prev.backend_id).copied() } {
                set_user_addr(ctx, fam, &be.addr, be.port);
                count(Stat::SockSendmsg);
                return ALLOW;
            }
        }
    }
    let hash = (cookie ^ (cookie >> 32)) as u32;
    let (backend_id, be) =
        match select_backend(&vip, vport, proto, scope, &master, &client_of(ctx), hash) {
            Ok(b) => b,
            Err(_) => {
                count(Stat::SockBackendMissing);
                return ALLOW;
            }
        };
    let rev_key = SockKey {
        cookie,
        addr: be.addr,
        port: be.port,
        _pad: [0; 6],
    };
    let rev = SockValue {
        addr: vip,
        port: vport,
        _pad: 0,
        backend_id,
    };
    let _ = SOCK_REV.insert(&rev_key, &rev, 0);
    if sendmsg {
        let _ = SOCK_FWD.insert(&fwd_key, &rev, 0);
    }
    set_user_addr(ctx, fam, &be.addr, be.port);
    count(if sendmsg {
        Stat::SockSendmsg
    } else {
        Stat::SockConnect
    });
    ALLOW
}

/// Sends the socket to the node's own server while it holds its lease; false when it does
/// not (or has no address of this family): the service's backends then.
#[inline(always)]
fn node_local(ctx: &SockAddrContext, fam: Family, vip: &Addr, vport: u16) -> bool {
    let Some((addr, port)) = node_local_server(fam == Family::V6) else {
        return false;
    };
    let rev_key = SockKey {
        cookie: cookie(ctx),
        addr,
        port,
        _pad: [0; 6],
    };
    let rev = SockValue {
        addr: *vip,
        port: vport,
        _pad: 0,
        backend_id: 0,
    };
    let _ = SOCK_REV.insert(&rev_key, &rev, 0);
    set_user_addr(ctx, fam, &addr, port);
    count(Stat::SockNodeLocal);
    true
}

/// The client identity for session affinity: the socket's network namespace, which is what a
/// pod is (Cilium keys socket-level affinity the same way). It is put in an address from
/// `fd00::/8`'s reserved corner so that it cannot meet a real client address of the TC path.
#[inline(always)]
fn client_of(ctx: &SockAddrContext) -> Addr {
    // SAFETY: get_netns_cookie on a sock_addr context is defined by the kernel.
    let c = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) }.to_be_bytes();
    Addr([
        0xfd, 0xff, 0, 0, 0, 0, 0, 0, c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
    ])
}

/// `recvmsg` and `getpeername`: show the service address instead of the backend.
#[inline(always)]
pub fn reverse(ctx: &SockAddrContext, fam: Family) -> i32 {
    let key = SockKey {
        cookie: cookie(ctx),
        addr: user_addr(ctx, fam),
        port: user_port(ctx),
        _pad: [0; 6],
    };
    // SAFETY: copied out at once.
    if let Some(v) = unsafe { SOCK_REV.get(&key).copied() } {
        set_user_addr(ctx, fam, &v.addr, v.port);
        count(Stat::SockRevXlate);
    }
    ALLOW
}
