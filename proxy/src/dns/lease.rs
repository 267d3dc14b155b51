//! Node-local DNS: while the node's own server answers, the socket hooks (and the per-packet
//! path) send its pods' queries to the cluster DNS Service there, under a lease the agent
//! renews after probing its server.
use std::{path::Path, time::Duration};

use crate::error::{Context, Result};

use super::{hickory_name, Options};
use crate::datapath::{addr::to_addr, kernel_facts, open_typed};

/// Whether the server answers `dns-version.<domain>` TXT on its node-local address within
/// 200 ms (the liveness the lease rests on).
pub async fn probe(opts: &Options) -> bool {
    let (v4, v6) = opts.local_addrs();
    let (Some(addr), Ok(name)) = (
        v4.or(v6),
        hickory_name(&format!(
            "dns-version.{}.",
            opts.domain.trim_end_matches('.')
        )),
    ) else {
        return false;
    };
    weir_dns::server::probe(
        addr,
        &name,
        weir_dns::RecordType::TXT,
        Duration::from_millis(200),
    )
    .await
}

/// The node-local lease, its map opened once: the node's own server at the options'
/// addresses. The socket hooks read it for the `SVC_F_NODE_LOCAL` Service.
pub struct Lease {
    map: aya::maps::Array<aya::maps::MapData, weir_common::NodeLocal>,
    entry: weir_common::NodeLocal,
}

impl Lease {
    pub fn open(maps_dir: &Path, opts: &Options) -> Result<Lease> {
        let map = open_typed(maps_dir, weir_common::map_names::NODE_LOCAL)?;
        let (v4, v6) = opts.local_addrs();
        let entry = weir_common::NodeLocal {
            addr4: v4.map(|a| to_addr(a.ip())).unwrap_or_default(),
            addr6: v6.map(|a| to_addr(a.ip())).unwrap_or_default(),
            port: v4.or(v6).map(|a| a.port()).unwrap_or(0).to_be(),
            ..Default::default()
        };
        Ok(Lease { map, entry })
    }

    /// Valid `for_` from now; zero withdraws it at once.
    pub fn renew(&mut self, for_: Duration) -> Result<()> {
        let now_ns = kernel_facts::clock_ns()?;
        self.entry.expires_ns = if for_.is_zero() {
            0
        } else {
            now_ns + for_.as_nanos() as u64
        };
        self.map
            .set(0, self.entry, 0)
            .with_context(|| format!("write {}", weir_common::map_names::NODE_LOCAL))
    }
}
