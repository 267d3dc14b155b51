//! Loads weir's eBPF object, pins its maps and links under one directory on a bpffs, and on a
//! restart adopts what a previous run pinned: the maps are reused as they are (conntrack,
//! affinity and services survive) and each pinned link is switched to the new program
//! atomically, so no packet meets a moment without a program.
use std::{
    fs, io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{bail, Context, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{
            qdisc_add_clsact, qdisc_detach_program, NlOptions, SchedClassifierLink,
            TcAttachOptions, TcError, TcHandle,
        },
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfLoader,
};
use weir_common::prog_names;

/// The object built by build.rs (empty when built with `AYA_BUILD_SKIP=1`).
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weir-ebpf"));

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
    fn program(self) -> &'static str {
        match self {
            TcRole::FromPod => prog_names::TC_FROM_POD,
            TcRole::FromNetdev => prog_names::TC_FROM_NETDEV,
            TcRole::ToNetdev => prog_names::TC_TO_NETDEV,
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            TcRole::FromPod | TcRole::FromNetdev => TcAttachType::Ingress,
            TcRole::ToNetdev => TcAttachType::Egress,
        }
    }
}

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

/// Separates a device's name from its index in a TC link's pin name. Not `.`: bpffs refuses
/// names with a dot (reserved for its own files).
const TC_PIN_SEP: char = '#';

/// The pin layout under `<bpffs>/<name>/`: `maps/<MAP>` and `links/<program>@<target>`.
#[derive(Clone, Debug)]
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn maps(&self) -> PathBuf {
        self.0.join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.0.join("links")
    }
    fn link(&self, program: &str, target: &str) -> PathBuf {
        self.links()
            .join(format!("{program}@{}", target.replace('/', "_")))
    }

    fn cgroup_target(cgroup: &Path) -> String {
        format!("cgroup-{}", cgroup.display())
    }

    /// The pin of `role`'s link on `ifname`. The device's index is part of the name: a device
    /// deleted and created again under the same name is another device, and must not be taken
    /// for the one a pinned link points at.
    fn tc_link(&self, ifname: &str, role: TcRole) -> Result<PathBuf> {
        let index =
            nix::net::if_::if_nametoindex(ifname).with_context(|| format!("interface {ifname}"))?;
        Ok(self.link(role.program(), &format!("{ifname}{TC_PIN_SEP}{index}")))
    }

    /// Whether `role`'s link on the device now called `ifname` is pinned.
    pub fn has_tc(&self, ifname: &str, role: TcRole) -> bool {
        self.tc_link(ifname, role).is_ok_and(|p| p.exists())
    }

    /// Removes the TC program from `ifname`: its link goes with its pin (once no process of
    /// ours holds it open).
    pub fn detach_tc(&self, ifname: &str, role: TcRole) -> Result<()> {
        unpin(&self.tc_link(ifname, role)?)
    }

    /// Unpins the TC links of devices that no longer exist in the calling thread's network
    /// namespace (a pod deleted, a veth re-created under its old name); returns their pins.
    pub fn prune_tc(&self) -> Result<Vec<PathBuf>> {
        let mut gone = Vec::new();
        let Ok(entries) = fs::read_dir(self.links()) else {
            return Ok(gone);
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((prog, target)) = name.split_once('@') else {
                continue;
            };
            if !prog.starts_with("tc_") {
                continue;
            }
            let Some((ifname, index)) = target.rsplit_once(TC_PIN_SEP) else {
                continue;
            };
            let alive =
                nix::net::if_::if_nametoindex(ifname).is_ok_and(|i| Some(i) == index.parse().ok());
            if !alive {
                unpin(&e.path())?;
                gone.push(e.path());
            }
        }
        Ok(gone)
    }

    /// Unpins every link: the programs detach from their interfaces and cgroups. The maps stay
    /// pinned (a later agent adopts them).
    pub fn detach_all(&self) -> Result<()> {
        let dir = self.links();
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(());
        };
        for e in entries {
            unpin(&e.with_context(|| format!("read {}", dir.display()))?.path())?;
        }
        Ok(())
    }
}

