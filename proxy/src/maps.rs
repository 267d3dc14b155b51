//! The typed map writer: what the programmer asks of the service maps, the aya implementation
//! over the pinned kernel maps, and an in-memory fake for tests that checks, after every single
//! write, that a reader can never follow a slot to nothing.
use std::{
    collections::BTreeMap,
    collections::BTreeSet,
    io,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use weir_common::{map_names, Backend, Ct4Key, CtKey, CtValue, MaglevTable, SvcKey, SvcValue};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("map {map}: {op} {what}: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        what: String,
        #[source]
        source: Box<MapError>,
    },
    #[error("map {map}: open {path}: {source}")]
    Open {
        map: &'static str,
        path: PathBuf,
        #[source]
        source: Box<MapError>,
    },
}

/// Everything the programmer writes. Implementations apply each call at once: ordering is the
/// caller's job (make-before-break).
pub trait MapWriter {
    fn put_backend(&mut self, id: u32, be: &Backend) -> Result<(), WriteError>;
    fn del_backend(&mut self, id: u32) -> Result<(), WriteError>;
    fn put_svc(&mut self, key: &SvcKey, val: &SvcValue) -> Result<(), WriteError>;
    fn del_svc(&mut self, key: &SvcKey) -> Result<(), WriteError>;
    fn put_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), WriteError>;
    fn del_maglev(&mut self, svc_id: u32) -> Result<(), WriteError>;
    /// Writes one word of the service-prefix bitmap (`LB_VIPNET`).
    fn put_vipnet(&mut self, word: u32, bits: u64) -> Result<(), WriteError>;
    /// Everything in the service and backend maps, to adopt what a previous run programmed.
    fn dump(&self) -> Result<Programmed, WriteError>;
    /// Removes the conntrack entries of UDP flows to these (removed) backends: the next packet
    /// of such a flow is balanced again instead of going to an endpoint that left. TCP
    /// flows keep theirs (a terminating endpoint finishes its connections, as with
    /// kube-proxy). Returns how many entries went.
    fn purge_udp_flows(&mut self, backend_ids: &BTreeSet<u32>) -> Result<usize, WriteError>;
}

/// A snapshot of the service and backend maps.
#[derive(Debug, Default, Clone)]
pub struct Programmed {
    pub svc: BTreeMap<SvcKeyOrd, SvcValue>,
    pub backends: BTreeMap<u32, Backend>,
    pub maglev: BTreeMap<u32, Vec<u32>>,
    /// Non-zero words of the service-prefix bitmap.
    pub vipnet: BTreeMap<u32, u64>,
}

/// `SvcKey` ordered by (address, port, protocol, scope, slot), for stable dumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SvcKeyOrd(pub [u8; 16], pub u16, pub u8, pub u8, pub u16);

impl From<&SvcKey> for SvcKeyOrd {
    fn from(k: &SvcKey) -> Self {
        SvcKeyOrd(k.addr.0, u16::from_be(k.port), k.proto, k.scope, k.slot)
    }
}

impl SvcKeyOrd {
    pub fn key(&self) -> SvcKey {
        SvcKey {
            addr: weir_common::Addr(self.0),
            port: self.1.to_be(),
            proto: self.2,
            scope: self.3,
            slot: self.4,
            _pad: 0,
        }
    }
}

fn describe_key(k: &SvcKey) -> String {
    format!(
        "{}:{}/{} slot {}",
        crate::addr::to_ip(&k.addr),
        u16::from_be(k.port),
        crate::addr::proto_name(k.proto),
        k.slot
    )
}

/// The kernel maps, opened from their pins.
pub struct AyaMaps {
    svc: HashMap<MapData, SvcKey, SvcValue>,
    backends: HashMap<MapData, u32, Backend>,
    maglev: HashMap<MapData, u32, MaglevTable>,
    vipnet: Array<MapData, u64>,
    ct: Conntrack,
}

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
                source: Box::new(source),
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

fn open_pinned(dir: &Path, name: &'static str) -> Result<Map, WriteError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| WriteError::Open {
        map: name,
        path: path.clone(),
        source: Box::new(source),
    })?;
    Map::from_map_data(data).map_err(|source| WriteError::Open {
        map: name,
        path,
        source: Box::new(source),
    })
}

