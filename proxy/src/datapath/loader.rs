//! Loads weir's eBPF object, pins its maps and links under one directory on a bpffs, and on a
//! restart adopts what a previous run pinned: the maps are reused as they are (conntrack,
//! affinity and services survive) and each pinned link is switched to the new program
//! atomically, so no packet meets a moment without a program.
use std::fs;

use crate::error::{fail, Context, Result};
use aya::{
    programs::{CgroupSockAddr, SchedClassifier},
    Ebpf, EbpfLoader,
};
use weir_common::prog_names;

use super::{
    kernel_facts,
    migrate::{check_pinned_maps, migrate_ct, restore_counters},
    object::OBJECT,
    pins::PinDir,
    programs::SOCK_PROGRAMS,
};

/// What pod veths carry ([`Datapath::set_pod_programs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PodPrograms {
    /// `tc_from_pod` on the ingress, `tc_to_pod` on the egress: pod flows may take the
    /// per-packet path (no socket hooks, or hooks on a cgroup some pods are outside of).
    #[default]
    PerPacket,
    /// None: the socket hooks balance every pod's sockets at `connect`, so no pod packet is
    /// addressed to a service, and the replies of external flows a pod serves are translated
    /// on the uplink's egress (`tc_to_netdev`). Packets between pods pass no program at all.
    None,
}

/// How translated packets to a pod of the node reach it ([`Datapath::set_host_routing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HostRouting {
    /// Handed straight into the pod by the program (`bpf_redirect_peer` to a veth of
    /// `LB_PODDEV_V1`): no second pass through the veth's queue and the node's stack, and so
    /// none through its netfilter FORWARD chain either (Cilium's host routing).
    #[default]
    Bpf,
    /// Forwarded by the node's stack, where rules of the node (a NetworkPolicy implementation
    /// on iptables, say) see them: no pod veth is recorded.
    Kernel,
}

/// The loaded object and where it is pinned: what attaches programs and records pod veths.
pub struct Datapath {
    pub(super) ebpf: Ebpf,
    pub(super) pins: PinDir,
    /// What pod veths get from [`Datapath::attach_pod_tc`].
    pub(super) pod_programs: PodPrograms,
    pub(super) host_routing: HostRouting,
}

impl Datapath {
    /// Loads the object; maps already pinned under `pins` are adopted, the others are created
    /// and pinned. `pins` must be on a bpffs.
    pub fn load(pins: PinDir) -> Result<Self> {
        Self::load_with(pins, kernel_facts::facts())
    }

