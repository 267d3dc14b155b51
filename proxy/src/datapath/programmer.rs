//! From the desired frontends to map writes: a diff against what is programmed, applied
//! make-before-break (backends, then slots, then the master entry; removals in reverse), so a
//! packet or socket looking a service up at any moment finds a complete, valid entry.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
};

use weir_common::{
    Backend, MaglevTable, SvcKey, SvcValue, MAGLEV_M, MAGLEV_TABLE_LEN, SVC_F_AFFINITY,
    SVC_F_DROP_EMPTY, SVC_F_MAGLEV,
};

use super::{
    addr::{to_addr, to_ip},
    maglev,
    maps::{MapWriter, SvcKeyOrd, WriteError},
};
use crate::model::{Desired, Frontend, ServiceSpec};

/// The key of `fe`'s entry in the service map: slot 0 is the master, 1..=n the backends.
pub fn svc_key(fe: &Frontend, slot: u16) -> SvcKey {
    SvcKey {
        addr: to_addr(fe.ip),
        port: fe.port.to_be(),
        proto: fe.proto,
        scope: fe.scope,
        slot,
        _pad: 0,
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    svc_id: u32,
    flags: u16,
    timeout: u32,
    slots: Vec<u32>,
    /// A write failed half-way: the maps hold a valid mix of old and new, and the next apply
    /// rewrites every slot.
    dirty: bool,
}

/// A backend id belongs to one frontend: when an endpoint leaves a service its id goes, even
/// if the same pod still serves another service. The data path relies on that: session
/// affinity and a socket's remembered backend are valid exactly while their id exists.
/// The backend's address as an address and a port: a `SocketAddr` carries IPv6's flow
/// information and scope too, and there are two maps of these per backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct BackendKey(Frontend, IpAddr, u16);

impl BackendKey {
    fn new(fe: Frontend, sa: SocketAddr) -> Self {
        BackendKey(fe, sa.ip(), sa.port())
    }
}

/// What one `apply` changed.
#[derive(Debug, Default)]
pub struct ApplyStats {
    pub services_changed: usize,
    pub services_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    /// Conntrack entries of UDP flows to removed backends, removed.
    pub flows_purged: usize,
    pub writes: usize,
    /// What could not be written. Everything else is programmed.
    pub errors: Vec<ApplyError>,
}

impl ApplyStats {
    /// The frontends not (fully) programmed: (service port name, what went wrong).
    pub fn failed(&self) -> Vec<(String, String)> {
        self.errors
            .iter()
            .filter_map(|e| match e {
                ApplyError::Frontend {
                    service,
                    frontend,
                    problem,
                } => Some((service.clone(), format!("{frontend}: {problem}"))),
                _ => None,
            })
            .collect()
    }
}

/// A write the programmer could not make. The maps stay readable (make-before-break), and
/// the next apply tries again.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// A frontend not (fully) programmed.
    #[error("service {service} ({frontend}): {problem}")]
    Frontend {
        /// `namespace/name:port`.
        service: String,
        frontend: Frontend,
        problem: FrontendProblem,
    },
    /// A frontend no longer wanted that could not be removed.
    #[error("remove {frontend}: {error}")]
    Remove {
        frontend: Frontend,
        error: WriteError,
    },
    /// A word of the service-prefix bitmap, or a backend no slot points at any more.
    #[error("{0}")]
    Map(WriteError),
    #[error("purge UDP flows of removed backends: {0}")]
    Purge(WriteError),
}