/// Opens the map pinned at `dir/name` as a typed aya map (`HashMap`, `Array`, ...).
pub fn open_typed<T>(dir: &Path, name: &'static str) -> Result<T, WriteError>
where
    T: TryFrom<Map, Error = MapError>,
{
    T::try_from(open_pinned(dir, name)?).map_err(|source| WriteError::Open {
        map: name,
        path: dir.join(name),
        source: Box::new(source),
    })
}

/// The error of one map operation, naming the map, the operation and the object.
fn failed(
    map: &'static str,
    op: &'static str,
    what: String,
) -> impl FnOnce(MapError) -> WriteError {
    move |source| WriteError::Map {
        map,
        op,
        what,
        source: Box::new(source),
    }
}

impl AyaMaps {
    /// Opens the pinned service maps under `maps_dir`.
    pub fn open(maps_dir: &Path) -> Result<Self, WriteError> {
        Ok(Self {
            svc: open_typed(maps_dir, map_names::SVC)?,
            backends: open_typed(maps_dir, map_names::BACKENDS)?,
            maglev: open_typed(maps_dir, map_names::MAGLEV)?,
            vipnet: open_typed(maps_dir, map_names::VIPNET)?,
            ct: Conntrack::open(maps_dir)?,
        })
    }
}

/// `BPF_MAP_LOOKUP_BATCH`'s attributes (`union bpf_attr`, the `batch` member).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// One `bpf(cmd, attr)` call of the batch family.
///
/// # Safety
/// Every pointer in `attr` must be valid for what `cmd` reads and writes through it.
unsafe fn bpf_batch(cmd: libc::c_long, attr: &mut BatchAttr) -> io::Result<()> {
    // SAFETY: the caller vouches for the attribute's pointers; its size is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A batched operation on a conntrack map that failed.
fn batch_failed(
    map: &'static str,
    op: &'static str,
    what: &str,
    io_error: io::Error,
) -> WriteError {
    WriteError::Map {
        map,
        op,
        what: what.into(),
        source: Box::new(MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf",
            io_error,
        })),
    }
}
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// Deletes `keys` from a hash map with `BPF_MAP_DELETE_BATCH`, a key already gone skipped;
/// returns how many it deleted, or `None` when the kernel does not batch this map.
pub fn delete_batched<K: aya::Pod>(map: &MapData, keys: &[K]) -> io::Result<Option<usize>> {
    use std::os::fd::{AsFd, AsRawFd};
    let mut at = 0;
    let mut deleted = 0;
    while at < keys.len() {
        let rest = &keys[at..];
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: rest.len().min(u32::MAX as usize) as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `keys` holds `count` keys and outlives the call.
        let r = unsafe { bpf_batch(BPF_MAP_DELETE_BATCH, &mut attr) };
        // `count`: the keys deleted before the call stopped.
        deleted += attr.count as usize;
        at += attr.count as usize;
        let Err(err) = r else {
            continue;
        };
        match err.raw_os_error() {
            // Gone meanwhile (expired, or an LRU eviction): past it.
            Some(libc::ENOENT) => at += 1,
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524) if deleted == 0 => {
                return Ok(None)
            }
            _ => return Err(err),
        }
    }
    Ok(Some(deleted))
}

/// Every entry of a hash map, read with `BPF_MAP_LOOKUP_BATCH`: a syscall per few thousand
/// entries, where iterating costs two per entry (a walk of 100 000 flows took a fifth of a
/// second, on the agent's sync step), each handed to `f` as its batch arrives (a full map is
/// never copied whole). `Ok(false)` when the kernel does not batch this map (`f` not called).
pub fn dump_batched<K: aya::Pod, V: aya::Pod>(
    map: &MapData,
    mut f: impl FnMut(K, V),
) -> io::Result<bool> {
    use std::os::fd::{AsFd, AsRawFd};
    let (ks, vs) = (std::mem::size_of::<K>(), std::mem::size_of::<V>());
    let mut chunk = 4096usize;
    let (mut keys, mut values) = (vec![0u8; chunk * ks], vec![0u8; chunk * vs]);
    // The position between calls: a bucket index for hash maps; room for a key, to be safe.
    let (mut token, mut next) = (vec![0u8; ks.max(8)], vec![0u8; ks.max(8)]);
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token.as_ptr() as u64 },
            out_batch: next.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: map.fd().as_fd().as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: the attribute's buffers hold `count` keys and values and a position each,
        // and outlive the call.
        let err = unsafe { bpf_batch(BPF_MAP_LOOKUP_BATCH, &mut attr) }.err();
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None | Some(libc::ENOENT) => {
                for i in 0..attr.count as usize {
                    // SAFETY: the kernel wrote `count` whole keys and values; Pod types are
                    // valid for any bytes.
                    let (k, v) = unsafe {
                        (
                            std::ptr::read_unaligned(keys[i * ks..].as_ptr().cast::<K>()),
                            std::ptr::read_unaligned(values[i * vs..].as_ptr().cast::<V>()),
                        )
                    };
                    f(k, v);
                }
                if err.is_some() {
                    return Ok(true);
                }
                std::mem::swap(&mut token, &mut next);
                first = false;
            }
            // A bucket holds more entries than the buffers: larger ones, same position.
            Some(libc::ENOSPC) => {
                chunk *= 2;
                keys.resize(chunk * ks, 0);
                values.resize(chunk * vs, 0);
            }
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) | Some(524 /* ENOTSUPP */) if first => {
                return Ok(false)
            }
            _ => return Err(err.unwrap_or_else(|| io::Error::other("batch lookup"))),
        }
    }
}

