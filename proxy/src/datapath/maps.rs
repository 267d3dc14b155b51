//! The typed map writer: what the programmer asks of the service maps, and its implementation
//! over the pinned kernel maps (an in-memory one that checks every intermediate state is in
//! `weir-testkit`).
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use aya::maps::{Array, HashMap, MapData};
use weir_common::{map_names, Backend, MaglevTable, SvcKey, SvcValue};

use super::{
    addr::to_ip,
    conntrack::Conntrack,
    pinned::{failed, ignore_missing, open_typed},
};
pub use crate::error::WriteError;
use crate::model::proto_name;

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
        to_ip(&k.addr),
        u16::from_be(k.port),
        proto_name(k.proto),
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