/// Removes a pin; one that is already gone is fine.
fn unpin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("unpin {}", path.display()))
        }
        _ => Ok(()),
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    pins: PinDir,
    /// What pod veths get from [`Datapath::attach_pod_tc`].
    pod_programs: PodPrograms,
    host_routing: HostRouting,
}

/// A conntrack value as weir wrote it in `CT_V1` (no peer rewrite).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CtValueV1 {
    pub nat_addr: weir_common::Addr,
    pub nat_port: u16,
    pub dir: u8,
    pub flags: u8,
    pub backend_id: u32,
    pub svc_id: u32,
    pub _pad: u32,
    pub expires_ns: u64,
}

// SAFETY: repr(C), Copy, integers only, no implicit padding (40 bytes, as the kernel map says).
unsafe impl aya::Pod for CtValueV1 {}

/// `bpf_map_update_elem` flag: fail if the key exists.
const BPF_NOEXIST: u64 = 1;

/// The conntrack maps of earlier versions: `CT_V1` (values without the peer rewrite), then
/// `CT_V2` (today's values, both families under `CtKey`), before `CT4_V1` and `CT6_V1`.
pub const CT_V1: &str = "CT_V1";
pub const CT_V2: &str = "CT_V2";

/// A `CT_V1` value in today's layout: hairpin entries get their peer (the VIP forward, the
/// client back) as the old programs derived it from the packet.
fn ct_value_of_v1(k: &weir_common::CtKey, v: &CtValueV1) -> weir_common::CtValue {
    use weir_common::{CtValue, CT_DIR_FORWARD, CT_F_HAIRPIN};
    let (peer_addr, peer_port) = match (v.flags & CT_F_HAIRPIN != 0, v.dir == CT_DIR_FORWARD) {
        (false, _) => (weir_common::Addr::default(), 0),
        (true, true) => (k.dst, k.sport),
        (true, false) => (k.src, k.dport),
    };
    CtValue {
        nat_addr: v.nat_addr,
        peer_addr,
        nat_port: v.nat_port,
        peer_port,
        dir: v.dir,
        flags: v.flags,
        _pad: 0,
        backend_id: v.backend_id,
        svc_id: v.svc_id,
        expires_ns: v.expires_ns,
    }
}

/// Copies the flows of the conntrack maps an earlier version pinned (`CT_V1`, `CT_V2`) into
/// today's (`CT4_V1`, `CT6_V1`), so an upgrade keeps established flows; an entry the new
/// programs wrote already is newer and stays. The old programs use the old maps until
/// they are replaced: [`Datapath::load`] copies before the new ones are attached (they find
/// every flow), [`Datapath::finish_ct_migration`] again once all are (the flows the old
/// programs added meanwhile), with `unpin`: the old maps then go. Returns the entries copied.
pub fn migrate_ct(maps_dir: &Path, unpin_old: bool) -> Result<usize> {
    use aya::maps::{HashMap, MapData};
    use weir_common::{CtKey, CtValue};
    let (v1, v2) = (maps_dir.join(CT_V1), maps_dir.join(CT_V2));
    if !v1.exists() && !v2.exists() {
        return Ok(0);
    }
    let mut new = crate::maps::Conntrack::open(maps_dir)?;
    let mut moved = 0;
    let mut put = |k: CtKey, v: CtValue| -> Result<()> {
        match new.insert(&k, &v, BPF_NOEXIST) {
            Ok(()) => moved += 1,
            Err(crate::maps::WriteError::Map { source, .. })
                if matches!(&*source, aya::maps::MapError::SyscallError(e)
                    if e.io_error.raw_os_error() == Some(libc::EEXIST)) => {}
            Err(e) => return Err(e).context("copy a flow of an earlier conntrack layout"),
        }
        Ok(())
    };
    if v1.exists() {
        let old: HashMap<MapData, CtKey, CtValueV1> = crate::maps::open_typed(maps_dir, CT_V1)?;
        for kv in old.iter() {
            let (k, v) = kv.context("read CT_V1")?;
            put(k, ct_value_of_v1(&k, &v))?;
        }
    }
    if v2.exists() {
        let old: HashMap<MapData, CtKey, CtValue> = crate::maps::open_typed(maps_dir, CT_V2)?;
        for kv in old.iter() {
            let (k, v) = kv.context("read CT_V2")?;
            put(k, v)?;
        }
    }
    if unpin_old {
        for path in [v1, v2] {
            if path.exists() {
                unpin(&path)?;
            }
        }
    }
    Ok(moved)
}