/// Why one frontend is not (fully) programmed.
#[derive(Debug, thiserror::Error)]
pub enum FrontendProblem {
    #[error("{0}")]
    Write(#[from] WriteError),
    #[error("{0} endpoints, more than {max} supported", max = u16::MAX)]
    TooManyEndpoints(usize),
    /// Programmed without these.
    #[error("endpoints of the wrong address family skipped: {}", list(.0))]
    WrongFamily(Vec<SocketAddr>),
}

fn list(v: &[SocketAddr]) -> String {
    v.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// How full the maps the programmer writes are.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MapFill {
    pub service_slots: usize,
    pub backends: usize,
    pub maglev_services: usize,
}

/// Knows what is in the maps and moves them to the desired state.
#[derive(Debug, Default)]
pub struct Programmer {
    services: BTreeMap<Frontend, Programmed>,
    /// What the service-prefix bitmap holds (non-zero words).
    vipnet: BTreeMap<u32, u64>,
    backend_ids: HashMap<BackendKey, u32>,
    /// The same, by id.
    backend_keys: HashMap<u32, BackendKey>,
    /// Backends found in the maps that no slot points at (a previous run stopped between
    /// writing a backend and its slot): removed on the next clean pass.
    orphans: BTreeSet<u32>,
    /// The next backend and service ids to hand out (see [`Ids`]).
    backend_ids_next: Ids,
    svc_ids_next: Ids,
    /// UDP backends released since the last `take_udp_backends_gone`, as (frontend, backend):
    /// sockets the hooks connected to them through that frontend are aborted (`sockterm`).
    udp_gone: Vec<(SocketAddr, SocketAddr)>,
}

/// Hands out ids upwards from 1. Past `u32::MAX` it starts again at 1 and skips the ids still
/// in use: an id comes back only after every other one was handed out (the conntrack and
/// affinity entries that named it are long gone by then), and never onto a live one. Until the
/// first wrap every id from `next` on is free, and nothing is looked up.
#[derive(Debug, Default, Clone, Copy)]
struct Ids {
    next: u32,
    wrapped: bool,
}

impl Ids {
    /// Notes an id found in use (adoption): the next ones come after it.
    fn past(&mut self, id: u32) {
        if id == u32::MAX {
            self.next = 1;
            self.wrapped = true;
        } else if !self.wrapped {
            self.next = self.next.max(id + 1);
        }
    }

    /// The next id that `taken` does not hold.
    fn take(&mut self, taken: impl Fn(u32) -> bool) -> u32 {
        loop {
            let id = self.next.max(1);
            if id == u32::MAX {
                self.next = 1;
                self.wrapped = true;
            } else {
                self.next = id + 1;
            }
            if !self.wrapped || !taken(id) {
                return id;
            }
        }
    }
}

impl Programmer {
    /// Starts from what the maps already hold (a previous run's work): nothing is flushed, the
    /// next `apply` changes only the difference.
    pub fn adopt(writer: &dyn MapWriter) -> Result<Self, WriteError> {
        let dump = writer.dump()?;
        let mut p = Programmer {
            vipnet: dump.vipnet.clone(),
            ..Default::default()
        };
        for id in dump.backends.keys() {
            p.backend_ids_next.past(*id);
        }
        let mut referenced = BTreeSet::new();
        for (k, v) in dump.svc.iter().filter(|(k, _)| k.4 == 0) {
            let fe = Frontend {
                ip: to_ip(&weir_common::Addr(k.0)),
                port: k.1,
                proto: k.2,
                scope: k.3,
            };
            let slots: Vec<u32> = (1..=v.count)
                .filter_map(|s| dump.svc.get(&SvcKeyOrd(k.0, k.1, k.2, k.3, s)))
                .map(|s| s.backend_id)
                .collect();
            for id in &slots {
                if let Some(be) = dump.backends.get(id) {
                    let sa = SocketAddr::new(to_ip(&be.addr), u16::from_be(be.port));
                    p.backend_ids.insert(BackendKey::new(fe, sa), *id);
                    p.backend_keys.insert(*id, BackendKey::new(fe, sa));
                    referenced.insert(*id);
                }
            }
            p.svc_ids_next.past(v.svc_id);
            p.services.insert(
                fe,
                Programmed {
                    svc_id: v.svc_id,
                    flags: v.flags,
                    timeout: v.affinity_timeout_s,
                    slots,
                    dirty: false,
                },
            );
        }
        p.orphans = dump
            .backends
            .keys()
            .filter(|id| !referenced.contains(id))
            .copied()
            .collect();
        Ok(p)
    }

    /// The UDP backends released since the last call, as (frontend, backend).
    pub fn take_udp_backends_gone(&mut self) -> Vec<(SocketAddr, SocketAddr)> {
        std::mem::take(&mut self.udp_gone)
    }

    pub fn programmed_frontends(&self) -> impl Iterator<Item = &Frontend> {
        self.services.keys()
    }