impl MapWriter for AyaMaps {
    fn purge_udp_flows(&mut self, backend_ids: &BTreeSet<u32>) -> Result<usize, WriteError> {
        // Collect first: deleting while iterating a hash map can skip or repeat keys.
        let mut doomed = Vec::new();
        self.ct.for_each(|k, v| {
            if k.proto == weir_common::PROTO_UDP && backend_ids.contains(&v.backend_id) {
                doomed.push(k);
            }
        })?;
        self.ct.delete(&doomed)?;
        Ok(doomed.len())
    }
    fn put_backend(&mut self, id: u32, be: &Backend) -> Result<(), WriteError> {
        let what = format!("backend {id}");
        self.backends
            .insert(id, be, 0)
            .map_err(failed(map_names::BACKENDS, "insert", what))
    }
    fn del_backend(&mut self, id: u32) -> Result<(), WriteError> {
        let what = format!("backend {id}");
        ignore_missing(self.backends.remove(&id)).map_err(failed(
            map_names::BACKENDS,
            "remove",
            what,
        ))
    }
    fn put_svc(&mut self, key: &SvcKey, val: &SvcValue) -> Result<(), WriteError> {
        self.svc
            .insert(key, val, 0)
            .map_err(failed(map_names::SVC, "insert", describe_key(key)))
    }
    fn del_svc(&mut self, key: &SvcKey) -> Result<(), WriteError> {
        ignore_missing(self.svc.remove(key)).map_err(failed(
            map_names::SVC,
            "remove",
            describe_key(key),
        ))
    }
    fn put_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), WriteError> {
        let what = format!("service {svc_id}");
        self.maglev
            .insert(svc_id, table, 0)
            .map_err(failed(map_names::MAGLEV, "insert", what))
    }
    fn del_maglev(&mut self, svc_id: u32) -> Result<(), WriteError> {
        let what = format!("service {svc_id}");
        ignore_missing(self.maglev.remove(&svc_id)).map_err(failed(
            map_names::MAGLEV,
            "remove",
            what,
        ))
    }
    fn put_vipnet(&mut self, word: u32, bits: u64) -> Result<(), WriteError> {
        self.vipnet.set(word, bits, 0).map_err(failed(
            map_names::VIPNET,
            "set",
            format!("word {word}"),
        ))
    }
    fn dump(&self) -> Result<Programmed, WriteError> {
        let err = |map, source| failed(map, "iterate", String::new())(source);
        let mut out = Programmed::default();
        for kv in self.svc.iter() {
            let (k, v) = kv.map_err(|e| err(map_names::SVC, e))?;
            out.svc.insert(SvcKeyOrd::from(&k), v);
        }
        for kv in self.backends.iter() {
            let (k, v) = kv.map_err(|e| err(map_names::BACKENDS, e))?;
            out.backends.insert(k, v);
        }
        for w in 0..weir_common::VIPNET_WORDS {
            let bits = self
                .vipnet
                .get(&w, 0)
                .map_err(|e| err(map_names::VIPNET, e))?;
            if bits != 0 {
                out.vipnet.insert(w, bits);
            }
        }
        for kv in self.maglev.iter() {
            let (k, v) = kv.map_err(|e| err(map_names::MAGLEV, e))?;
            out.maglev
                .insert(k, v.backends[..weir_common::MAGLEV_M].to_vec());
        }
        Ok(out)
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// In-memory maps for tests. After every write it checks what a concurrent reader relies on:
/// every slot 1..=count of a master exists and names a backend that exists, and every Maglev
/// entry names a backend that exists. A violation is recorded, never silently accepted.
#[derive(Debug, Default)]
pub struct FakeMaps {
    pub state: Programmed,
    pub writes: usize,
    pub violations: Vec<String>,
    /// Fail the write with this index (0-based), to test partial failures.
    pub fail_at: Option<usize>,
    /// The backend ids whose UDP flows were purged, in order.
    pub purged: Vec<u32>,
}

impl FakeMaps {
    fn step(&mut self) -> Result<(), WriteError> {
        let n = self.writes;
        self.writes += 1;
        if self.fail_at == Some(n) {
            return Err(WriteError::Map {
                map: "FAKE",
                op: "write",
                what: format!("write #{n}"),
                source: Box::new(MapError::KeyNotFound),
            });
        }
        Ok(())
    }

    fn check(&mut self) {
        let st = &self.state;
        for (k, v) in st.svc.iter().filter(|(k, _)| k.4 == 0) {
            for slot in 1..=v.count {
                let sk = SvcKeyOrd(k.0, k.1, k.2, k.3, slot);
                match st.svc.get(&sk) {
                    None => self
                        .violations
                        .push(format!("after write {}: {sk:?} missing", self.writes)),
                    Some(s) if !st.backends.contains_key(&s.backend_id) => {
                        self.violations.push(format!(
                            "after write {}: {sk:?} -> backend {} missing",
                            self.writes, s.backend_id
                        ))
                    }
                    _ => {}
                }
            }
        }
        for (k, _) in st.svc.iter().filter(|(k, _)| k.4 == 0) {
            let a = weir_common::Addr(k.0);
            if a.is_v4() {
                let (w, bit) = weir_common::vipnet_slot(a.v4_octets());
                if st.vipnet.get(&w).copied().unwrap_or(0) & bit == 0 {
                    self.violations.push(format!(
                        "after write {}: service {k:?} outside the VIPNET bitmap",
                        self.writes
                    ));
                }
            }
        }
        for (svc, table) in &st.maglev {
            if let Some(bad) = table.iter().find(|id| !st.backends.contains_key(id)) {
                self.violations.push(format!(
                    "after write {}: maglev {svc} -> backend {bad} missing",
                    self.writes
                ));
            }
        }
    }
}

impl MapWriter for FakeMaps {
    fn purge_udp_flows(&mut self, backend_ids: &BTreeSet<u32>) -> Result<usize, WriteError> {
        self.purged.extend(backend_ids);
        Ok(0)
    }
    fn put_backend(&mut self, id: u32, be: &Backend) -> Result<(), WriteError> {
        self.step()?;
        self.state.backends.insert(id, *be);
        self.check();
        Ok(())
    }
    fn del_backend(&mut self, id: u32) -> Result<(), WriteError> {
        self.step()?;
        self.state.backends.remove(&id);
        self.check();
        Ok(())
    }
    fn put_svc(&mut self, key: &SvcKey, val: &SvcValue) -> Result<(), WriteError> {
        self.step()?;
        self.state.svc.insert(key.into(), *val);
        self.check();
        Ok(())
    }
    fn del_svc(&mut self, key: &SvcKey) -> Result<(), WriteError> {
        self.step()?;
        self.state.svc.remove(&key.into());
        self.check();
        Ok(())
    }
    fn put_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), WriteError> {
        self.step()?;
        self.state
            .maglev
            .insert(svc_id, table.backends[..weir_common::MAGLEV_M].to_vec());
        self.check();
        Ok(())
    }
    fn del_maglev(&mut self, svc_id: u32) -> Result<(), WriteError> {
        self.step()?;
        self.state.maglev.remove(&svc_id);
        self.check();
        Ok(())
    }
    fn put_vipnet(&mut self, word: u32, bits: u64) -> Result<(), WriteError> {
        self.step()?;
        if bits == 0 {
            self.state.vipnet.remove(&word);
        } else {
            self.state.vipnet.insert(word, bits);
        }
        self.check();
        Ok(())
    }
    fn dump(&self) -> Result<Programmed, WriteError> {
        Ok(self.state.clone())
    }
}