/// Counters a previous run counted, by index, to be carried into a counters map made anew.
type Carried = Vec<(u32, aya::maps::PerCpuValues<u64>)>;

/// Checks every map of the object that a previous run pinned against this build's
/// definition, before the loader adopts it: aya reuses a pinned map whatever its shape. The
/// counters map is made anew when its size changed (a version with more counters), its counts
/// returned to be carried over; any other difference is an error naming the map, whose entries
/// would be misread (a change of layout takes a new map name, as `CT_V2`).
fn check_pinned_maps(maps_dir: &Path) -> Result<Carried> {
    use aya::maps::{MapData, MapInfo, PerCpuArray};
    let obj = aya_obj::Object::parse(OBJECT).context("parse the eBPF object")?;
    let mut carried = Vec::new();
    for (name, def) in &obj.maps {
        let path = maps_dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("read pinned map {}", path.display()))?;
        let want = (def.key_size(), def.value_size(), def.max_entries());
        let got = (info.key_size(), info.value_size(), info.max_entries());
        if want == got {
            continue;
        }
        if name == weir_common::map_names::STATS && (want.0, want.1) == (got.0, got.1) {
            let old: PerCpuArray<MapData, u64> =
                crate::maps::open_typed(maps_dir, weir_common::map_names::STATS)?;
            for i in 0..got.2.min(want.2) {
                carried.push((
                    i,
                    old.get(&i, 0)
                        .with_context(|| format!("read {name}[{i}]"))?,
                ));
            }
            // The old programs keep their map until they are replaced; counts they add
            // meanwhile are lost.
            unpin(&path)?;
            tracing::info!(
                map = %name,
                was = got.2,
                now = want.2,
                "counters map made anew for this version's counters, counts carried over"
            );
            continue;
        }
        bail!(
            "the pinned map {} has keys of {} bytes, values of {} bytes and {} entries, where this \
             weir's programs expect {}, {} and {}: its entries would be misread. A change of layout \
             takes a new map name; remove the pin to start that map empty",
            path.display(),
            got.0,
            got.1,
            got.2,
            want.0,
            want.1,
            want.2
        );
    }
    Ok(carried)
}

/// Writes carried counts into the counters map the loader made.
fn restore_counters(maps_dir: &Path, carried: Carried) -> Result<()> {
    use aya::maps::{MapData, PerCpuArray};
    if carried.is_empty() {
        return Ok(());
    }
    let name = weir_common::map_names::STATS;
    let mut stats: PerCpuArray<MapData, u64> = crate::maps::open_typed(maps_dir, name)?;
    for (i, v) in carried {
        stats
            .set(i, v, 0)
            .with_context(|| format!("write {name}[{i}]"))?;
    }
    Ok(())
}

fn is_not_found(e: &aya::programs::links::LinkError) -> bool {
    matches!(e, aya::programs::links::LinkError::SyscallError(s) if s.io_error.kind() == io::ErrorKind::NotFound)
}

impl Datapath {
    /// Loads the object; maps already pinned under `pins` are adopted, the others are created
    /// and pinned. `pins` must be on a bpffs.
    pub fn load(pins: PinDir) -> Result<Self> {
        Self::load_with(pins, crate::kernel_facts::facts())
    }