    /// Entries this programmer keeps in the service, backend and Maglev maps.
    pub fn fill(&self) -> MapFill {
        MapFill {
            service_slots: self.services.values().map(|p| 1 + p.slots.len()).sum(),
            backends: self.backend_ids.len(),
            maglev_services: self
                .services
                .values()
                .filter(|p| p.flags & SVC_F_MAGLEV != 0)
                .count(),
        }
    }

    /// Moves the maps to `desired`. A frontend that fails is reported in the stats and left as
    /// it was; it never stops the others.
    pub fn apply(&mut self, desired: &Desired, w: &mut dyn MapWriter) -> ApplyStats {
        let mut st = ApplyStats::default();
        let mut counter = CountingWriter {
            inner: w,
            writes: 0,
        };
        // Prefix bits first, for the old and the new frontends; cleared at the end.
        let union = vipnet_of(self.services.keys().chain(desired.keys()));
        if let Err(e) = self.write_vipnet(&union, &mut counter) {
            st.errors.push(ApplyError::Map(e));
            st.writes = counter.writes;
            return st;
        }
        for (fe, spec) in desired {
            if let Err(e) = self.apply_one(fe, spec, &mut counter, &mut st) {
                st.errors.push(ApplyError::Frontend {
                    service: spec.name.clone(),
                    frontend: *fe,
                    problem: e,
                });
            }
        }
        let stale: Vec<Frontend> = self
            .services
            .keys()
            .filter(|fe| !desired.contains_key(fe))
            .copied()
            .collect();
        for fe in stale {
            match self.remove_one(&fe, &mut counter) {
                Ok(()) => st.services_removed += 1,
                Err(error) => st.errors.push(ApplyError::Remove {
                    frontend: fe,
                    error,
                }),
            }
        }
        let now = vipnet_of(self.services.keys());
        if let Err(e) = self.write_vipnet(&now, &mut counter) {
            st.errors.push(ApplyError::Map(e));
        }
        // Backends last: nothing points at them any more. After a failed write the maps may
        // still point at backends this state no longer lists, so none is removed until a clean
        // pass.
        if self.services.values().any(|p| p.dirty) {
            st.writes = counter.writes;
            return st;
        }
        let used: BTreeSet<u32> = self
            .services
            .values()
            .flat_map(|p| p.slots.iter().copied())
            .collect();
        let unused: Vec<u32> = self
            .backend_ids
            .values()
            .filter(|id| !used.contains(id))
            .copied()
            .collect();
        let orphans: BTreeSet<u32> = std::mem::take(&mut self.orphans)
            .into_iter()
            .filter(|id| !used.contains(id))
            .collect();
        let failed = self.release_backends(
            unused.into_iter().chain(orphans.iter().copied()),
            &mut counter,
            &mut st,
        );
        // An orphan that could not be deleted stays one, for the next clean pass.
        self.orphans
            .extend(failed.into_iter().filter(|id| orphans.contains(id)));
        st.writes = counter.writes;
        st
    }

    /// Deletes backends no slot points at any more, forgets them, and purges the conntrack
    /// entries of the UDP ones (an orphan's protocol is unknown: it is purged too). TCP
    /// backends need no purge, and skipping it spares a walk of the whole conntrack map on
    /// every endpoint change. Returns the ids that could not be deleted.
    fn release_backends(
        &mut self,
        ids: impl IntoIterator<Item = u32>,
        w: &mut dyn MapWriter,
        st: &mut ApplyStats,
    ) -> Vec<u32> {
        let mut udp = BTreeSet::new();
        let mut failed = Vec::new();
        for id in ids {
            match w.del_backend(id) {
                Ok(()) => {
                    st.backends_removed += 1;
                    let key = self.backend_keys.remove(&id);
                    if let Some(k) = &key {
                        self.backend_ids.remove(k);
                    }
                    if key.is_none_or(|k| k.0.proto == weir_common::PROTO_UDP) {
                        udp.insert(id);
                    }
                    if let Some(BackendKey(fe, ip, port)) = key {
                        if fe.proto == weir_common::PROTO_UDP {
                            self.udp_gone
                                .push((SocketAddr::new(fe.ip, fe.port), SocketAddr::new(ip, port)));
                        }
                    }
                }
                Err(e) => {
                    st.errors.push(ApplyError::Map(e));
                    failed.push(id);
                }
            }
        }
        if !udp.is_empty() {
            match w.purge_udp_flows(&udp) {
                Ok(n) => st.flows_purged = n,
                Err(e) => st.errors.push(ApplyError::Purge(e)),
            }
        }
        failed
    }