    /// The same with the kernel facts given: a fact left `None` loads the object as for a
    /// kernel without it (a helper call per packet instead), which tests use to cover that
    /// path.
    pub fn load_with(pins: PinDir, facts: kernel_facts::Facts) -> Result<Self> {
        if OBJECT.is_empty() {
            fail!("this weir binary was built with AYA_BUILD_SKIP=1 and has no eBPF programs; rebuild it without");
        }
        for d in [pins.maps(), pins.links()] {
            fs::create_dir_all(&d)
                .with_context(|| format!("create pin directory {}", d.display()))?;
        }
        let maps_dir = pins.maps();
        let carried = check_pinned_maps(&maps_dir)?;
        // Where the loader knows them, the kernel's layout and its tick: the per-packet path
        // then reads each packet's checksum kind, and the clock, without a helper call (see
        // `kernel_facts`).
        let linked = match facts.skb {
            Some(f) => Some(kernel_facts::with_kfunc_calls(OBJECT, f.cast_to_kern_ctx)?),
            None => None,
        };
        // No call linked (an object built without them) leaves the layout unknown: the
        // programs must not reach a call the kernel has no function for.
        let ip_summed = match (&linked, facts.skb) {
            (Some((_, calls)), Some(f)) if *calls > 0 => f.ip_summed_bit + 1,
            _ => 0,
        };
        let (ns_per_jiffy, jiffies_offset) = facts
            .jiffies
            .map_or((0, 0), |c| (c.ns_per_jiffy, c.offset_ns));
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .override_global(weir_common::kernel_facts::IP_SUMMED, &ip_summed, true)
            .override_global(weir_common::kernel_facts::NS_PER_JIFFY, &ns_per_jiffy, true)
            .override_global(
                weir_common::kernel_facts::JIFFIES_OFFSET,
                &jiffies_offset,
                true,
            )
            .load(linked.as_ref().map_or(OBJECT, |(o, _)| o.as_bytes()))
            .with_context(|| {
                format!(
                    "load the eBPF object (maps pinned under {})",
                    maps_dir.display()
                )
            })?;
        for name in [
            prog_names::TC_FROM_POD,
            prog_names::TC_TO_POD,
            prog_names::TC_FROM_NETDEV,
            prog_names::TC_TO_NETDEV,
        ] {
            let p: &mut SchedClassifier = program(&mut ebpf, name)?.try_into()?;
            p.load().with_context(|| format!("load program {name}"))?;
        }
        // The flow cache's writer, where the four reach it by tail call (see `FLOW_SLOTS`).
        let writer = {
            let name = prog_names::TC_FLOW_WRITE;
            let p: &mut SchedClassifier = program(&mut ebpf, name)?.try_into()?;
            p.load().with_context(|| format!("load program {name}"))?;
            p.fd()?.try_clone()?
        };
        let mut jump: aya::maps::ProgramArray<_> = ebpf
            .map_mut(weir_common::map_names::FLOW_WRITE)
            .context("map FLOW_WRITE is missing from the eBPF object")?
            .try_into()?;
        jump.set(0, &writer, 0)
            .context("put tc_flow_write into FLOW_WRITE")?;
        for name in SOCK_PROGRAMS {
            let p: &mut CgroupSockAddr = program(&mut ebpf, name)?.try_into()?;
            p.load().with_context(|| format!("load program {name}"))?;
        }
        restore_counters(&maps_dir, carried)?;
        let moved = migrate_ct(&maps_dir, false)?;
        if moved > 0 {
            tracing::info!(
                flows = moved,
                "conntrack entries of an earlier layout (CT_V1, CT_V2) copied to CT4_V1 and CT6_V1"
            );
        }
        Ok(Self {
            ebpf,
            pins,
            pod_programs: PodPrograms::PerPacket,
            host_routing: HostRouting::Bpf,
        })
    }

    pub fn pins(&self) -> &PinDir {
        &self.pins
    }

    /// Once every program of an earlier run is replaced by this one's: copies the flows its
    /// programs added to an earlier conntrack layout since [`Datapath::load`], and unpins
    /// those maps (see [`migrate_ct`]). Returns the entries copied.
    pub fn finish_ct_migration(&self) -> Result<usize> {
        migrate_ct(&self.pins.maps(), true)
    }

    /// What [`Datapath::attach_pod_tc`] puts on pod veths ([`PodPrograms::PerPacket`] unless
    /// set). With the socket hooks on every pod's sockets, no pod packet needs a program:
    /// a classifier costs every packet that passes it, even one it returns at once, so
    /// [`PodPrograms::None`] leaves pod veths bare, and `attach_pod_tc` removes what an earlier
    /// run put there. Uplinks carry `tc_to_netdev` on their egress in either case.
    pub fn set_pod_programs(&mut self, p: PodPrograms) {
        self.pod_programs = p;
    }

    pub fn pod_programs(&self) -> PodPrograms {
        self.pod_programs
    }

    /// Whether [`Datapath::add_pod_dev`] records pod veths ([`HostRouting::Bpf`] unless set).
    pub fn set_host_routing(&mut self, r: HostRouting) {
        self.host_routing = r;
    }

    pub fn host_routing(&self) -> HostRouting {
        self.host_routing
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

pub(super) fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &str,
) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} is missing from the eBPF object"))
}
