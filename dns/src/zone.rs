//! The cluster zone: the records the Kubernetes DNS specification (schema 1.1.0) asks for,
//! built from this crate's own view of Services and their endpoints, and the answer to a
//! question about them.
//!
//! Names are compared case-insensitively (the specification's rule): the index is keyed by
//! lower-cased names.
use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
};

use hickory_proto::{
    op::ResponseCode,
    rr::{
        rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT},
        LowerName, Name, RData, Record, RecordType,
    },
};

/// The schema version `dns-version.<zone>` answers.
pub const SCHEMA_VERSION: &str = "1.1.0";

/// A Service as the zone needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    pub kind: Kind,
    /// The Service's ports; only named ones get SRV records. A headless Service's SRV records
    /// use each endpoint's own ports where it has them.
    pub ports: Vec<Port>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A Service with cluster IPs (one per family).
    ClusterIp(Vec<IpAddr>),
    /// A headless Service: its endpoints.
    Headless(Vec<Endpoint>),
    /// `type: ExternalName`: a CNAME to this name.
    ExternalName(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Empty for an unnamed port.
    pub name: String,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    /// The Service's port for a ClusterIP Service; the endpoints' port for a headless one.
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ips: Vec<IpAddr>,
    /// The endpoint's `hostname`; without one the zone names it after its first address
    /// (`10-0-0-1`), as CoreDNS does.
    pub hostname: Option<String>,
    /// Ready, or the Service publishes not-ready addresses.
    pub ready: bool,
    /// The ports of the endpoint (its EndpointSlice's); empty: the Service's.
    pub ports: Vec<Port>,
}

/// How `<a-b-c-d>.<ns>.pod.<zone>` names are answered (CoreDNS's `pods` option).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PodMode {
    /// Not at all (CoreDNS's default): NXDOMAIN.
    #[default]
    Disabled,
    /// For any address, whether or not a pod has it (kube-dns's behaviour).
    Insecure,
}

#[derive(Clone, Debug)]
pub struct Config {
    /// The cluster domain, `cluster.local` by default.
    pub domain: Name,
    pub ttl: u32,
    pub pods: PodMode,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            domain: Name::from_ascii("cluster.local.").expect("a valid name"),
            ttl: 5,
            pods: PodMode::Disabled,
        }
    }
}

/// The records of one name, by type.
#[derive(Debug, Default)]
struct Node {
    records: Vec<Record>,
}

impl Node {
    fn of_type(&self, t: RecordType) -> impl Iterator<Item = &Record> {
        self.records.iter().filter(move |r| r.record_type() == t)
    }
}

/// What the zone says about a question.
#[derive(Debug, PartialEq)]
pub enum Answer {
    /// Records of the name (a CNAME chain's first link for an ExternalName Service).
    Records(Vec<Record>),
    /// The name exists, with no record of that type (NOERROR, SOA in authority).
    NoData,
    /// No such name in the zone (NXDOMAIN, SOA in authority).
    NxDomain,
    /// Not a name of the cluster zone, nor a reverse name it knows: for the upstream.
    NotOurs,
}

impl Answer {
    pub fn rcode(&self) -> ResponseCode {
        match self {
            Answer::NxDomain => ResponseCode::NXDomain,
            _ => ResponseCode::NoError,
        }
    }
}

/// The zone, built in one go from every Service.
#[derive(Debug)]
pub struct Zone {
    cfg: Config,
    names: HashMap<LowerName, Node>,
    /// Names that exist only because names below them do (`svc.<zone>`, `<ns>.svc.<zone>`,
    /// `_tcp.<service>…`): NODATA, not NXDOMAIN.
    interior: BTreeSet<LowerName>,
    soa: Record,
    pod_suffix: LowerName,
    /// Records built, for memory figures.
    pub record_count: usize,
}

fn name(labels: &[&str], suffix: &Name) -> Option<Name> {
    let mut n = Name::from_labels(labels.iter().map(|l| l.as_bytes())).ok()?;
    n.set_fqdn(false);
    n.append_domain(suffix).ok()
}

fn reverse(ip: IpAddr) -> Name {
    Name::from(ip)
}