    /// Moves only the frontends named: `changed` are programmed as given, `removed` are taken
    /// out, and the others are not looked at. This is what a watch event needs: the cost
    /// follows the size of the change, not the number of services. The same order as
    /// [`Programmer::apply`] (make-before-break; backends last; UDP flows of removed
    /// backends purged).
    pub fn apply_changes(
        &mut self,
        changed: &Desired,
        removed: &[Frontend],
        w: &mut dyn MapWriter,
    ) -> ApplyStats {
        let mut st = ApplyStats::default();
        let mut counter = CountingWriter {
            inner: w,
            writes: 0,
        };
        let mut want = self.vipnet.clone();
        for (word, bits) in vipnet_of(changed.keys()) {
            *want.entry(word).or_insert(0) |= bits;
        }
        if let Err(e) = self.write_vipnet(&want, &mut counter) {
            st.errors.push(ApplyError::Map(e));
            st.writes = counter.writes;
            return st;
        }
        let touched: Vec<Frontend> = changed.keys().chain(removed).copied().collect();
        let before: BTreeSet<u32> = touched
            .iter()
            .filter_map(|fe| self.services.get(fe))
            .flat_map(|p| p.slots.iter().copied())
            .collect();
        for (fe, spec) in changed {
            if let Err(e) = self.apply_one(fe, spec, &mut counter, &mut st) {
                st.errors.push(ApplyError::Frontend {
                    service: spec.name.clone(),
                    frontend: *fe,
                    problem: e,
                });
            }
        }
        for fe in removed.iter().filter(|fe| !changed.contains_key(fe)) {
            if !self.services.contains_key(fe) {
                continue;
            }
            match self.remove_one(fe, &mut counter) {
                Ok(()) => st.services_removed += 1,
                Err(error) => st.errors.push(ApplyError::Remove {
                    frontend: *fe,
                    error,
                }),
            }
        }
        if !removed.is_empty() {
            let now = vipnet_of(self.services.keys());
            if let Err(e) = self.write_vipnet(&now, &mut counter) {
                st.errors.push(ApplyError::Map(e));
            }
        }
        if touched
            .iter()
            .any(|fe| self.services.get(fe).is_some_and(|p| p.dirty))
        {
            st.writes = counter.writes;
            return st;
        }
        // Each backend id belongs to one frontend: the ids the touched frontends dropped are
        // used by nobody.
        let after: BTreeSet<u32> = touched
            .iter()
            .filter_map(|fe| self.services.get(fe))
            .flat_map(|p| p.slots.iter().copied())
            .collect();
        let dropped: Vec<u32> = before.difference(&after).copied().collect();
        self.release_backends(dropped, &mut counter, &mut st);
        st.writes = counter.writes;
        st
    }

    /// Writes the words of `want` that differ from what the bitmap holds.
    fn write_vipnet(
        &mut self,
        want: &BTreeMap<u32, u64>,
        w: &mut dyn MapWriter,
    ) -> Result<(), WriteError> {
        let words: BTreeSet<u32> = want.keys().chain(self.vipnet.keys()).copied().collect();
        for word in words {
            let (have, bits) = (
                self.vipnet.get(&word).copied().unwrap_or(0),
                want.get(&word).copied().unwrap_or(0),
            );
            if have != bits {
                w.put_vipnet(word, bits)?;
                if bits == 0 {
                    self.vipnet.remove(&word);
                } else {
                    self.vipnet.insert(word, bits);
                }
            }
        }
        Ok(())
    }

