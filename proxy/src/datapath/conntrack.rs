//! The conntrack maps, as the agent reads and writes them: walks in batches, deletions, and
//! the end of the flow cache's slots after any write.
use std::path::Path;

use aya::maps::{Array, HashMap, MapData, MapError};
use weir_common::{map_names, Ct4Key, CtKey, CtValue};

use crate::error::WriteError;

use super::{
    batch::{batch_failed, delete_batched, dump_batched},
    pinned::{failed, ignore_missing, open_typed},
};

/// A conntrack map, typed, and again untyped: read and deleted from in batches (see
/// [`dump_batched`]).
struct CtMap<K> {
    name: &'static str,
    typed: HashMap<MapData, K, CtValue>,
    raw: MapData,
}

impl<K: aya::Pod> CtMap<K> {
    fn open(dir: &Path, name: &'static str) -> Result<Self, WriteError> {
        let path = dir.join(name);
        Ok(Self {
            name,
            typed: open_typed(dir, name)?,
            raw: MapData::from_pin(&path).map_err(|source| WriteError::Open {
                map: name,
                path,
                error: Box::new(source),
            })?,
        })
    }

    fn for_each(&self, f: &mut impl FnMut(K, CtValue)) -> Result<(), WriteError> {
        match dump_batched(&self.raw, &mut *f) {
            Ok(true) => Ok(()),
            Ok(false) => {
                for kv in self.typed.iter() {
                    let (k, v) = kv.map_err(failed(self.name, "iterate", "conntrack".into()))?;
                    f(k, v);
                }
                Ok(())
            }
            Err(e) => Err(batch_failed(self.name, "read in batches", "conntrack", e)),
        }
    }

    fn delete(&mut self, keys: &[K]) -> Result<(), WriteError> {
        match delete_batched(&self.raw, keys) {
            Ok(Some(_)) => Ok(()),
            Ok(None) => {
                for k in keys {
                    ignore_missing(self.typed.remove(k)).map_err(failed(
                        self.name,
                        "remove",
                        "conntrack entry".into(),
                    ))?;
                }
                Ok(())
            }
            Err(e) => Err(batch_failed(
                self.name,
                "delete in batches",
                "conntrack entries",
                e,
            )),
        }
    }
}

/// Ends every slot of the programs' flow cache (see `weir_common::FLOW_GEN_GLOBAL`): to be
/// called after a change to conntrack or to the pod veths, which the cache's slots may have
/// been filled from. The global generation gets a value no slot holds: its old one plus 1
/// plus this process's id times 2^32 (another process writing at once writes another), under
/// a lock within the process.
pub fn end_flow_cache<T: std::borrow::BorrowMut<MapData>>(
    gen: &mut Array<T, u64>,
) -> Result<(), MapError> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _held = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let i = weir_common::FLOW_GEN_GLOBAL;
    let v = gen.get(&i, 0)?;
    gen.set(
        i,
        v.wrapping_add(1 + ((std::process::id() as u64) << 32)),
        0,
    )
}

/// The conntrack maps of both families as one table of [`CtKey`]s: the programs key IPv4
/// flows by [`Ct4Key`] (`CT4_V1`), IPv6 flows by [`CtKey`] (`CT6_V1`). Its writes end the
/// flow cache's slots (`LB_FLOWGEN_V1`, where it is pinned: a layout from before the cache has
/// none).
pub struct Conntrack {
    v4: CtMap<Ct4Key>,
    v6: CtMap<CtKey>,
    gen: Option<Array<MapData, u64>>,
}

impl Conntrack {
    pub fn open(maps_dir: &Path) -> Result<Self, WriteError> {
        let gen = if maps_dir.join(map_names::FLOW_GEN).exists() {
            Some(open_typed(maps_dir, map_names::FLOW_GEN)?)
        } else {
            None
        };
        Ok(Self {
            v4: CtMap::open(maps_dir, map_names::CT4)?,
            v6: CtMap::open(maps_dir, map_names::CT6)?,
            gen,
        })
    }

    /// After a write: the flow cache's slots end (see [`end_flow_cache`]).
    fn written(&mut self) -> Result<(), WriteError> {
        match &mut self.gen {
            Some(g) => end_flow_cache(g).map_err(failed(
                map_names::FLOW_GEN,
                "move",
                "the flow cache's generation".into(),
            )),
            None => Ok(()),
        }
    }

    /// Hands every entry to `f`, IPv4 ones under their IPv4-mapped tuple.
    pub fn for_each(&self, mut f: impl FnMut(CtKey, CtValue)) -> Result<(), WriteError> {
        self.v4.for_each(&mut |k: Ct4Key, v| f(k.into(), v))?;
        self.v6.for_each(&mut f)
    }

    /// How many entries each map holds, IPv4 and IPv6: what the LRU has to make room in
    /// (entries past their lifetime are counted until a new flow takes their place).
    pub fn counts(&self) -> Result<(usize, usize), WriteError> {
        let (mut v4, mut v6) = (0, 0);
        self.v4.for_each(&mut |_: Ct4Key, _| v4 += 1)?;
        self.v6.for_each(&mut |_: CtKey, _| v6 += 1)?;
        Ok((v4, v6))
    }

    /// Every entry (tests and benchmarks; the agent walks the maps with [`Self::for_each`]).
    pub fn entries(&self) -> Result<Vec<(CtKey, CtValue)>, WriteError> {
        let mut all = Vec::new();
        self.for_each(|k, v| all.push((k, v)))?;
        Ok(all)
    }

    pub fn get(&self, k: &CtKey) -> Result<Option<CtValue>, WriteError> {
        let (name, r) = match k.to_v4() {
            Some(k4) => (self.v4.name, self.v4.typed.get(&k4, 0)),
            None => (self.v6.name, self.v6.typed.get(k, 0)),
        };
        match r {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(failed(name, "read", "conntrack entry".into())(e)),
        }
    }

    pub fn insert(&mut self, k: &CtKey, v: &CtValue, flags: u64) -> Result<(), WriteError> {
        let (name, r) = match k.to_v4() {
            Some(k4) => (self.v4.name, self.v4.typed.insert(k4, v, flags)),
            None => (self.v6.name, self.v6.typed.insert(k, v, flags)),
        };
        r.map_err(failed(name, "insert", "conntrack entry".into()))?;
        self.written()
    }

    /// Removes `keys` (an entry already gone is skipped), in batches where the kernel can.
    pub fn delete(&mut self, keys: &[CtKey]) -> Result<(), WriteError> {
        let (mut k4, mut k6) = (Vec::new(), Vec::new());
        for k in keys {
            match k.to_v4() {
                Some(k) => k4.push(k),
                None => k6.push(*k),
            }
        }
        self.v4.delete(&k4)?;
        self.v6.delete(&k6)?;
        self.written()
    }
}
