//! The cluster DNS zone and server that `weir agent` embeds (and `weir dns` runs alone).
//!
//! `zone` builds the records of the Kubernetes DNS specification (schema 1.1.0) from this
//! crate's own view of Services, which the agent feeds it; `server` answers queries over UDP
//! and TCP from the zone and relays the rest to upstream resolvers. No dependency on the agent.
pub mod server;
pub mod stats;
pub mod zone;

pub use server::Handler;
pub use zone::{Config, Endpoint, Kind, Pod, PodMode, Port, Service, Zone};

#[cfg(test)]
mod conformance;
pub use hickory_proto::rr::{Name, RecordType};
