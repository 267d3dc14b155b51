//! The result of ADD, in the format of the version the runtime asked for.
//!
//! 0.3.x and 0.4.0 give every IP a `version` field; 1.0.0 dropped it; 1.1.0 added an
//! interface's `mtu`. A `prevResult` of any of these versions reads into the same struct.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    config::Version,
    error::{code, CniError, Result},
};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR notation: the address and its prefix length.
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Reads a `prevResult` of any supported version.
    pub fn from_prev(v: &Value) -> Result<CniResult> {
        serde_json::from_value(v.clone())
            .map_err(|e| CniError::new(code::DECODE, format!("prevResult: {e}")))
    }

    /// Appends `mine` after what an earlier plugin of the chain returned, shifting the
    /// interface indices of `mine` past the earlier interfaces.
    pub fn chain(mut self, mine: CniResult) -> CniResult {
        let offset = self.interfaces.len();
        self.interfaces.extend(mine.interfaces);
        self.ips.extend(mine.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        for r in mine.routes {
            if !self.routes.contains(&r) {
                self.routes.push(r);
            }
        }
        if self.dns == Dns::default() {
            self.dns = mine.dns;
        }
        self
    }

    /// The JSON the runtime gets, in the format of `version`.
    pub fn to_json(&self, version_str: &str, version: Version) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut i = i.clone();
                if version < Version::V1_1_0 {
                    i.mtu = None;
                }
                json!(i)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut v = json!(ip);
                if version < Version::V1_0_0 {
                    let fam = if ip.address.contains(':') { "6" } else { "4" };
                    v["version"] = fam.into();
                }
                v
            })
            .collect();
        let mut out = json!({
            "cniVersion": version_str,
            "interfaces": interfaces,
            "ips": ips,
        });
        if !self.routes.is_empty() {
            out["routes"] = json!(self.routes);
        }
        out["dns"] = json!(self.dns);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "weirabc".into(),
                    mac: "02:00:00:00:00:01".into(),
                    mtu: Some(1500),
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: "02:00:00:00:00:02".into(),
                    mtu: Some(1500),
                    sandbox: Some("/run/netns/p".into()),
                },
            ],
            ips: vec![IpConfig {
                address: "198.18.1.5/32".into(),
                gateway: Some("169.254.1.1".parse().unwrap()),
                interface: Some(1),
            }],
            routes: vec![Route {
                dst: "0.0.0.0/0".into(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn each_version_gets_its_own_format() {
        let r = sample();
        let old = r.to_json("0.3.1", Version(0, 3, 1));
        assert_eq!(old["ips"][0]["version"], "4");
        assert!(old["interfaces"][0].get("mtu").is_none());
        let v1 = r.to_json("1.0.0", Version::V1_0_0);
        assert!(v1["ips"][0].get("version").is_none());
        assert!(v1["interfaces"][1].get("mtu").is_none());
        let v11 = r.to_json("1.1.0", Version::V1_1_0);
        assert_eq!(v11["interfaces"][1]["mtu"], 1500);
        assert_eq!(v11["cniVersion"], "1.1.0");
        // What we print reads back as a prevResult, whatever its version.
        for v in [old, v1, v11] {
            let back = CniResult::from_prev(&v).unwrap();
            assert_eq!(back.ips, r.ips);
        }
    }

    #[test]
    fn chaining_keeps_the_earlier_result_first() {
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "net0".into(),
                ..Interface::default()
            }],
            dns: Dns {
                nameservers: vec!["198.18.0.53".into()],
                ..Dns::default()
            },
            ..CniResult::default()
        };
        let out = prev.chain(sample());
        assert_eq!(out.interfaces.len(), 3);
        assert_eq!(out.interfaces[0].name, "net0");
        assert_eq!(out.ips[0].interface, Some(2));
        assert_eq!(out.dns.nameservers, vec!["198.18.0.53".to_string()]);
    }
}
