//! An in-memory map writer that checks, after every single write, that a reader can never
//! follow a slot to nothing: what the programmer's tests run against.
use std::collections::BTreeSet;

use aya::maps::MapError;
use weir_common::{Backend, MaglevTable, SvcKey, SvcValue};
use weir_proxy::datapath::{MapWriter, Programmed, SvcKeyOrd, WriteError};

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
                error: Box::new(MapError::KeyNotFound),
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