    /// The same with the kernel facts given: a fact left `None` loads the object as for a
    /// kernel without it (a helper call per packet instead), which tests use to cover that
    /// path.
    pub fn load_with(pins: PinDir, facts: crate::kernel_facts::Facts) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!("this weir binary was built with AYA_BUILD_SKIP=1 and has no eBPF programs; rebuild it without");
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
            Some(f) => Some(crate::kernel_facts::with_kfunc_calls(
                OBJECT,
                f.cast_to_kern_ctx,
            )?),
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
            .map_mut("FLOW_WRITE")
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
    /// a classifier costs every packet that passes it, even one it returns at once (B1), so
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

    /// Attaches a TC program to `ifname` (TCX, on the role's side) in the calling thread's
    /// network namespace, or swaps the program of the link a previous run pinned.
    pub fn attach_tc(&mut self, ifname: &str, role: TcRole) -> Result<()> {
        let name = role.program();
        let pin = self.pins.tc_link(ifname, role)?;
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?.try_into()?;
        match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link = SchedClassifierLink::try_from(FdLink::from(old))
                    .with_context(|| format!("adopt link {}", pin.display()))?;
                prog.attach_to_link(link)
                    .with_context(|| format!("replace program {name} on {ifname}"))?;
            }
            Err(e) if is_not_found(&e) => {
                let id = prog
                    .attach_with_options(
                        ifname,
                        role.attach_type(),
                        TcAttachOptions::TcxOrder(LinkOrder::default()),
                    )
                    .with_context(|| {
                        format!("attach {name} to {ifname} {:?}", role.attach_type())
                    })?;
                let link: FdLink = prog.take_link(id)?.try_into()?;
                link.pin(&pin)
                    .with_context(|| format!("pin link {}", pin.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("open pinned link {}", pin.display())),
        }
        Ok(())
    }

    /// Puts `tc_from_pod` on a pod's host-side veth (ingress), in the calling thread's network
    /// namespace, as a classic clsact filter (priority [`POD_FILTER_PRIORITY`], handle
    /// [`POD_FILTER_HANDLE`]), or replaces the program of the filter an earlier run left there.
    ///
    /// Not TCX, as on uplinks: a TCX attach waits for an RCU grace period (10–25 ms here, and
    /// the agent attaches one device at a time), while a filter is in place in a fraction of a
    /// millisecond, and pods are made all the time. The filter belongs to the device, not to
    /// the agent: it stays when the agent exits and goes when the veth is deleted. Replacing
    /// the program of a filter is atomic. A device that has a pinned TCX link from an earlier
    /// run keeps it, its program swapped: a filter beside it would translate twice.
    ///
    /// `tc_to_pod` goes on the device's egress the same way (a filter, always). With
    /// [`PodPrograms::None`] the device gets neither, and loses those an earlier run left.
    pub fn attach_pod_tc(&mut self, ifname: &str) -> Result<()> {
        if self.pod_programs == PodPrograms::None {
            return detach_pod_tc(&self.pins, ifname);
        }
        qdisc_add_clsact_once(ifname)?;
        // Egress first: replies from the node are translated before the first query leaves.
        self.attach_pod_filter(ifname, TcAttachType::Egress, prog_names::TC_TO_POD)?;
        if self.pins.has_tc(ifname, TcRole::FromPod) {
            return self.attach_tc(ifname, TcRole::FromPod);
        }
        self.attach_pod_filter(ifname, TcAttachType::Ingress, TcRole::FromPod.program())
    }

    /// Puts program `name` on `ifname`'s clsact `dir` as weir's pod filter, or replaces the
    /// program of the filter there.
    fn attach_pod_filter(&mut self, ifname: &str, dir: TcAttachType, name: &str) -> Result<()> {
        let prog: &mut SchedClassifier = program(&mut self.ebpf, name)?.try_into()?;
        let options = || NlOptions {
            priority: POD_FILTER_PRIORITY,
            handle: TcHandle::from(POD_FILTER_HANDLE),
            classid: None,
        };
        let id = match prog.attach_with_options(ifname, dir, TcAttachOptions::Netlink(options())) {
            Ok(id) => id,
            Err(ProgramError::TcError(TcError::NetlinkError(e)))
                if e.raw_os_error() == Some(libc::EEXIST) =>
            {
                let o = options();
                let old =
                    SchedClassifierLink::attached(ifname, dir, o.priority, o.handle, o.classid)
                        .with_context(|| format!("interface {ifname}"))?;
                prog.attach_to_link(old)
                    .with_context(|| format!("replace program {name} on {ifname}"))?
            }
            Err(e) => return Err(e).with_context(|| format!("attach {name} to {ifname} {dir:?}")),
        };
        // Dropping the link would delete the filter: it is the device's now.
        std::mem::forget(prog.take_link(id)?);
        Ok(())
    }