    fn backend_id(
        &mut self,
        fe: &Frontend,
        sa: SocketAddr,
        w: &mut dyn MapWriter,
        st: &mut ApplyStats,
    ) -> Result<u32, WriteError> {
        let key = BackendKey::new(*fe, sa);
        let proto = fe.proto;
        if let Some(id) = self.backend_ids.get(&key) {
            return Ok(*id);
        }
        let (keys, orphans) = (&self.backend_keys, &self.orphans);
        let id = self
            .backend_ids_next
            .take(|id| keys.contains_key(&id) || orphans.contains(&id));
        let be = Backend {
            addr: to_addr(sa.ip()),
            port: sa.port().to_be(),
            proto,
            flags: 0,
        };
        w.put_backend(id, &be)?;
        self.backend_ids.insert(key, id);
        self.backend_keys.insert(id, key);
        st.backends_added += 1;
        Ok(id)
    }

    fn apply_one(
        &mut self,
        fe: &Frontend,
        spec: &ServiceSpec,
        w: &mut dyn MapWriter,
        st: &mut ApplyStats,
    ) -> Result<(), FrontendProblem> {
        let mut slots = Vec::with_capacity(spec.backends.len());
        let mut names = Vec::with_capacity(spec.backends.len());
        let mut wrong_family = Vec::new();
        let mut sorted = spec.backends.clone();
        sorted.sort();
        sorted.dedup();
        for be in sorted {
            if be.is_ipv4() != fe.ip.is_ipv4() {
                wrong_family.push(be);
                continue;
            }
            let id = self.backend_id(fe, be, w, st)?;
            slots.push(id);
            names.push((be.to_string(), id));
        }
        if slots.len() > u16::MAX as usize {
            return Err(FrontendProblem::TooManyEndpoints(slots.len()));
        }
        let mut flags = 0;
        if spec.drop_when_empty {
            flags |= SVC_F_DROP_EMPTY;
        }
        if spec.maglev {
            flags |= SVC_F_MAGLEV;
        }
        if spec.node_local {
            flags |= weir_common::SVC_F_NODE_LOCAL;
        }
        let timeout = spec.affinity_timeout_s.unwrap_or(0);
        if spec.affinity_timeout_s.is_some() {
            flags |= SVC_F_AFFINITY;
        }
        let old = self.services.get(fe).cloned();
        let unchanged = old.as_ref().is_some_and(|o| {
            !o.dirty && o.slots == slots && o.flags == flags && o.timeout == timeout
        });
        if !unchanged {
            let svc_id = old.as_ref().map(|o| o.svc_id).unwrap_or_else(|| {
                let services = &self.services;
                self.svc_ids_next
                    .take(|id| services.values().any(|p| p.svc_id == id))
            });
            let old_slots = old.as_ref().map(|o| o.slots.clone()).unwrap_or_default();
            let res = write_service(fe, svc_id, flags, timeout, &slots, &names, &old, w);
            match res {
                Ok(()) => {
                    st.services_changed += 1;
                    self.services.insert(
                        *fe,
                        Programmed {
                            svc_id,
                            flags,
                            timeout,
                            slots,
                            dirty: false,
                        },
                    );
                }
                Err(e) => {
                    // Remember the longer slot list, so the retry also deletes every slot past
                    // the new count.
                    let keep = if old_slots.len() >= slots.len() {
                        old_slots
                    } else {
                        slots
                    };
                    let was_maglev = old.as_ref().is_some_and(|o| o.flags & SVC_F_MAGLEV != 0);
                    self.services.insert(
                        *fe,
                        Programmed {
                            svc_id,
                            flags: flags | if was_maglev { SVC_F_MAGLEV } else { 0 },
                            timeout,
                            slots: keep,
                            dirty: true,
                        },
                    );
                    return Err(e.into());
                }
            }
        }
        if !wrong_family.is_empty() {
            return Err(FrontendProblem::WrongFamily(wrong_family));
        }
        Ok(())
    }

