//! The network configuration the runtime passes on stdin, and the environment it sets.
//!
//! Fields shared with the reference `ptp` + `host-local` pair mean the same here: `mtu`,
//! `ipam.ranges` (or `ipam.subnet`), `ipam.routes`, `ipam.dataDir`. weir does its own IPAM, so
//! `ipam.type` may be absent or `weir`. When no range is configured, the ranges are the node's
//! `spec.podCIDRs`, read from the file the agent writes.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use ipnetwork::IpNetwork;
use serde::Deserialize;
use weir_cni_proto::{PodCidrs, DEFAULT_AGENT_SOCKET, DEFAULT_POD_CIDRS_FILE};

use crate::error::{code, CniError, Result};

/// Versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
pub const DEFAULT_DATA_DIR: &str = "/var/lib/weir/ipam";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u8, pub u8, pub u8);

impl Version {
    pub const V0_4_0: Version = Version(0, 4, 0);
    pub const V1_0_0: Version = Version(1, 0, 0);
    pub const V1_1_0: Version = Version(1, 1, 0);

    pub fn parse(s: &str) -> Result<Version> {
        if !SUPPORTED_VERSIONS.contains(&s) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!("cniVersion {s:?} is not supported"),
            )
            .details(format!("weir-cni speaks {}", SUPPORTED_VERSIONS.join(", "))));
        }
        let mut it = s.split('.').map(|p| p.parse::<u8>().unwrap_or(0));
        let mut next = || it.next().unwrap_or(0);
        Ok(Version(next(), next(), next()))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawConf {
    pub cni_version: String,
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    pub mtu: Option<u32>,
    /// The agent's socket; an empty string runs without an agent (no data path attachment).
    pub agent_socket: Option<String>,
    pub log_file: Option<PathBuf>,
    #[serde(default)]
    pub ipam: RawIpam,
    pub prev_result: Option<serde_json::Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    pub valid_attachments: Option<Vec<Attachment>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawIpam {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub ranges: Vec<Vec<RawRange>>,
    pub subnet: Option<String>,
    pub range_start: Option<String>,
    pub range_end: Option<String>,
    pub gateway: Option<String>,
    pub routes: Option<Vec<RawRoute>>,
    pub data_dir: Option<PathBuf>,
    #[serde(rename = "podCIDRsFile")]
    pub pod_cidrs_file: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawRange {
    pub subnet: String,
    pub range_start: Option<String>,
    pub range_end: Option<String>,
    pub gateway: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RawRoute {
    pub dst: String,
    pub gw: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// One contiguous pool of addresses inside a subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub subnet: IpNetwork,
    pub start: IpAddr,
    pub end: IpAddr,
    /// Never handed out (host-local's `gateway`).
    pub reserved: Option<IpAddr>,
}

/// Ranges of one family; a pod gets one address from each set.
pub type RangeSet = Vec<Range>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub dst: IpNetwork,
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone)]
pub struct NetConf {
    pub version: Version,
    pub version_str: String,
    pub name: String,
    pub mtu: Option<u32>,
    pub agent_socket: Option<PathBuf>,
    pub log_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Configured ranges; None means the node's podCIDRs from `pod_cidrs_file`.
    pub ranges: Option<Vec<RangeSet>>,
    pub pod_cidrs_file: PathBuf,
    /// Routes in the pod; None means a default route per family of the pod's addresses.
    pub routes: Option<Vec<Route>>,
    pub prev_result: Option<serde_json::Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
}

fn bad(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

fn cidr(field: &str, s: &str) -> Result<IpNetwork> {
    IpNetwork::from_str(s).map_err(|e| bad(format!("{field}: {s:?} is not a CIDR: {e}")))
}

fn addr(field: &str, s: &str) -> Result<IpAddr> {
    IpAddr::from_str(s).map_err(|e| bad(format!("{field}: {s:?} is not an address: {e}")))
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf> {
        let raw: RawConf = serde_json::from_slice(stdin)
            .map_err(|e| CniError::new(code::DECODE, format!("network configuration: {e}")))?;
        let version = Version::parse(&raw.cni_version)?;
        if raw.name.is_empty() {
            return Err(bad("network configuration: `name` is empty"));
        }
        if let Some(kind) = raw.ipam.kind.as_deref() {
            if !kind.is_empty() && kind != "weir" {
                return Err(CniError::new(
                    code::UNSUPPORTED_FIELD,
                    format!("ipam.type {kind:?}: weir-cni allocates addresses itself"),
                )
                .details("leave ipam.type out or set it to \"weir\""));
            }
        }
        if raw.mtu.is_some_and(|m| !(68..=65535).contains(&m)) {
            return Err(bad(format!(
                "mtu {}: must be between 68 and 65535",
                raw.mtu.unwrap_or(0)
            )));
        }
        let ranges = ranges(&raw.ipam)?;
        let routes = match &raw.ipam.routes {
            None => None,
            Some(rs) => Some(
                rs.iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let dst = cidr(&format!("ipam.routes[{i}].dst"), &r.dst)?;
                        let gw = match &r.gw {
                            Some(g) => Some(addr(&format!("ipam.routes[{i}].gw"), g)?),
                            None => None,
                        };
                        if gw.is_some_and(|g| g.is_ipv4() != dst.is_ipv4()) {
                            return Err(bad(format!(
                                "ipam.routes[{i}]: gw and dst are of different families"
                            )));
                        }
                        Ok(Route { dst, gw })
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
        };
        let agent_socket = match raw.agent_socket.as_deref() {
            None => Some(PathBuf::from(DEFAULT_AGENT_SOCKET)),
            Some("") => None,
            Some(p) => Some(PathBuf::from(p)),
        };
        Ok(NetConf {
            version,
            version_str: raw.cni_version,
            name: raw.name,
            mtu: raw.mtu,
            agent_socket,
            log_file: raw.log_file,
            data_dir: raw
                .ipam
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            ranges,
            pod_cidrs_file: raw
                .ipam
                .pod_cidrs_file
                .unwrap_or_else(|| PathBuf::from(DEFAULT_POD_CIDRS_FILE)),
            routes,
            prev_result: raw.prev_result,
            valid_attachments: raw.valid_attachments,
        })
    }

    /// The ranges to allocate from: configured, or the node's podCIDRs.
    pub fn range_sets(&self) -> Result<Vec<RangeSet>> {
        match &self.ranges {
            Some(r) => Ok(r.clone()),
            None => pod_cidr_ranges(&self.pod_cidrs_file),
        }
    }
}

fn ranges(ipam: &RawIpam) -> Result<Option<Vec<RangeSet>>> {
    let mut sets = Vec::new();
    if let Some(subnet) = &ipam.subnet {
        sets.push(vec![range(
            "ipam",
            &RawRange {
                subnet: subnet.clone(),
                range_start: ipam.range_start.clone(),
                range_end: ipam.range_end.clone(),
                gateway: ipam.gateway.clone(),
            },
        )?]);
    }
    for (i, set) in ipam.ranges.iter().enumerate() {
        if set.is_empty() {
            return Err(bad(format!("ipam.ranges[{i}] is empty")));
        }
        let set = set
            .iter()
            .enumerate()
            .map(|(j, r)| range(&format!("ipam.ranges[{i}][{j}]"), r))
            .collect::<Result<Vec<_>>>()?;
        if set
            .iter()
            .any(|r| r.subnet.is_ipv4() != set[0].subnet.is_ipv4())
        {
            return Err(bad(format!("ipam.ranges[{i}] mixes IPv4 and IPv6 subnets")));
        }
        sets.push(set);
    }
    Ok((!sets.is_empty()).then_some(sets))
}

/// The first and last address handed out by default: not the network address, and not the
/// broadcast address in IPv4 subnets larger than /31.
fn usable(net: IpNetwork) -> (IpAddr, IpAddr) {
    let (lo, hi) = (u(net.network()), u(broadcast(net)));
    let small = match net {
        IpNetwork::V4(n) => n.prefix() >= 31,
        IpNetwork::V6(n) => n.prefix() >= 127,
    };
    if small {
        (ip(lo, net.is_ipv4()), ip(hi, net.is_ipv4()))
    } else {
        let hi = if net.is_ipv4() { hi - 1 } else { hi };
        (ip(lo + 1, net.is_ipv4()), ip(hi, net.is_ipv4()))
    }
}

fn broadcast(net: IpNetwork) -> IpAddr {
    match net {
        IpNetwork::V4(n) => n.broadcast().into(),
        IpNetwork::V6(n) => {
            let host_bits = 128 - u32::from(n.prefix());
            let mask = if host_bits == 128 {
                u128::MAX
            } else {
                (1u128 << host_bits) - 1
            };
            std::net::Ipv6Addr::from(u128::from(n.network()) | mask).into()
        }
    }
}

pub fn u(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

pub fn ip(v: u128, v4: bool) -> IpAddr {
    if v4 {
        IpAddr::V4(std::net::Ipv4Addr::from(v as u32))
    } else {
        IpAddr::V6(std::net::Ipv6Addr::from(v))
    }
}

fn range(field: &str, r: &RawRange) -> Result<Range> {
    let subnet = cidr(&format!("{field}.subnet"), &r.subnet)?;
    // Normalise 198.18.1.7/24 to its network, as host-local does.
    let subnet = IpNetwork::new(subnet.network(), subnet.prefix())
        .map_err(|e| bad(format!("{field}.subnet: {e}")))?;
    let (first, last) = usable(subnet);
    let pick = |name: &str, v: &Option<String>, dflt: IpAddr| -> Result<IpAddr> {
        let Some(s) = v else { return Ok(dflt) };
        let a = addr(&format!("{field}.{name}"), s)?;
        if !subnet.contains(a) {
            return Err(bad(format!(
                "{field}.{name}: {a} is outside the subnet {subnet}"
            )));
        }
        Ok(a)
    };
    let start = pick("rangeStart", &r.range_start, first)?;
    let end = pick("rangeEnd", &r.range_end, last)?;
    if u(start) > u(end) {
        return Err(bad(format!(
            "{field}: rangeStart {start} is after rangeEnd {end}"
        )));
    }
    let reserved = match &r.gateway {
        Some(g) => Some(addr(&format!("{field}.gateway"), g)?),
        None => None,
    };
    Ok(Range {
        subnet,
        start,
        end,
        reserved,
    })
}

pub fn pod_cidr_ranges(file: &Path) -> Result<Vec<RangeSet>> {
    let text = std::fs::read(file).map_err(|e| {
        CniError::new(
            code::TRY_AGAIN,
            format!(
                "no ranges configured and the node's podCIDRs file {} cannot be read: {e}",
                file.display()
            ),
        )
        .details("the agent writes it once it has read its Node; or set ipam.ranges")
    })?;
    let p: PodCidrs = serde_json::from_slice(&text)
        .map_err(|e| bad(format!("podCIDRs file {}: {e}", file.display())))?;
    if p.pod_cidrs.is_empty() {
        return Err(CniError::new(
            code::TRY_AGAIN,
            format!("podCIDRs file {}: the node has no podCIDRs", file.display()),
        ));
    }
    p.pod_cidrs
        .iter()
        .map(|c| {
            range(
                &format!("podCIDRs file {}", file.display()),
                &RawRange {
                    subnet: c.clone(),
                    range_start: None,
                    range_end: None,
                    gateway: None,
                },
            )
            .map(|r| vec![r])
        })
        .collect()
}

/// The CNI specification's container id: `^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`.
pub fn valid_container_id(id: &str) -> bool {
    let mut b = id.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && b.all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

/// A name the kernel takes for an interface, as libcni checks it: 1 to 15 bytes, not `.` or
/// `..`, no `/`, `:` or whitespace.
pub fn valid_ifname(name: &str) -> bool {
    (1..=15).contains(&name.len())
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// The environment of one call (CNI spec, "Parameters").
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
}

impl Env {
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Env> {
        let command = get("CNI_COMMAND").unwrap_or_default();
        let need = |k: &str| -> Result<String> {
            match get(k) {
                Some(v) if !v.is_empty() => Ok(v),
                _ => Err(CniError::new(
                    code::INVALID_ENV,
                    format!("{k} is not set; {command} needs it"),
                )),
            }
        };
        let mut env = Env {
            command: command.clone(),
            ..Env::default()
        };
        match command.as_str() {
            "ADD" | "CHECK" | "DEL" => {
                env.container_id = need("CNI_CONTAINERID")?;
                if !valid_container_id(&env.container_id) {
                    return Err(CniError::new(
                        code::INVALID_ENV,
                        format!(
                            "CNI_CONTAINERID {:?} is not a container id: the spec allows letters, \
                             digits, '_', '.' and '-', starting with a letter or digit",
                            env.container_id
                        ),
                    ));
                }
                env.ifname = need("CNI_IFNAME")?;
                if !valid_ifname(&env.ifname) {
                    return Err(CniError::new(
                        code::INVALID_ENV,
                        format!(
                            "CNI_IFNAME {:?} is not an interface name: at most 15 bytes, not \
                             \".\" or \"..\", no '/', ':' or whitespace",
                            env.ifname
                        ),
                    ));
                }
                env.netns = match command.as_str() {
                    "DEL" => get("CNI_NETNS")
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from),
                    _ => Some(PathBuf::from(need("CNI_NETNS")?)),
                };
                need("CNI_PATH")?;
            }
            "GC" | "STATUS" => {
                need("CNI_PATH")?;
            }
            "VERSION" => {}
            "" => {
                return Err(CniError::new(code::INVALID_ENV, "CNI_COMMAND is not set"));
            }
            other => {
                return Err(CniError::new(
                    code::INVALID_ENV,
                    format!("CNI_COMMAND {other:?} is not a CNI command"),
                )
                .details("ADD, DEL, CHECK, STATUS, GC or VERSION"));
            }
        }
        Ok(env)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conf(json: &str) -> Result<NetConf> {
        NetConf::parse(json.as_bytes())
    }

    #[test]
    fn ranges_default_to_the_usable_part_of_the_subnet() {
        let c = conf(
            r#"{"cniVersion":"1.1.0","name":"n","type":"weir-cni",
                "ipam":{"ranges":[[{"subnet":"198.18.1.7/24"}],[{"subnet":"fd00:18::/120"}]]}}"#,
        )
        .unwrap();
        let sets = c.range_sets().unwrap();
        assert_eq!(sets[0][0].subnet.to_string(), "198.18.1.0/24");
        assert_eq!(sets[0][0].start.to_string(), "198.18.1.1");
        assert_eq!(sets[0][0].end.to_string(), "198.18.1.254");
        assert_eq!(sets[1][0].start.to_string(), "fd00:18::1");
        assert_eq!(sets[1][0].end.to_string(), "fd00:18::ff");
    }

    #[test]
    fn bad_configurations_name_the_field() {
        let cases = [
            (
                r#"{"cniVersion":"9.9.9","name":"n"}"#,
                1,
                "cniVersion \"9.9.9\"",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"type":"host-local"}}"#,
                2,
                "ipam.type",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"ranges":[[{"subnet":"198.18.1.0/33"}]]}}"#,
                7,
                "ipam.ranges[0][0].subnet",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"ranges":[[{"subnet":"198.18.1.0/24","rangeStart":"198.18.2.1"}]]}}"#,
                7,
                "rangeStart: 198.18.2.1 is outside",
            ),
            (
                r#"{"cniVersion":"1.0.0","name":"n","ipam":{"routes":[{"dst":"0.0.0.0/0","gw":"fd00::1"}]}}"#,
                7,
                "ipam.routes[0]",
            ),
            (r#"{"cniVersion":"1.0.0","name":"n","mtu":20}"#, 7, "mtu 20"),
            (r#"{"cniVersion":"1.0.0""#, 6, "network configuration"),
        ];
        for (json, want_code, want_msg) in cases {
            let e = conf(json).unwrap_err();
            assert_eq!(e.code, want_code, "{json}: {e}");
            assert!(e.msg.contains(want_msg), "{json}: {e}");
        }
    }

    #[test]
    fn the_environment_is_checked_per_command() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let e =
            Env::from_vars(vars(&[("CNI_COMMAND", "ADD"), ("CNI_IFNAME", "eth0")])).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_CONTAINERID"), "{e}");
        let del = Env::from_vars(vars(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]))
        .unwrap();
        assert_eq!(del.netns, None);
        let e = Env::from_vars(vars(&[("CNI_COMMAND", "FROB")])).unwrap_err();
        assert!(e.msg.contains("FROB"), "{e}");
        assert!(Env::from_vars(vars(&[("CNI_COMMAND", "VERSION")])).is_ok());
    }

    #[test]
    fn container_ids_and_interface_names_are_the_specs() {
        for ok in ["a", "0", "abc-1.2_3", "4f9a6c0e8d2b"] {
            assert!(valid_container_id(ok), "{ok:?}");
        }
        for bad in [
            "", " abc", "abc ", "abc\n", "a b", "-abc", ".abc", "_abc", "a/b", "a:b", "é",
        ] {
            assert!(!valid_container_id(bad), "{bad:?}");
        }
        for ok in ["eth0", "net1", "a", "fifteen-chars-x"] {
            assert!(valid_ifname(ok), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "eth0 ",
            "e th0",
            "eth\n0",
            "a/b",
            "a:b",
            "sixteen-chars-xx",
        ] {
            assert!(!valid_ifname(bad), "{bad:?}");
        }
        let env = |id: &str, ifname: &str| {
            let (id, ifname) = (id.to_string(), ifname.to_string());
            Env::from_vars(move |k| match k {
                "CNI_COMMAND" => Some("DEL".into()),
                "CNI_CONTAINERID" => Some(id.clone()),
                "CNI_IFNAME" => Some(ifname.clone()),
                "CNI_PATH" => Some("/opt/cni/bin".into()),
                _ => None,
            })
        };
        let e = env("abc\n", "eth0").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_CONTAINERID \"abc\\n\""), "{e}");
        let e = env("abc", "eth0 ").unwrap_err();
        assert_eq!(e.code, code::INVALID_ENV);
        assert!(e.msg.contains("CNI_IFNAME \"eth0 \""), "{e}");
        assert!(env("abc", "eth0").is_ok());
    }
}