    /// Whether this run's `tc_from_pod` is what runs on `ifname`'s ingress (as a TCX link or a
    /// filter), and its `tc_to_pod` on the egress, asked of the kernel in the calling thread's
    /// network namespace; with [`PodPrograms::None`], whether neither of weir's pod programs is
    /// there.
    pub fn pod_tc_attached(&mut self, ifname: &str) -> Result<bool> {
        let id = |ebpf: &mut Ebpf, name| -> Result<u32> {
            let prog: &mut SchedClassifier = program(ebpf, name)?.try_into()?;
            Ok(prog.info()?.id())
        };
        let (from, to) = (
            id(&mut self.ebpf, TcRole::FromPod.program())?,
            id(&mut self.ebpf, prog_names::TC_TO_POD)?,
        );
        if self.pod_programs == PodPrograms::None {
            let ours = |p: &TcProgram| {
                p.name == TcRole::FromPod.program() || p.name == prog_names::TC_TO_POD
            };
            return Ok(!tc_ingress(ifname)?.iter().any(ours)
                && !tc_filters(ifname, TcAttachType::Egress)?.iter().any(ours));
        }
        Ok(tc_ingress(ifname)?.iter().any(|p| p.id == from)
            && tc_filters(ifname, TcAttachType::Egress)?
                .iter()
                .any(|p| p.id == to))
    }

