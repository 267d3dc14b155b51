//! Programs on devices and cgroups: TCX links on uplinks, clsact filters on pod veths, cgroup
//! links for the socket hooks; each pinned (or owned by its device) so that it outlives the
//! agent, and swapped atomically for a new agent's program.
use std::{
    fs, io,
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use crate::error::{Context, Result};
use aya::{
    programs::{
        links::{FdLink, PinnedLink},
        tc::{
            qdisc_add_clsact, qdisc_detach_program, NlOptions, SchedClassifierLink,
            TcAttachOptions, TcError, TcHandle,
        },
        CgroupAttachMode, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf,
};
use weir_common::prog_names;

use super::{
    loader::{program, Datapath, PodPrograms},
    pins::PinDir,
    programs::{TcRole, SOCK_PROGRAMS},
};

impl Datapath {
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
    /// Not TCX, as on uplinks: a TCX attach waits for an RCU grace period (and the agent
    /// attaches one device at a time), while a filter is in place at once, and pods are made
    /// all the time. The filter belongs to the device, not to
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

fn is_not_found(e: &aya::programs::links::LinkError) -> bool {
    matches!(e, aya::programs::links::LinkError::SyscallError(s) if s.io_error.kind() == io::ErrorKind::NotFound)
}
