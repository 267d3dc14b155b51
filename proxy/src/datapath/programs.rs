//! The programs of the object by where they go: the socket hooks, and the TC program of each
//! role.
use aya::programs::TcAttachType;
use weir_common::prog_names;

/// The socket hooks, attached to a cgroup together.
pub const SOCK_PROGRAMS: [&str; 8] = [
    prog_names::CONNECT4,
    prog_names::CONNECT6,
    prog_names::SENDMSG4,
    prog_names::SENDMSG6,
    prog_names::RECVMSG4,
    prog_names::RECVMSG6,
    prog_names::GETPEERNAME4,
    prog_names::GETPEERNAME6,
];

/// Where a TC program goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcRole {
    /// A pod's host-side veth.
    FromPod,
    /// A node uplink's ingress.
    FromNetdev,
    /// A node uplink's egress.
    ToNetdev,
}

impl TcRole {
    pub fn program(self) -> &'static str {
        match self {
            TcRole::FromPod => prog_names::TC_FROM_POD,
            TcRole::FromNetdev => prog_names::TC_FROM_NETDEV,
            TcRole::ToNetdev => prog_names::TC_TO_NETDEV,
        }
    }

    pub fn attach_type(self) -> TcAttachType {
        match self {
            TcRole::FromPod | TcRole::FromNetdev => TcAttachType::Ingress,
            TcRole::ToNetdev => TcAttachType::Egress,
        }
    }
}