    /// Attaches the socket-level hooks to a cgroup (v2), or swaps the programs of the links a
    /// previous run pinned.
    pub fn attach_cgroup(&mut self, cgroup: &Path) -> Result<()> {
        let dir =
            fs::File::open(cgroup).with_context(|| format!("open cgroup {}", cgroup.display()))?;
        let target = PinDir::cgroup_target(cgroup);
        for name in SOCK_PROGRAMS {
            let pin = self.pins.link(name, &target);
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?.try_into()?;
            match obj_get(&pin) {
                Ok(link) => {
                    link_update(link.as_raw_fd(), prog.fd()?.as_fd().as_raw_fd()).with_context(
                        || format!("replace program {name} on {}", cgroup.display()),
                    )?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let id = prog
                        .attach(&dir, CgroupAttachMode::Single)
                        .with_context(|| format!("attach {name} to cgroup {}", cgroup.display()))?;
                    let link: FdLink = prog.take_link(id)?.try_into()?;
                    link.pin(&pin)
                        .with_context(|| format!("pin link {}", pin.display()))?;
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("open pinned link {}", pin.display()))
                }
            }
        }
        Ok(())
    }

    /// Ends the flow cache's slots (see [`crate::maps::end_flow_cache`]): after a change of
    /// the pod veths, whose routes slots hold.
    fn end_flow_cache(&mut self) -> Result<()> {
        let name = weir_common::map_names::FLOW_GEN;
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} is missing from the eBPF object"))?;
        let mut gen =
            aya::maps::Array::try_from(map).with_context(|| format!("open map {name}"))?;
        crate::maps::end_flow_cache(&mut gen)
            .with_context(|| format!("move the generation in {name}"))
    }

    /// The map of the node's pod veths (`LB_PODDEV_V1`, see `MAX_POD_DEVS`), which the
    /// programs hand packets into pods by.
    fn pod_devs_map(&mut self) -> Result<aya::maps::Array<&mut aya::maps::MapData, u32>> {
        let name = weir_common::map_names::POD_DEVS;
        let map = self
            .ebpf
            .map_mut(name)
            .with_context(|| format!("map {name} is missing from the eBPF object"))?;
        aya::maps::Array::try_from(map).with_context(|| format!("open map {name}"))
    }

    /// Records `ifindex` (in the agent's namespace) as a pod's host-side veth, whose packets
    /// the programs may hand straight into the pod (`bpf_redirect_peer`). Only a veth whose
    /// peer is in another network namespace can take that: a packet redirected to any other
    /// device would be dropped, so those are refused. So is a veth whose slot holds another
    /// (see `MAX_POD_DEVS`).
    /// With [`HostRouting::Kernel`], records nothing.
    pub fn add_pod_dev(&mut self, ifname: &str, ifindex: u32) -> Result<()> {
        use weir_common::MAX_POD_DEVS;
        if self.host_routing == HostRouting::Kernel {
            return Ok(());
        }
        if !veth_with_peer_elsewhere(ifindex)
            .with_context(|| format!("ask the kernel what device {ifname} is"))?
        {
            bail!("{ifname} (index {ifindex}) is not a veth whose peer is in another network namespace");
        }
        let mut map = self.pod_devs_map()?;
        let slot = ifindex % MAX_POD_DEVS;
        let held = map.get(&slot, 0).context("read a pod veth slot")?;
        if held != 0 && held != ifindex {
            bail!("{ifname} (index {ifindex}) shares slot {slot} with the veth of index {held}, recorded first");
        }
        map.set(slot, ifindex, 0)
            .with_context(|| format!("record {ifname} (index {ifindex}) as a pod veth"))?;
        self.end_flow_cache()
    }

    /// Forgets the pod veth of index `ifindex` (a device gone), if it is recorded.
    pub fn forget_pod_dev(&mut self, ifindex: u32) -> Result<()> {
        let mut map = self.pod_devs_map()?;
        let slot = ifindex % weir_common::MAX_POD_DEVS;
        if map.get(&slot, 0).context("read a pod veth slot")? == ifindex {
            map.set(slot, 0, 0)
                .with_context(|| format!("forget the pod veth of index {ifindex}"))?;
            self.end_flow_cache()?;
        }
        Ok(())
    }

    /// Forgets the pod veths not in `keep` (gone devices; any an earlier run left): a pass
    /// over every slot.
    pub fn retain_pod_devs(&mut self, keep: &std::collections::BTreeSet<u32>) -> Result<()> {
        let mut map = self.pod_devs_map()?;
        let mut forgot = false;
        for slot in 0..weir_common::MAX_POD_DEVS {
            let held = map.get(&slot, 0).context("read a pod veth slot")?;
            if held != 0 && !keep.contains(&held) {
                map.set(slot, 0, 0)
                    .with_context(|| format!("forget the pod veth of index {held}"))?;
                forgot = true;
            }
        }
        if forgot {
            self.end_flow_cache()?;
        }
        Ok(())
    }

    /// The pod veths recorded, by ifindex.
    pub fn pod_devs(&mut self) -> Result<Vec<u32>> {
        recorded_pod_devs(&self.pod_devs_map()?)
    }

    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// The priority of weir's filter on a pod device's clsact ingress: first.
pub const POD_FILTER_PRIORITY: u16 = 1;
/// The handle of weir's filter on a pod device's clsact ingress.
pub const POD_FILTER_HANDLE: u32 = 1;

/// A program on a device's TC ingress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcProgram {
    pub name: String,
    /// The kernel's program id.
    pub id: u32,
    /// A clsact filter (false: a TCX link).
    pub filter: bool,
}

/// The programs on `ifname`'s ingress in the calling thread's network namespace, in the order
/// they run: TCX links first, then the clsact filters.
pub fn tc_ingress(ifname: &str) -> Result<Vec<TcProgram>> {
    let (_, tcx) = SchedClassifier::query_tcx(ifname, TcAttachType::Ingress)
        .with_context(|| format!("query the TCX links of {ifname}"))?;
    let mut out: Vec<TcProgram> = tcx
        .iter()
        .map(|p| TcProgram {
            name: p.name_as_str().unwrap_or_default().to_string(),
            id: p.id(),
            filter: false,
        })
        .collect();
    out.extend(tc_filters(ifname, TcAttachType::Ingress)?);
    Ok(out)
}

