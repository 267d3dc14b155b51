//! The data path as the agent sees it: the desired frontends diffed against what the maps hold
//! and written make-before-break (`programmer`, over the `maps` writer), the eBPF object loaded
//! and adopted across restarts (`loader`, `pins`, `migrate`, `kernel_facts`), its programs on
//! devices and cgroups (`attach`, `pod_devs`), and the conntrack maps (`conntrack`).
pub mod addr;
pub mod attach;
mod batch;
pub mod conntrack;
pub mod kernel_facts;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod migrate;
pub mod object;
pub mod pinned;
pub mod pins;
pub mod pod_devs;
pub mod programmer;
pub mod programs;

pub use attach::{detach_pod_tc, tc_filters, tc_ingress, TcProgram};
pub use batch::{delete_batched, dump_batched};
pub use conntrack::{end_flow_cache, Conntrack};
pub use loader::{Datapath, HostRouting, PodPrograms};
pub use maps::{AyaMaps, MapWriter, Programmed, SvcKeyOrd, WriteError};
pub use pinned::open_typed;
pub use pins::{ensure_bpffs, pin_dir, PinDir};
pub use pod_devs::recorded_pod_devs;
pub use programmer::{svc_key, ApplyStats, MapFill, Programmer};
pub use programs::TcRole;
