//! Maps an earlier version pinned, made fit for this one: conntrack flows copied from older
//! layouts (`CT_V1`, `CT_V2`), a counters map grown with its counts carried over, and any
//! other pinned map checked against this build's definition before it is adopted.
use std::path::Path;

use crate::error::{fail, Context, Result, WriteError};

use super::{conntrack::Conntrack, object::OBJECT, pinned::open_typed, pins::unpin};

/// A conntrack value as weir wrote it in `CT_V1` (no peer rewrite).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtValueV1 {
    pub nat_addr: weir_common::Addr,
    pub nat_port: u16,
    pub dir: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub svc_id: u32,
    pub _pad: u32,
    pub expires_ns: u64,
}

// SAFETY: repr(C), Copy, integers only, no implicit padding (40 bytes, as the kernel map says).
unsafe impl aya::Pod for CtValueV1 {}

/// `bpf_map_update_elem` flag: fail if the key exists.
const BPF_NOEXIST: u64 = 1;

/// The conntrack maps of earlier versions: `CT_V1` (values without the peer rewrite), then
/// `CT_V2` (today's values, both families under `CtKey`), before `CT4_V1` and `CT6_V1`.
pub const CT_V1: &str = "CT_V1";
pub const CT_V2: &str = "CT_V2";

/// A `CT_V1` value in today's layout: hairpin entries get their peer (the VIP forward, the
/// client back) as the old programs derived it from the packet.
fn ct_value_of_v1(k: &weir_common::CtKey, v: &CtValueV1) -> weir_common::CtValue {
    use weir_common::{CtValue, CT_DIR_FORWARD, CT_F_HAIRPIN};
    let (peer_addr, peer_port) = match (v.flags & CT_F_HAIRPIN != 0, v.dir == CT_DIR_FORWARD) {
        (false, _) => (weir_common::Addr::default(), 0),
        (true, true) => (k.dst, k.sport),
        (true, false) => (k.src, k.dport),
    };
    CtValue {
        nat_addr: v.nat_addr,
        peer_addr,
        nat_port: v.nat_port,
        peer_port,
        dir: v.dir,
        flags: v.flags,
        _pad: 0,
        backend_id: v.backend_id,
        svc_id: v.svc_id,
        expires_ns: v.expires_ns,
    }
}

/// Copies the flows of the conntrack maps an earlier version pinned (`CT_V1`, `CT_V2`) into
/// today's (`CT4_V1`, `CT6_V1`), so an upgrade keeps established flows; an entry the new
/// programs wrote already is newer and stays. The old programs use the old maps until
/// they are replaced: [`Datapath::load`] copies before the new ones are attached (they find
/// every flow), [`Datapath::finish_ct_migration`] again once all are (the flows the old
/// programs added meanwhile), with `unpin`: the old maps then go. Returns the entries copied.
pub fn migrate_ct(maps_dir: &Path, unpin_old: bool) -> Result<usize> {
    use aya::maps::{HashMap, MapData};
    use weir_common::{CtKey, CtValue};
    let (v1, v2) = (maps_dir.join(CT_V1), maps_dir.join(CT_V2));
    if !v1.exists() && !v2.exists() {
        return Ok(0);
    }
    let mut new = Conntrack::open(maps_dir)?;
    let mut moved = 0;
    let mut put = |k: CtKey, v: CtValue| -> Result<()> {
        match new.insert(&k, &v, BPF_NOEXIST) {
            Ok(()) => moved += 1,
            Err(WriteError::Map { error, .. })
                if matches!(&*error, aya::maps::MapError::SyscallError(e)
                    if e.io_error.raw_os_error() == Some(libc::EEXIST)) => {}
            Err(e) => return Err(e).context("copy a flow of an earlier conntrack layout"),
        }
        Ok(())
    };
    if v1.exists() {
        let old: HashMap<MapData, CtKey, CtValueV1> = open_typed(maps_dir, CT_V1)?;
        for kv in old.iter() {
            let (k, v) = kv.context("read CT_V1")?;
            put(k, ct_value_of_v1(&k, &v))?;
        }
    }
    if v2.exists() {
        let old: HashMap<MapData, CtKey, CtValue> = open_typed(maps_dir, CT_V2)?;
        for kv in old.iter() {
            let (k, v) = kv.context("read CT_V2")?;
            put(k, v)?;
        }
    }
    if unpin_old {
        for path in [v1, v2] {
            if path.exists() {
                unpin(&path)?;
            }
        }
    }
    Ok(moved)
}

/// Counters a previous run counted, by index, to be carried into a counters map made anew.
pub(super) type Carried = Vec<(u32, aya::maps::PerCpuValues<u64>)>;

/// Checks every map of the object that a previous run pinned against this build's
/// definition, before the loader adopts it: aya reuses a pinned map whatever its shape. The
/// counters map is made anew when its size changed (a version with more counters), its counts
/// returned to be carried over; any other difference is an error naming the map, whose entries
/// would be misread (a change of layout takes a new map name, as `CT_V2`).
pub(super) fn check_pinned_maps(maps_dir: &Path) -> Result<Carried> {
    use aya::maps::{MapData, MapInfo, PerCpuArray};
    let obj = aya_obj::Object::parse(OBJECT).context("parse the eBPF object")?;
    let mut carried = Vec::new();
    for (name, def) in &obj.maps {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("read pinned map {}", path.display()))?;
        let want = (def.key_size(), def.value_size(), def.max_entries());
        let got = (info.key_size(), info.value_size(), info.max_entries());
        if want == got {
            continue;
        }
        if name == weir_common::map_names::STATS && (want.0, want.1) == (got.0, got.1) {
            let old: PerCpuArray<MapData, u64> =
                open_typed(maps_dir, weir_common::map_names::STATS)?;
            for i in 0..got.2.min(want.2) {
                carried.push((
                    i,
                    old.get(&i, 0)
                        .with_context(|| format!("read {name}[{i}]"))?,
                ));
            }
            // The old programs keep their map until they are replaced; counts they add
            // meanwhile are lost.
            unpin(&path)?;
            tracing::info!(
                map = %name,
                was = got.2,
                now = want.2,
                "counters map made anew for this version's counters, counts carried over"
            );
            continue;
        }
        fail!(
            "the pinned map {} has keys of {} bytes, values of {} bytes and {} entries, where this \
             weir's programs expect {}, {} and {}: its entries would be misread. A change of layout \
             takes a new map name; remove the pin to start that map empty",
            path.display(),
            got.0,
            got.1,
            got.2,
            want.0,
            want.1,
            want.2
        );
    }
    Ok(carried)
}

/// Writes carried counts into the counters map the loader made.
pub(super) fn restore_counters(maps_dir: &Path, carried: Carried) -> Result<()> {
    use aya::maps::{MapData, PerCpuArray};
    if carried.is_empty() {
        return Ok(());
    }
    let name = weir_common::map_names::STATS;
    let mut stats: PerCpuArray<MapData, u64> = open_typed(maps_dir, name)?;
    for (i, v) in carried {
        stats
            .set(i, v, 0)
            .with_context(|| format!("write {name}[{i}]"))?;
    }
    Ok(())
}