/// The BPF filters on `ifname`'s clsact ingress or egress (`tc filter show dev D ingress`), in
/// the calling thread's network namespace.
pub fn tc_filters(ifname: &str, dir: TcAttachType) -> Result<Vec<TcProgram>> {
    let index =
        nix::net::if_::if_nametoindex(ifname).with_context(|| format!("interface {ifname}"))?;
    clsact_filters(index, dir == TcAttachType::Egress)
        .with_context(|| format!("list the {dir:?} filters of {ifname}"))
}

/// Gives `ifname` a clsact qdisc unless it has one.
fn qdisc_add_clsact_once(ifname: &str) -> Result<()> {
    match qdisc_add_clsact(ifname) {
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        r => r.with_context(|| format!("add the clsact qdisc to {ifname}")),
    }
}

/// Removes weir's pod programs from `ifname`, filters or pinned TCX link; one that is not
/// there is fine.
pub fn detach_pod_tc(pins: &PinDir, ifname: &str) -> Result<()> {
    pins.detach_tc(ifname, TcRole::FromPod)?;
    detach_pod_filter(ifname, TcAttachType::Ingress, TcRole::FromPod.program())?;
    detach_pod_filter(ifname, TcAttachType::Egress, prog_names::TC_TO_POD)
}

/// Removes the filter running `name` from `ifname`'s clsact `dir`; none there is fine.
fn detach_pod_filter(ifname: &str, dir: TcAttachType, name: &str) -> Result<()> {
    match qdisc_detach_program(ifname, dir, name) {
        Err(TcError::IoError(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(TcError::NetlinkError(e)) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        r => r.with_context(|| format!("delete the {dir:?} filter of {ifname}")),
    }
}

/// The pod veths a `LB_PODDEV_V1` map records, by ifindex, in slot order.
pub fn recorded_pod_devs<T: std::borrow::Borrow<aya::maps::MapData>>(
    map: &aya::maps::Array<T, u32>,
) -> Result<Vec<u32>> {
    let mut out = Vec::new();
    for v in map.iter() {
        let v = v.with_context(|| format!("read {}", weir_common::map_names::POD_DEVS))?;
        if v != 0 {
            out.push(v);
        }
    }
    Ok(out)
}

/// Whether device `index` of the calling thread's namespace is a veth whose peer lives in
/// another network namespace (the kernel names that namespace in `IFLA_LINK_NETNSID`).
fn veth_with_peer_elsewhere(index: u32) -> io::Result<bool> {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_REQUEST};
    use netlink_packet_route::{
        link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
        RouteNetlinkMessage,
    };
    let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetLink(msg));
    req.header.flags = NLM_F_REQUEST;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)?;
    let (data, _) = sock.recv_from_full()?;
    let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data).map_err(io::Error::other)?;
    match m.payload {
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => {
            let veth = l.attributes.iter().any(|a| {
                matches!(a, LinkAttribute::LinkInfo(infos)
                    if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
            });
            let elsewhere = l
                .attributes
                .iter()
                .any(|a| matches!(a, LinkAttribute::LinkNetNsId(_)));
            Ok(veth && elsewhere)
        }
        NetlinkPayload::Error(e) => Err(e
            .code
            .map(|c| io::Error::from_raw_os_error(-c.get()))
            .unwrap_or_else(|| io::Error::other("no answer"))),
        _ => Err(io::Error::other("unexpected netlink answer")),
    }
}

