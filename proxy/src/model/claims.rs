//! Frontends two Services claim (an external IP or a load balancer address shared, with the
//! same port), and the per-Service bookkeeping that turns one Service's rebuilt model into map
//! changes.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;

use super::{Desired, Frontend, ServiceSpec};

/// Which of the Services claiming one frontend (an external IP or a load balancer address
/// two Services share, with the same port) keeps it: the oldest (`creationTimestamp`), then
/// the first by `namespace/name`. The others keep their other frontends, and a problem says
/// what they lost; when the holder goes, the next one takes the frontend over.
pub type Rank = (Option<i128>, String);

pub fn rank_of(svc: &Service, id: &str) -> Rank {
    (
        svc.metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_nanosecond()),
        id.to_string(),
    )
}

/// Every Service's frontends, claimed, by `namespace/name`.
pub type Claims = BTreeMap<String, (Rank, Desired)>;

/// The frontends each Service claims, and who holds each: turns one Service's rebuilt model
/// into map changes, so that a watch event costs what its Service costs, not what the cluster
/// does. Kept compact (it lives as long as the agent, one entry per Service and per frontend):
/// each Service's frontends as a sorted vector, each frontend's claimants as a sorted vector
/// (one, unless Services share it), not as maps whose nodes hold room for eleven.
#[derive(Debug, Default)]
pub struct ByService {
    claims: BTreeMap<String, (Rank, Vec<(Frontend, ServiceSpec)>)>,
    holders: BTreeMap<Frontend, Vec<Rank>>,
}

impl ByService {
    pub fn new(claims: Claims) -> Self {
        let mut by = ByService::default();
        for (service, (rank, d)) in claims {
            by.claim(&service, rank, d);
        }
        by
    }

    fn claim(&mut self, service: &str, rank: Rank, d: Desired) {
        for fe in d.keys() {
            let h = self.holders.entry(*fe).or_default();
            if let Err(at) = h.binary_search(&rank) {
                h.insert(at, rank.clone());
            }
        }
        // In the map's order: sorted by frontend.
        let mut v: Vec<(Frontend, ServiceSpec)> = d.into_iter().collect();
        v.shrink_to_fit();
        self.claims.insert(service.to_string(), (rank, v));
    }

    /// `service`'s spec for `fe`, if it claims it.
    fn spec_of(&self, service: &str, fe: &Frontend) -> Option<&ServiceSpec> {
        let (_, v) = self.claims.get(service)?;
        let at = v.binary_search_by(|(f, _)| f.cmp(fe)).ok()?;
        Some(&v[at].1)
    }

    /// What the maps hold for `fe`: the spec of its oldest claimant.
    fn held(&self, fe: &Frontend) -> Option<&ServiceSpec> {
        let (_, holder) = self.holders.get(fe)?.first()?;
        self.spec_of(holder, fe)
    }

    /// Replaces `service`'s claims with `new` (None: the Service is gone or skipped); returns
    /// the frontends to write (new or different, a frontend passed on to the next claimant
    /// included), those to remove, and those `service` claims that an older Service holds.
    pub fn replace(
        &mut self,
        service: &str,
        new: Option<(Rank, Desired)>,
    ) -> (Desired, Vec<Frontend>, Vec<(Frontend, String)>) {
        let mut touched: BTreeSet<Frontend> = BTreeSet::new();
        if let Some((_, v)) = self.claims.get(service) {
            touched.extend(v.iter().map(|(fe, _)| *fe));
        }
        if let Some((_, d)) = &new {
            touched.extend(d.keys().copied());
        }
        let before: BTreeMap<Frontend, Option<ServiceSpec>> = touched
            .iter()
            .map(|fe| (*fe, self.held(fe).cloned()))
            .collect();
        if let Some((rank, v)) = self.claims.remove(service) {
            for (fe, _) in &v {
                if let Some(h) = self.holders.get_mut(fe) {
                    h.retain(|r| *r != rank);
                    if h.is_empty() {
                        self.holders.remove(fe);
                    }
                }
            }
        }
        if let Some((rank, d)) = new {
            self.claim(service, rank, d);
        }
        let (mut changed, mut removed, mut lost) = (Desired::new(), Vec::new(), Vec::new());
        for (fe, was) in before {
            match (was, self.held(&fe)) {
                (Some(_), None) => removed.push(fe),
                (was, Some(now)) if was.as_ref() != Some(now) => {
                    changed.insert(fe, now.clone());
                }
                _ => {}
            }
            if let Some((_, holder)) = self.holders.get(&fe).and_then(|h| h.first()) {
                let mine = self.spec_of(service, &fe).is_some();
                if mine && holder != service {
                    lost.push((fe, holder.clone()));
                }
            }
        }
        (changed, removed, lost)
    }
}
