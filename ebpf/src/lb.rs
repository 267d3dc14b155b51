//! Service lookup and backend selection, shared by the per-packet and the socket programs.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns};
use weir_common::*;

use crate::maps::{count, AFFINITY, BACKENDS, MAGLEV, NODE_LOCAL, SVC, VIPNET};

/// The coarse monotonic clock as jiffies × the tick + an offset, set by the loader
/// (`weir_common::kernel_facts`); 0 per jiffy where unknown. Read-only and frozen: constants
/// to the verifier, which removes the branch they rule out.
#[unsafe(no_mangle)]
static WEIR_NS_PER_JIFFY: u64 = 0;
#[unsafe(no_mangle)]
static WEIR_JIFFIES_OFFSET: u64 = 0;

/// Monotonic time at tick resolution (`CLOCK_MONOTONIC_COARSE`, which user space reads):
/// lifetimes and affinity timeouts count in seconds. From `bpf_jiffies64`, which the verifier
/// inlines (no helper call); from `bpf_ktime_get_coarse_ns` where the loader did not find the
/// tick.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: reads of globals (volatile, so that LLVM does not fold the values they were
    // built with) and helpers without arguments.
    unsafe {
        let tick = core::ptr::read_volatile(&WEIR_NS_PER_JIFFY);
        if tick == 0 {
            return bpf_ktime_get_coarse_ns();
        }
        bpf_jiffies64()
            .wrapping_mul(tick)
            .wrapping_add(core::ptr::read_volatile(&WEIR_JIFFIES_OFFSET))
    }
}

/// The node's own server for a `SVC_F_NODE_LOCAL` service (address, port in network byte
/// order) while it holds its lease and has an address of this family; None: the service's
/// backends then.
#[inline(always)]
pub fn node_local_server(v6: bool) -> Option<(Addr, u16)> {
    let l = NODE_LOCAL.get_ptr(0)?;
    // LLVM turns the choice between the two address fields into pointer arithmetic on the
    // flag; a flag loaded from memory is 0..=255 to the verifier, which then refuses the
    // access. A volatile load and a mask bound it to 0..=1.
    // SAFETY: reads of a local and of the map value the verifier checked non-null.
    let i =
        usize::from(unsafe { core::ptr::read_volatile(core::ptr::addr_of!(v6).cast::<u8>()) } & 1);
    let (addr, port, expires) = unsafe {
        (
            *core::ptr::addr_of!((*l).addr4).add(i),
            (*l).port,
            (*l).expires_ns,
        )
    };
    if addr.0 == [0; 16] || port == 0 || now_ns() >= expires {
        return None;
    }
    Some((addr, port))
}

/// The master entry (slot 0) of a service frontend, copied out, with the scope it was found
/// in. `external` traffic sees the frontend's `SCOPE_EXTERNAL` entry where there is one.
#[inline(always)]
pub fn lookup_service(addr: &Addr, port: u16, proto: u8, external: bool) -> Option<(SvcValue, u8)> {
    let key = SvcKey {
        addr: *addr,
        port,
        proto,
        scope: SCOPE_ALL,
        slot: 0,
        _pad: 0,
    };
    if external {
        let ext = SvcKey {
            scope: SCOPE_EXTERNAL,
            ..key
        };
        // SAFETY: as below.
        if let Some(v) = unsafe { SVC.get(&ext) } {
            return Some((*v, SCOPE_EXTERNAL));
        }
    }
    // SAFETY: the value is copied at once; the map is not preallocated, so an update replaces
    // the element under RCU instead of recycling it.
    unsafe { SVC.get(&key).map(|v| (*v, SCOPE_ALL)) }
}