/// Dumps the BPF filters on a device's clsact ingress or egress.
fn clsact_filters(index: u32, egress: bool) -> io::Result<Vec<TcProgram>> {
    use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST};
    use netlink_packet_route::{
        tc::{self, TcAttribute, TcFilterBpfOption, TcMessage, TcOption},
        RouteNetlinkMessage,
    };
    let mut sock = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    let mut msg = TcMessage::default();
    msg.header.index = index as i32;
    msg.header.parent = tc::TcHandle {
        major: tc::TcHandle::INGRESS.major,
        minor: if egress {
            tc::TcHandle::MIN_EGRESS
        } else {
            tc::TcHandle::MIN_INGRESS
        },
    };
    let mut req = NetlinkMessage::from(RouteNetlinkMessage::GetTrafficFilter(msg));
    req.header.flags = NLM_F_REQUEST | NLM_F_DUMP;
    req.header.sequence_number = 1;
    req.finalize();
    let mut buf = vec![0; req.buffer_len()];
    req.serialize(&mut buf);
    sock.send(&buf, 0)?;
    let mut out = Vec::new();
    loop {
        let (data, _) = sock.recv_from_full()?;
        let mut at = 0;
        while at < data.len() {
            let m = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&data[at..])
                .map_err(io::Error::other)?;
            at += m.header.length as usize;
            match m.payload {
                NetlinkPayload::Done(_) => return Ok(out),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        // No clsact qdisc, no filters.
                        Some(c) if -c.get() == libc::EINVAL => Ok(out),
                        Some(c) => Err(io::Error::from_raw_os_error(-c.get())),
                        None => Ok(out),
                    };
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewTrafficFilter(f)) => {
                    let (mut name, mut id) = (String::new(), None);
                    for a in &f.attributes {
                        if let TcAttribute::Options(opts) = a {
                            for o in opts {
                                match o {
                                    TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => {
                                        name = n.clone()
                                    }
                                    TcOption::Bpf(TcFilterBpfOption::ProgId(i)) => id = Some(*i),
                                    _ => {}
                                }
                            }
                        }
                    }
                    if let Some(id) = id {
                        out.push(TcProgram {
                            name,
                            id,
                            filter: true,
                        });
                    }
                }
                _ => {}
            }
        }
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .with_context(|| format!("program {name} is missing from the eBPF object"))
}

/// `BPF_OBJ_GET`: opens a pinned object.
fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: a valid prefix of union bpf_attr for this command; the path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            std::mem::size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `BPF_LINK_UPDATE`: points an existing link at another program, atomically. aya 0.14 has no
/// call for it on cgroup links.
fn link_update(link_fd: i32, prog_fd: i32) -> io::Result<()> {
    #[repr(C)]
    struct LinkUpdateAttr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    const BPF_LINK_UPDATE: libc::c_long = 29;
    let attr = LinkUpdateAttr {
        link_fd: link_fd as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: the attribute is a valid, fully initialised prefix of union bpf_attr for this
    // command, and its size is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &attr as *const LinkUpdateAttr,
            std::mem::size_of::<LinkUpdateAttr>(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mounts a bpffs at `dir` unless one is there already.
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let st = nix::sys::statfs::statfs(dir).with_context(|| format!("statfs {}", dir.display()))?;
    if st.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpffs"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount a bpffs at {}", dir.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_releases_only_links_of_devices_that_are_gone() {
        let root = std::env::temp_dir().join(format!("weir-prune-{}", std::process::id()));
        let pins = PinDir(root.clone());
        fs::create_dir_all(pins.links()).unwrap();
        let lo = nix::net::if_::if_nametoindex("lo").unwrap();
        for name in [
            format!("tc_from_pod@lo#{lo}"),
            format!("tc_from_pod@lo#{}", lo + 1000),
            "tc_from_pod@weir-no-such-dev#7".to_string(),
            "sock_connect4@cgroup-_sys_fs_cgroup".to_string(),
        ] {
            fs::write(pins.links().join(name), b"").unwrap();
        }
        let mut gone: Vec<String> = pins
            .prune_tc()
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        gone.sort();
        let mut left: Vec<String> = fs::read_dir(pins.links())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(
            gone,
            [
                format!("tc_from_pod@lo#{}", lo + 1000),
                "tc_from_pod@weir-no-such-dev#7".into()
            ]
        );
        assert_eq!(
            left,
            [
                "sock_connect4@cgroup-_sys_fs_cgroup".to_string(),
                format!("tc_from_pod@lo#{lo}")
            ]
        );
    }
}
