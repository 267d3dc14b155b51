//! What the model gives the data path: each frontend a client can reach, and what it should do.
use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
};

use weir_common::{PROTO_SCTP, PROTO_TCP, PROTO_UDP, SCOPE_ALL, SCOPE_EXTERNAL};

/// A service frontend: what a client connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Frontend {
    pub ip: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// `SCOPE_ALL`, or `SCOPE_EXTERNAL` for an entry that only external clients see.
    pub scope: u8,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}{}",
            SocketAddr::new(self.ip, self.port),
            proto_name(self.proto),
            if self.scope == SCOPE_EXTERNAL {
                " (external)"
            } else {
                ""
            }
        )
    }
}

impl Frontend {
    /// A frontend for every client.
    pub fn new(ip: IpAddr, port: u16, proto: u8) -> Self {
        Frontend {
            ip,
            port,
            proto,
            scope: SCOPE_ALL,
        }
    }

    /// The same address, port and protocol, for clients outside the node only.
    pub fn external(self) -> Self {
        Frontend {
            scope: SCOPE_EXTERNAL,
            ..self
        }
    }
}

/// What one frontend should do.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct ServiceSpec {
    /// `namespace/name:port`, for messages and status.
    pub name: String,
    pub backends: Vec<SocketAddr>,
    pub maglev: bool,
    /// Session affinity ClientIP with this timeout.
    pub affinity_timeout_s: Option<u32>,
    /// With no backends, drop rather than reject: the service has endpoints, none usable by
    /// this frontend's traffic (a `Local` traffic policy).
    pub drop_when_empty: bool,
    /// The cluster DNS Service's cluster IP frontend on a node that serves DNS itself: the
    /// socket hooks prefer the node's own server while it holds its lease.
    pub node_local: bool,
}

pub type Desired = BTreeMap<Frontend, ServiceSpec>;

pub fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "TCP",
        PROTO_UDP => "UDP",
        PROTO_SCTP => "SCTP",
        _ => "?",
    }
}