/// A 32-bit mix of the flow's client side (murmur3's finalizer over the words).
#[inline(always)]
pub fn flow_hash(client: &Addr, sport: u16, proto: u8) -> u32 {
    let mut h: u32 = 0x9747_b28c;
    let mut i = 0;
    while i < 16 {
        let w = u32::from_ne_bytes([
            client.0[i],
            client.0[i + 1],
            client.0[i + 2],
            client.0[i + 3],
        ]);
        h ^= w;
        h = h.rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64);
        i += 4;
    }
    h ^= (sport as u32) << 8 | proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Picks a backend for a new flow of the service `master` describes. `hash` feeds Maglev; the
/// random policy ignores it. Session affinity, when on, wins over both while it is fresh.
#[inline(always)]
pub fn select_backend(
    vip: &Addr,
    port: u16,
    proto: u8,
    scope: u8,
    master: &SvcValue,
    client: &Addr,
    hash: u32,
) -> Result<(u32, Backend), Stat> {
    let aff_key = AffinityKey {
        client: *client,
        svc_id: master.svc_id,
        _pad: 0,
    };
    let affinity = master.flags & SVC_F_AFFINITY != 0;
    let now = if affinity { now_ns() } else { 0 };
    if affinity {
        if let Some(a) = AFFINITY.get_ptr_mut(&aff_key) {
            // SAFETY: an LRU value pointer stays valid for this program run.
            let a = unsafe { &mut *a };
            let timeout = master.affinity_timeout_s as u64 * 1_000_000_000;
            if now.wrapping_sub(a.last_used_ns) < timeout {
                // SAFETY: copied out at once.
                if let Some(be) = unsafe { BACKENDS.get(&a.backend_id) } {
                    a.last_used_ns = now;
                    count(Stat::AffinityHit);
                    return Ok((a.backend_id, *be));
                }
            }
        }
    }

    let backend_id = if master.flags & SVC_F_MAGLEV != 0 {
        // SAFETY: the table is copied from by index at once.
        let Some(table) = MAGLEV.get_ptr(&master.svc_id) else {
            return Err(Stat::DropBackendMissing);
        };
        // Multiply-shift instead of `%`: as uniform, and a bound the verifier can follow.
        let idx = ((hash as u64 * MAGLEV_M as u64) >> 32) as usize;
        count(Stat::MaglevSelect);
        // SAFETY: idx < MAGLEV_M, the array's length.
        unsafe { (*table).backends[idx] }
    } else {
        // SAFETY: a helper without arguments.
        let r = unsafe { bpf_get_prandom_u32() };
        // Callers reject an empty service first; this also spares `%` its panic path.
        if master.count == 0 {
            return Err(Stat::DropBackendMissing);
        }
        let slot = (r % master.count as u32) as u16 + 1;
        let key = SvcKey {
            addr: *vip,
            port,
            proto,
            scope,
            slot,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        match unsafe { SVC.get(&key) } {
            Some(v) => v.backend_id,
            None => {
                // The service shrank between the master read and this one (make-before-break
                // deletes trailing slots last): slot 1 exists while the service has a backend.
                let first = SvcKey { slot: 1, ..key };
                // SAFETY: copied out at once.
                match unsafe { SVC.get(&first) } {
                    Some(v) => v.backend_id,
                    None => return Err(Stat::DropBackendMissing),
                }
            }
        }
    };
    // SAFETY: copied out at once.
    let Some(be) = (unsafe { BACKENDS.get(&backend_id).copied() }) else {
        return Err(Stat::DropBackendMissing);
    };
    if affinity {
        let v = AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: now,
        };
        // A full LRU evicts the oldest entry; a failed insert only loses stickiness.
        let _ = AFFINITY.insert(&aff_key, &v, 0);
    }
    Ok((backend_id, be))
}

/// Whether an IPv4 destination is in a /16 that holds a service address (see `VIPNET`).
#[inline(always)]
pub fn maybe_service(dst: &Addr) -> bool {
    let (word, bit) = vipnet_slot(dst.v4_octets());
    match VIPNET.get(word) {
        Some(w) => *w & bit != 0,
        None => true,
    }
}
