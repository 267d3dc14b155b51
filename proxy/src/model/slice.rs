//! An EndpointSlice as weir keeps and reads it: the fields the model and DNS read, and nothing
//! else (unknown fields are dropped as it is read, from the API or a file). An endpoint as
//! `k8s-openapi` declares it takes ~350 bytes before any of its strings (its `targetRef` alone
//! is seven optional strings); at 100 000 endpoints the watch's store of them was the agent's
//! largest user of memory. This one takes 80.
use std::borrow::Cow;

#[cfg(test)]
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};
use k8s_openapi::{
    api::discovery::v1::{EndpointConditions, EndpointHints, EndpointPort},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    NamespaceResourceScope,
};
use serde::Deserialize;

use super::{HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};

/// An EndpointSlice, with what weir reads of it. Its labels are kept apart, only those weir
/// reads ([`KEPT_LABELS`]): a map of one label takes a node with room for eleven (544 bytes).
#[derive(Clone, Debug, Default)]
pub struct Slice {
    /// The metadata, without its labels.
    pub metadata: ObjectMeta,
    labels: Box<[(Box<str>, Box<str>)]>,
    pub address_type: String,
    pub endpoints: Option<Box<[SliceEndpoint]>>,
    pub ports: Option<Box<[EndpointPort]>>,
}

/// The labels of a slice weir reads.
pub const KEPT_LABELS: [&str; 3] = [SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, HEADLESS_LABEL];

/// An endpoint's addresses: almost always one (the API lets clients use only the first; DNS
/// answers with all), kept without a vector for it.
#[derive(Clone, Debug)]
pub enum Addresses {
    One(Box<str>),
    Many(Box<[Box<str>]>),
}

impl Default for Addresses {
    fn default() -> Self {
        Addresses::Many(Box::new([]))
    }
}

impl Addresses {
    pub fn first(&self) -> Option<&str> {
        self.iter().next()
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let (one, many) = match self {
            Addresses::One(a) => (Some(&**a), &[][..]),
            Addresses::Many(v) => (None, &v[..]),
        };
        one.into_iter().chain(many.iter().map(|a| &**a))
    }
}

fn read_addresses<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Addresses, D::Error> {
    let v = Vec::<String>::deserialize(d)?;
    Ok(match <[String; 1]>::try_from(v) {
        Ok([one]) => Addresses::One(one.into_boxed_str()),
        Err(v) => Addresses::Many(v.into_iter().map(String::into_boxed_str).collect()),
    })
}

impl Slice {
    /// The value of one of [`KEPT_LABELS`].
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Read {
    metadata: ObjectMeta,
    #[serde(default)]
    address_type: String,
    #[serde(default)]
    endpoints: Option<Box<[SliceEndpoint]>>,
    #[serde(default)]
    ports: Option<Box<[EndpointPort]>>,
}

impl<'de> Deserialize<'de> for Slice {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut r = Read::deserialize(d)?;
        let labels = r
            .metadata
            .labels
            .take()
            .into_iter()
            .flatten()
            .filter(|(k, _)| KEPT_LABELS.contains(&k.as_str()))
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        Ok(Slice {
            metadata: r.metadata,
            labels,
            address_type: r.address_type,
            endpoints: r.endpoints,
            ports: r.ports,
        })
    }
}

/// An endpoint: its addresses, conditions, topology hints, hostname (DNS), node and zone.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SliceEndpoint {
    #[serde(deserialize_with = "read_addresses")]
    pub addresses: Addresses,
    #[serde(default)]
    pub conditions: Option<EndpointConditions>,
    #[serde(default)]
    pub hints: Option<Box<EndpointHints>>,
    #[serde(default)]
    pub hostname: Option<Box<str>>,
    #[serde(default)]
    pub node_name: Option<Box<str>>,
    #[serde(default)]
    pub zone: Option<Box<str>>,
}

#[cfg(test)]
impl Slice {
    /// The slice as `k8s-openapi` has it, for comparison.
    fn to_slice(&self) -> EndpointSlice {
        let mut metadata = self.metadata.clone();
        if !self.labels.is_empty() {
            metadata.labels = Some(
                self.labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            );
        }
        EndpointSlice {
            metadata,
            address_type: self.address_type.clone(),
            endpoints: self.endpoints.as_ref().map(|eps| {
                eps.iter()
                    .map(|e| Endpoint {
                        addresses: e.addresses.iter().map(str::to_string).collect(),
                        conditions: e.conditions.clone(),
                        hints: e.hints.as_deref().cloned(),
                        hostname: e.hostname.as_deref().map(str::to_string),
                        node_name: e.node_name.as_deref().map(str::to_string),
                        zone: e.zone.as_deref().map(str::to_string),
                        ..Default::default()
                    })
                    .collect()
            }),
            ports: self.ports.as_ref().map(|p| p.to_vec()),
        }
    }
}

impl kube::Resource for Slice {
    type DynamicType = ();
    type Scope = NamespaceResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "EndpointSlice".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "discovery.k8s.io".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn api_version(_: &()) -> Cow<'_, str> {
        "discovery.k8s.io/v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "endpointslices".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
    use super::*;

    /// What the model reads survives the trip through the store; what it does not is gone.
    #[test]
    fn a_stored_slice_gives_back_what_the_model_reads() {
        let json = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-1", "namespace": "demo",
                         "labels": {"kubernetes.io/service-name": "web"},
                         "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-12-08T00:00:00Z"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": ["198.18.1.11"], "hostname": "a", "nodeName": "node-a",
                           "zone": "z1", "conditions": {"ready": true, "serving": true, "terminating": false},
                           "hints": {"forZones": [{"name": "z1"}]},
                           "targetRef": {"kind": "Pod", "name": "web-a", "namespace": "demo", "uid": "u"},
                           "deprecatedTopology": {"k": "v"}},
                          {"addresses": ["198.18.1.12", "198.18.1.13"]},
                          {"addresses": []}]
        });
        let full: EndpointSlice = serde_json::from_value(json.clone()).unwrap();
        let stored: Slice = serde_json::from_value(json).unwrap();
        let mut want = full.clone();
        for e in want.endpoints.iter_mut().flatten() {
            e.target_ref = None;
            e.deprecated_topology = None;
        }
        assert_eq!(stored.to_slice(), want);
    }
}