impl Zone {
    pub fn build(cfg: Config, services: &[Service]) -> Zone {
        let ttl = cfg.ttl;
        let domain = cfg.domain.clone();
        let soa = Record::from_rdata(
            domain.clone(),
            ttl,
            RData::SOA(SOA::new(
                name(&["ns", "dns"], &domain).expect("valid"),
                name(&["hostmaster"], &domain).expect("valid"),
                1,
                7200,
                1800,
                86400,
                ttl,
            )),
        );
        let mut z = Zone {
            pod_suffix: LowerName::new(&name(&["pod"], &domain).expect("valid")),
            cfg,
            names: HashMap::new(),
            interior: BTreeSet::new(),
            soa: soa.clone(),
            record_count: 0,
        };
        z.add(soa);
        z.add(Record::from_rdata(
            name(&["dns-version"], &domain).expect("valid"),
            ttl,
            RData::TXT(TXT::new(vec![SCHEMA_VERSION.into()])),
        ));
        let svc_suffix = name(&["svc"], &domain).expect("valid");
        for s in services {
            let Some(svc_name) = name(&[&s.name, &s.namespace], &svc_suffix) else {
                continue;
            };
            match &s.kind {
                Kind::ClusterIp(ips) => {
                    for ip in ips {
                        z.add(addr_record(svc_name.clone(), ttl, *ip));
                        z.add(Record::from_rdata(
                            reverse(*ip),
                            ttl,
                            RData::PTR(PTR(svc_name.clone())),
                        ));
                    }
                    for p in s.ports.iter().filter(|p| !p.name.is_empty()) {
                        if let Some(n) = srv_name(p, &svc_name) {
                            z.add(srv(n, ttl, p.port, svc_name.clone()));
                        }
                    }
                }
                Kind::Headless(eps) => {
                    for e in eps.iter().filter(|e| e.ready && !e.ips.is_empty()) {
                        let host = e.hostname.clone().unwrap_or_else(|| dashed(e.ips[0]));
                        let Some(host_name) = name(&[&host], &svc_name) else {
                            continue;
                        };
                        for ip in &e.ips {
                            z.add(addr_record(svc_name.clone(), ttl, *ip));
                            z.add(addr_record(host_name.clone(), ttl, *ip));
                            z.add(Record::from_rdata(
                                reverse(*ip),
                                ttl,
                                RData::PTR(PTR(host_name.clone())),
                            ));
                        }
                        let ports = if e.ports.is_empty() {
                            &s.ports
                        } else {
                            &e.ports
                        };
                        for p in ports.iter().filter(|p| !p.name.is_empty()) {
                            if let Some(n) = srv_name(p, &svc_name) {
                                z.add(srv(n, ttl, p.port, host_name.clone()));
                            }
                        }
                    }
                }
                Kind::ExternalName(target) => {
                    if let Ok(mut t) = Name::from_ascii(target) {
                        t.set_fqdn(true);
                        z.add(Record::from_rdata(
                            svc_name.clone(),
                            ttl,
                            RData::CNAME(CNAME(t)),
                        ));
                    }
                }
            }
        }
        z
    }

    fn add(&mut self, r: Record) {
        let key = LowerName::new(r.name());
        // Every ancestor inside the zone exists (RFC 8020: NXDOMAIN means nothing below).
        let mut up = r.name().base_name();
        while self.cfg.domain.zone_of(&up) && up.num_labels() > self.cfg.domain.num_labels() {
            self.interior.insert(LowerName::new(&up));
            up = up.base_name();
        }
        let node = self.names.entry(key).or_default();
        if !node.records.contains(&r) {
            node.records.push(r);
            self.record_count += 1;
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The SOA record negative answers carry.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// The answer to `qname`/`qtype`.
    pub fn lookup(&self, qname: &LowerName, qtype: RecordType) -> Answer {
        let in_zone = LowerName::new(&self.cfg.domain).zone_of(qname);
        if let Some(node) = self.names.get(qname) {
            // An ExternalName Service's name answers its CNAME whatever the type asked.
            let cname: Vec<Record> = node.of_type(RecordType::CNAME).cloned().collect();
            if !cname.is_empty() {
                return Answer::Records(cname);
            }
            let recs: Vec<Record> = if qtype == RecordType::ANY {
                node.records.clone()
            } else {
                node.of_type(qtype).cloned().collect()
            };
            return if recs.is_empty() {
                Answer::NoData
            } else {
                Answer::Records(recs)
            };
        }
        if !in_zone {
            return Answer::NotOurs;
        }
        if self.interior.contains(qname) {
            return Answer::NoData;
        }
        if let Some(a) = self.pod(qname, qtype) {
            return a;
        }
        Answer::NxDomain
    }

    /// `<a-b-c-d>.<ns>.pod.<zone>` (and the dashed IPv6 form), in `Insecure` mode.
    fn pod(&self, qname: &LowerName, qtype: RecordType) -> Option<Answer> {
        if self.cfg.pods != PodMode::Insecure || !self.pod_suffix.zone_of(qname) {
            return None;
        }
        let n: Name = qname.into();
        // Labels: the address, the namespace, then `pod.<zone>`.
        if n.num_labels() != self.pod_suffix.num_labels() + 2 {
            return None;
        }
        let first = String::from_utf8_lossy(n.iter().next()?).to_string();
        let ip: IpAddr = first
            .replace('-', ".")
            .parse()
            .or_else(|_| first.replace('-', ":").parse())
            .ok()?;
        let want = if ip.is_ipv4() {
            RecordType::A
        } else {
            RecordType::AAAA
        };
        Some(if qtype == want || qtype == RecordType::ANY {
            Answer::Records(vec![addr_record(n, self.cfg.ttl, ip)])
        } else {
            Answer::NoData
        })
    }
}

fn addr_record(n: Name, ttl: u32, ip: IpAddr) -> Record {
    match ip {
        IpAddr::V4(v4) => Record::from_rdata(n, ttl, RData::A(A(v4))),
        IpAddr::V6(v6) => Record::from_rdata(n, ttl, RData::AAAA(AAAA(v6))),
    }
}

fn srv_name(p: &Port, svc: &Name) -> Option<Name> {
    name(
        &[
            &format!("_{}", p.name),
            &format!("_{}", p.protocol.to_lowercase()),
        ],
        svc,
    )
}

fn srv(n: Name, ttl: u32, port: u16, target: Name) -> Record {
    // Priority 0, weight 100: the values CoreDNS gives every target.
    Record::from_rdata(n, ttl, RData::SRV(SRV::new(0, 100, port, target)))
}

/// `10-0-0-1` for 10.0.0.1, `fd00--1` for fd00::1: an endpoint's name when it has no hostname.
pub fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}
