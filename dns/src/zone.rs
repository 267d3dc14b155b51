//! The cluster zone: the records the Kubernetes DNS specification (schema 1.1.0) asks for,
//! built from this crate's own view of Services and their endpoints, and the answer to a
//! question about them.
//!
//! Names are compared case-insensitively (the specification's rule): the index is keyed by
//! lower-cased names.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
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
    /// Only for the address of a pod of that namespace (CoreDNS's `pods verified`): the zone
    /// is given the pods.
    Verified,
}

/// A pod as `pods verified` needs it: its namespace and addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub ips: Vec<IpAddr>,
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

/// One record, compactly: the names it points at are shared, lower-case, fully qualified
/// strings; hickory's records are made from it when a question is answered. (Kept as
/// hickory `Record`s, the zone took 4 KB per object.)
#[derive(Clone, Debug, PartialEq, Eq)]
enum Rec {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// Port and target.
    Srv(u16, Arc<str>),
    Ptr(Arc<str>),
    Cname(Arc<str>),
    Txt(Box<str>),
    Soa,
}

impl Rec {
    fn record_type(&self) -> RecordType {
        match self {
            Rec::A(_) => RecordType::A,
            Rec::Aaaa(_) => RecordType::AAAA,
            Rec::Srv(..) => RecordType::SRV,
            Rec::Ptr(_) => RecordType::PTR,
            Rec::Cname(_) => RecordType::CNAME,
            Rec::Txt(_) => RecordType::TXT,
            Rec::Soa => RecordType::SOA,
        }
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
    /// Lower-case fully qualified name (trailing dot) → its records.
    names: HashMap<Arc<str>, Vec<Rec>>,
    /// Names that exist only because names below them do (`svc.<zone>`, `<ns>.svc.<zone>`,
    /// `_tcp.<service>…`): NODATA, not NXDOMAIN.
    interior: HashSet<Box<str>>,
    soa: Record,
    /// `<zone>.` and `pod.<zone>.`, lower-case.
    domain: String,
    pod_suffix: String,
    /// `pods verified`: each pod address → the namespaces of the pods that have it.
    pods: HashMap<IpAddr, Vec<Arc<str>>>,
    /// Records built, for memory figures.
    pub record_count: usize,
}

/// The lower-case fully qualified text of `labels` under `suffix` (itself with a trailing
/// dot), if each label is one DNS label.
fn name(labels: &[&str], suffix: &str) -> Option<String> {
    let mut out = String::new();
    for l in labels {
        if l.is_empty() || l.len() > 63 || l.contains('.') {
            return None;
        }
        out.push_str(&l.to_ascii_lowercase());
        out.push('.');
    }
    out.push_str(suffix);
    (out.len() <= 254).then_some(out)
}

/// The reverse name of an address, lower-case with a trailing dot.
fn reverse(ip: IpAddr) -> String {
    let mut n = Name::from(ip).to_ascii().to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

/// `text` (a name of ours) as a hickory name.
fn hname(text: &str) -> Name {
    Name::from_ascii(text).unwrap_or_else(|_| Name::root())
}

/// The key of a question's name: lower-case with a trailing dot.
fn key_of(qname: &LowerName) -> String {
    let mut k = qname.to_string();
    if !k.ends_with('.') {
        k.push('.');
    }
    k
}

fn is_under(name: &str, suffix: &str) -> bool {
    name == suffix || (name.ends_with(suffix) && name[..name.len() - suffix.len()].ends_with('.'))
}

impl Zone {
    pub fn build(cfg: Config, services: &[Service]) -> Zone {
        Self::build_with_pods(cfg, services, &[])
    }

    /// The zone of `services`, and of `pods` when the pods mode is `Verified` (otherwise they
    /// are not needed, and ignored).
    pub fn build_with_pods(cfg: Config, services: &[Service], pods: &[Pod]) -> Zone {
        let ttl = cfg.ttl;
        let domain = {
            let mut d = cfg.domain.to_ascii().to_ascii_lowercase();
            if !d.ends_with('.') {
                d.push('.');
            }
            d
        };
        let soa = Record::from_rdata(
            cfg.domain.clone(),
            ttl,
            RData::SOA(SOA::new(
                hname(&format!("ns.dns.{domain}")),
                hname(&format!("hostmaster.{domain}")),
                1,
                7200,
                1800,
                86400,
                ttl,
            )),
        );
        let mut z = Zone {
            pod_suffix: format!("pod.{domain}"),
            domain: domain.clone(),
            cfg,
            names: HashMap::new(),
            interior: HashSet::new(),
            soa,
            pods: HashMap::new(),
            record_count: 0,
        };
        if z.cfg.pods == PodMode::Verified {
            let mut namespaces: HashSet<Arc<str>> = HashSet::new();
            for p in pods {
                let lower = p.namespace.to_ascii_lowercase();
                let ns = match namespaces.get(lower.as_str()) {
                    Some(n) => n.clone(),
                    None => {
                        let n: Arc<str> = lower.into();
                        namespaces.insert(n.clone());
                        n
                    }
                };
                for ip in &p.ips {
                    let list = z.pods.entry(*ip).or_default();
                    if !list.contains(&ns) {
                        list.push(ns.clone());
                    }
                }
            }
            z.pods.shrink_to_fit();
        }
        z.add(domain.clone(), Rec::Soa);
        z.add(
            format!("dns-version.{domain}"),
            Rec::Txt(SCHEMA_VERSION.into()),
        );
        let svc_suffix = format!("svc.{domain}");
        for s in services {
            let Some(svc_name) = name(&[&s.name, &s.namespace], &svc_suffix) else {
                continue;
            };
            let svc_name: Arc<str> = svc_name.into();
            match &s.kind {
                Kind::ClusterIp(ips) => {
                    for ip in ips {
                        z.add_addr(svc_name.to_string(), *ip);
                        z.add(reverse(*ip), Rec::Ptr(svc_name.clone()));
                    }
                    for p in s.ports.iter().filter(|p| !p.name.is_empty()) {
                        if let Some(n) = srv_name(p, &svc_name) {
                            z.add(n, Rec::Srv(p.port, svc_name.clone()));
                        }
                    }
                }
                Kind::Headless(eps) => {
                    for e in eps.iter().filter(|e| e.ready && !e.ips.is_empty()) {
                        let host = e.hostname.clone().unwrap_or_else(|| dashed(e.ips[0]));
                        let Some(host_name) = name(&[&host], &svc_name) else {
                            continue;
                        };
                        let host_name: Arc<str> = host_name.into();
                        for ip in &e.ips {
                            z.add_addr(svc_name.to_string(), *ip);
                            z.add_addr(host_name.to_string(), *ip);
                            z.add(reverse(*ip), Rec::Ptr(host_name.clone()));
                        }
                        let ports = if e.ports.is_empty() {
                            &s.ports
                        } else {
                            &e.ports
                        };
                        for p in ports.iter().filter(|p| !p.name.is_empty()) {
                            if let Some(n) = srv_name(p, &svc_name) {
                                z.add(n, Rec::Srv(p.port, host_name.clone()));
                            }
                        }
                    }
                }
                Kind::ExternalName(target) => {
                    if let Ok(t) = Name::from_ascii(target) {
                        let mut t = t.to_ascii();
                        if !t.ends_with('.') {
                            t.push('.');
                        }
                        z.add(svc_name.to_string(), Rec::Cname(t.into()));
                    }
                }
            }
        }
        for recs in z.names.values_mut() {
            recs.shrink_to_fit();
        }
        z.names.shrink_to_fit();
        z.interior.shrink_to_fit();
        z
    }

    fn add_addr(&mut self, name: String, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => self.add(name, Rec::A(v4)),
            IpAddr::V6(v6) => self.add(name, Rec::Aaaa(v6)),
        }
    }

    fn add(&mut self, name: String, r: Rec) {
        // Every ancestor inside the zone exists (RFC 8020: NXDOMAIN means nothing below).
        if is_under(&name, &self.domain) {
            let mut rest = name.as_str();
            while let Some(i) = rest.find('.') {
                rest = &rest[i + 1..];
                if rest.len() <= self.domain.len() {
                    break;
                }
                if !self.interior.contains(rest) {
                    self.interior.insert(rest.into());
                }
            }
        }
        let recs = match self.names.get_mut(name.as_str()) {
            Some(r) => r,
            None => self.names.entry(name.into()).or_default(),
        };
        if !recs.contains(&r) {
            recs.push(r);
            self.record_count += 1;
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Every record of the zone (the SOA first is not promised).
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        self.names.iter().flat_map(move |(n, recs)| {
            let owner = hname(n);
            recs.iter()
                .map(move |r| self.record(owner.clone(), r))
                .collect::<Vec<_>>()
        })
    }

    fn record(&self, owner: Name, r: &Rec) -> Record {
        let ttl = self.cfg.ttl;
        let data = match r {
            Rec::A(v4) => RData::A(A(*v4)),
            Rec::Aaaa(v6) => RData::AAAA(AAAA(*v6)),
            Rec::Srv(port, t) => RData::SRV(SRV::new(0, 100, *port, hname(t))),
            Rec::Ptr(t) => RData::PTR(PTR(hname(t))),
            Rec::Cname(t) => RData::CNAME(CNAME(hname(t))),
            Rec::Txt(s) => RData::TXT(TXT::new(vec![s.to_string()])),
            Rec::Soa => return self.soa.clone(),
        };
        Record::from_rdata(owner, ttl, data)
    }

    /// The SOA record negative answers carry.
    pub fn soa(&self) -> &Record {
        &self.soa
    }

    /// The answer to `qname`/`qtype`.
    pub fn lookup(&self, qname: &LowerName, qtype: RecordType) -> Answer {
        let key = key_of(qname);
        if let Some(recs) = self.names.get(key.as_str()) {
            let owner: Name = qname.into();
            // An ExternalName Service's name answers its CNAME whatever the type asked.
            if let Some(c) = recs.iter().find(|r| matches!(r, Rec::Cname(_))) {
                return Answer::Records(vec![self.record(owner, c)]);
            }
            let out: Vec<Record> = recs
                .iter()
                .filter(|r| qtype == RecordType::ANY || r.record_type() == qtype)
                .map(|r| self.record(owner.clone(), r))
                .collect();
            return if out.is_empty() {
                Answer::NoData
            } else {
                Answer::Records(out)
            };
        }
        if !is_under(&key, &self.domain) {
            return Answer::NotOurs;
        }
        if self.interior.contains(key.as_str()) {
            return Answer::NoData;
        }
        if let Some(a) = self.pod(&key, qtype) {
            return a;
        }
        Answer::NxDomain
    }

    /// `<a-b-c-d>.<ns>.pod.<zone>` (and the dashed IPv6 form): in `Insecure` mode for any
    /// address, in `Verified` mode for the address of a pod of namespace `<ns>`.
    fn pod(&self, key: &str, qtype: RecordType) -> Option<Answer> {
        if self.cfg.pods == PodMode::Disabled || !is_under(key, &self.pod_suffix) {
            return None;
        }
        // Labels: the address, the namespace, then `pod.<zone>`.
        let head = &key[..key.len() - self.pod_suffix.len()];
        let mut labels = head.trim_end_matches('.').split('.');
        let (Some(first), Some(ns), None) = (labels.next(), labels.next(), labels.next()) else {
            return None;
        };
        let ip: IpAddr = first
            .replace('-', ".")
            .parse()
            .or_else(|_| first.replace('-', ":").parse())
            .ok()?;
        if self.cfg.pods == PodMode::Verified
            && !self
                .pods
                .get(&ip)
                .is_some_and(|nss| nss.iter().any(|n| &**n == ns))
        {
            return None;
        }
        let want = if ip.is_ipv4() {
            RecordType::A
        } else {
            RecordType::AAAA
        };
        Some(if qtype == want || qtype == RecordType::ANY {
            Answer::Records(vec![addr_record(hname(key), self.cfg.ttl, ip)])
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

fn srv_name(p: &Port, svc: &str) -> Option<String> {
    name(
        &[
            &format!("_{}", p.name),
            &format!("_{}", p.protocol.to_lowercase()),
        ],
        svc,
    )
}

/// `10-0-0-1` for 10.0.0.1, `fd00--1` for fd00::1: an endpoint's name when it has no hostname.
pub fn dashed(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string().replace('.', "-"),
        IpAddr::V6(v6) => v6.to_string().replace(':', "-"),
    }
}