    fn remove_one(&mut self, fe: &Frontend, w: &mut dyn MapWriter) -> Result<(), WriteError> {
        let Some(old) = self.services.get(fe).cloned() else {
            return Ok(());
        };
        w.del_svc(&svc_key(fe, 0))?;
        for slot in 1..=old.slots.len() as u16 {
            w.del_svc(&svc_key(fe, slot))?;
        }
        if old.flags & SVC_F_MAGLEV != 0 {
            w.del_maglev(old.svc_id)?;
        }
        self.services.remove(fe);
        Ok(())
    }
}

/// The service-prefix bitmap words for a set of frontends (IPv4 only).
fn vipnet_of<'a>(fes: impl Iterator<Item = &'a Frontend>) -> BTreeMap<u32, u64> {
    let mut out = BTreeMap::new();
    for fe in fes {
        if let IpAddr::V4(v4) = fe.ip {
            let (w, bit) = weir_common::vipnet_slot(v4.octets());
            *out.entry(w).or_insert(0) |= bit;
        }
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn write_service(
    fe: &Frontend,
    svc_id: u32,
    flags: u16,
    timeout: u32,
    slots: &[u32],
    names: &[(String, u32)],
    old: &Option<Programmed>,
    w: &mut dyn MapWriter,
) -> Result<(), WriteError> {
    let old_slots: &[u32] = old.as_ref().map(|o| o.slots.as_slice()).unwrap_or(&[]);
    let force = old.as_ref().is_some_and(|o| o.dirty);
    let old_maglev = old.as_ref().is_some_and(|o| o.flags & SVC_F_MAGLEV != 0);
    // 1. The Maglev table, complete, before the master may say "use Maglev".
    if flags & SVC_F_MAGLEV != 0 && !slots.is_empty() {
        let t = maglev::table(names);
        let mut table = MaglevTable {
            backends: [0; MAGLEV_TABLE_LEN],
        };
        table.backends[..MAGLEV_M].copy_from_slice(&t);
        w.put_maglev(svc_id, &table)?;
    }
    // 2. Slots that changed, each pointing at a backend that exists.
    for (i, id) in slots.iter().enumerate() {
        if force || old_slots.get(i) != Some(id) {
            let v = SvcValue {
                backend_id: *id,
                ..Default::default()
            };
            w.put_svc(&svc_key(fe, i as u16 + 1), &v)?;
        }
    }
    // 3. The master entry: the new count becomes visible only now.
    let master = SvcValue {
        backend_id: 0,
        count: slots.len() as u16,
        flags: if slots.is_empty() {
            flags & !SVC_F_MAGLEV
        } else {
            flags
        },
        svc_id,
        affinity_timeout_s: timeout,
    };
    w.put_svc(&svc_key(fe, 0), &master)?;
    // 4. Slots past the new count, and a table no longer used.
    for slot in slots.len() + 1..=old_slots.len() {
        w.del_svc(&svc_key(fe, slot as u16))?;
    }
    if old_maglev && (flags & SVC_F_MAGLEV == 0 || slots.is_empty()) {
        w.del_maglev(svc_id)?;
    }
    Ok(())
}

/// Counts writes passing through, for the stats.
struct CountingWriter<'a> {
    inner: &'a mut dyn MapWriter,
    writes: usize,
}

impl MapWriter for CountingWriter<'_> {
    fn put_backend(&mut self, id: u32, be: &Backend) -> Result<(), WriteError> {
        self.writes += 1;
        self.inner.put_backend(id, be)
    }
    fn del_backend(&mut self, id: u32) -> Result<(), WriteError> {
        self.writes += 1;
        self.inner.del_backend(id)
    }
    fn put_svc(&mut self, key: &SvcKey, val: &SvcValue) -> Result<(), WriteError> {
        self.writes += 1;
        self.inner.put_svc(key, val)
    }
    fn del_svc(&mut self, key: &SvcKey) -> Result<(), WriteError> {
        self.writes += 1;
        self.inner.del_svc(key)
    }
    fn put_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), WriteError> {
        self.writes += 1;
        self.inner.put_maglev(svc_id, table)
    }
    fn del_maglev(&mut self, svc_id: u32) -> Result<(), WriteError> {
        self.writes += 1;
        self.inner.del_maglev(svc_id)
    }
    fn put_vipnet(&mut self, word: u32, bits: u64) -> Result<(), WriteError> {
        self.writes += 1;
        self.inner.put_vipnet(word, bits)
    }
    fn dump(&self) -> Result<super::maps::Programmed, WriteError> {
        self.inner.dump()
    }
    fn purge_udp_flows(&mut self, backend_ids: &BTreeSet<u32>) -> Result<usize, WriteError> {
        self.inner.purge_udp_flows(backend_ids)
    }
}
