//! Simulated nodes and pods in network namespaces, for the sandbox, tests and benches.
//!
//! Everything made here is owned by a guard that removes it on drop: namespaces (named
//! `weir-<tag>-…`), the cgroup and the bpffs mount. Nothing touches the machine's own network
//! namespace: links are created inside the node namespace, and the only addresses used are
//! 198.18.0.0/15 and fd00::/8, with no default route anywhere.
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
};

use anyhow::{bail, Context, Result};

/// Runs `ip` with the given arguments and fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    ip_output(args).map(|_| ())
}

/// Runs `ip` with the given arguments; its stdout, or its stderr as the error.
pub fn ip_output(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("run `ip` (iproute2; `cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A network namespace created with `ip netns add`, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: &str) -> Result<Self> {
        if !name.starts_with("weir-") {
            bail!("namespace {name}: weir only creates namespaces named weir-*");
        }
        ip(&["netns", "add", name])?;
        let ns = Netns { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> …`
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        self.ip_output(args).map(|_| ())
    }

    /// `ip -n <ns> …`, returning what it printed.
    pub fn ip_output(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        ip_output(&a)
    }

    /// Writes a sysctl inside this namespace (never the machine's).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        let value = value.to_string();
        self.run(move || fs::write(&path, &value).with_context(|| format!("write {path}")))?
    }

    /// A command that runs inside this namespace (the child enters it before exec).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command> {
        let f =
            fs::File::open(self.path()).with_context(|| format!("open namespace {}", self.name))?;
        let mut cmd = Command::new(program);
        // SAFETY: only async-signal-safe calls (setns) run between fork and exec; the fd is
        // moved into the closure and stays open until then.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Runs `f` on a fresh thread that has entered this namespace (setns is per thread).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let path = self.path();
        let h = thread::spawn(move || -> Result<T> {
            enter(&path)?;
            Ok(f())
        });
        h.join()
            .map_err(|_| anyhow::anyhow!("thread in namespace panicked"))?
    }
}

/// Moves the calling thread into the namespace at `path`.
pub fn enter(path: &Path) -> Result<()> {
    let f = fs::File::open(path).with_context(|| format!("open namespace {}", path.display()))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter namespace {}", path.display()))
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("weir: could not delete namespace {}: {e:#}", self.name);
        }
    }
}

/// Deletes namespaces named `weir-<prefix>*` left behind by a run that was killed.
pub fn sweep(prefix: &str) -> Result<Vec<String>> {
    let mut gone = Vec::new();
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return Ok(gone);
    };
    for e in dir.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(&format!("weir-{prefix}")) {
            ip(&["netns", "del", &name])?;
            gone.push(name);
        }
    }
    Ok(gone)
}

/// Takes the host side and the addresses from a weir-cni ADD result.
fn take_result(pod: &mut Pod, out: &str) -> Result<()> {
    let res: weir_cni::result::CniResult = serde_json::from_str(out)
        .with_context(|| format!("weir-cni ADD {}: result {out:?}", pod.name))?;
    pod.host_if = res
        .interfaces
        .first()
        .map(|i| i.name.clone())
        .unwrap_or_default();
    for ip in &res.ips {
        let addr = ip.address.split('/').next().unwrap_or_default();
        match addr.parse::<std::net::IpAddr>() {
            Ok(std::net::IpAddr::V4(a)) => pod.ip4 = a,
            Ok(std::net::IpAddr::V6(a)) => pod.ip6 = a,
            Err(e) => bail!("weir-cni ADD {}: address {addr:?}: {e}", pod.name),
        }
    }
    Ok(())
}

/// A pod's namespace, as a runtime makes it before calling the CNI.
fn pod_netns(tag: &str, name: &str) -> Result<Netns> {
    let ns = Netns::create(&format!("weir-{tag}-{name}"))?;
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0")?;
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")?;
    // Short connections back to back to one service: enough ports, and TIME_WAIT ports
    // reusable, so a connection-rate run measures the data path and not port exhaustion.
    ns.sysctl("net.ipv4.ip_local_port_range", "10000 65000")?;
    ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
    Ok(ns)
}

/// A pod: its namespace, addresses and the host side of its veth in the node namespace.
#[derive(Debug)]
pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip4: Ipv4Addr,
    pub ip6: Ipv6Addr,
    pub host_if: String,
    /// Made by weir-cni (ADD); DEL undoes it when the node goes.
    pub via_cni: bool,
}

/// weir-cni, called the way a container runtime calls it, from the node's namespace.
#[derive(Debug, Clone)]
pub struct Cni {
    pub bin: PathBuf,
    pub conf: serde_json::Value,
}

/// Pod addresses of simulated nodes: 198.18.1.`n` and fd00:18::`n`.
pub fn pod_ip4(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, n)
}

pub fn pod_ip6(n: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, u16::from(n))
}

impl Cni {
    /// The configuration simulated nodes use: pods get addresses from `first` on, in the order
    /// they are added, and routes to the test ranges only (no default route).
    pub fn sim(bin: PathBuf, dir: &Path, agent_socket: &Path, first: u8) -> Cni {
        let conf = serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "weir-sim",
            "type": "weir-cni",
            "agentSocket": agent_socket,
            "logFile": dir.join("cni.log"),
            "ipam": {
                "ranges": [
                    [{"subnet": "198.18.1.0/24", "rangeStart": pod_ip4(first).to_string()}],
                    [{"subnet": "fd00:18::/120", "rangeStart": pod_ip6(first).to_string()}],
                ],
                "routes": [{"dst": "198.18.0.0/15"}, {"dst": "fd00::/8"}],
                "dataDir": dir.join("ipam"),
            },
        });
        Cni { bin, conf }
    }

    /// Runs one command in `node`'s namespace: (success, stdout, stderr).
    pub fn exec_raw(
        &self,
        node: &Netns,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &serde_json::Value,
    ) -> Result<(bool, String, String)> {
        use std::io::Write;
        let mut cmd = node.command(&self.bin)?;
        cmd.env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", ifname)
            .env("CNI_PATH", self.bin.parent().unwrap_or(Path::new("/")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(ns) = netns {
            cmd.env("CNI_NETNS", ns);
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("run {}", self.bin.display()))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(conf.to_string().as_bytes())?;
        let out = child.wait_with_output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Runs one command in `node`'s namespace; returns what it printed (the result).
    pub fn exec(
        &self,
        node: &Netns,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &serde_json::Value,
    ) -> Result<String> {
        let (ok, stdout, stderr) =
            self.exec_raw(node, command, container_id, netns, ifname, conf)?;
        if !ok {
            bail!(
                "weir-cni {command} {container_id}: {} {}",
                stdout.trim(),
                stderr.trim()
            );
        }
        Ok(stdout)
    }
}

/// The pod's default gateway, on every host-side veth (what Calico and weir-cni use).
pub const GATEWAY4: &str = "169.254.1.1";
pub const GATEWAY6: &str = "fe80::1";

/// A node namespace with routed veth pods, as a CNI would build them.
#[derive(Debug)]
pub struct Node {
    pub tag: String,
    pub ns: Netns,
    // Pods before `ns` would be dropped after it; order matters only for tidiness, since
    // deleting a namespace removes its end of every veth.
    pub pods: Vec<Pod>,
    /// Set to add pods through weir-cni.
    pub cni: Option<Cni>,
}

impl Drop for Node {
    fn drop(&mut self) {
        for pod in &self.pods {
            if pod.via_cni {
                if let Err(e) = self.cni_call(pod, "DEL") {
                    eprintln!("weir: {e:#}");
                }
            }
        }
    }
}

impl Node {
    /// The programs on the TC ingress of `dev`, a device of the node.
    pub fn tc_ingress(&self, dev: &str) -> Result<Vec<crate::loader::TcProgram>> {
        let dev = dev.to_string();
        self.ns.run(move || crate::loader::tc_ingress(&dev))?
    }

    /// The ids of `tc_from_pod` programs on the TC ingress of `dev`, with whether each is a
    /// clsact filter.
    pub fn pod_programs(&self, dev: &str) -> Result<Vec<(u32, bool)>> {
        Ok(self
            .tc_ingress(dev)?
            .into_iter()
            .filter(|p| p.name == weir_common::prog_names::TC_FROM_POD)
            .map(|p| (p.id, p.filter))
            .collect())
    }

    /// Creates `weir-<tag>-node` with forwarding on (inside it only).
    pub fn create(tag: &str) -> Result<Self> {
        let ns = Netns::create(&format!("weir-{tag}-node"))?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        Ok(Node {
            tag: tag.into(),
            ns,
            pods: Vec::new(),
            cni: None,
        })
    }

    fn cni_call(&self, pod: &Pod, command: &str) -> Result<String> {
        let cni = self.cni.as_ref().context("this node has no CNI")?;
        cni.exec(
            &self.ns,
            command,
            &pod.ns.name,
            Some(&pod.ns.path()),
            "eth0",
            &cni.conf,
        )
    }

    /// Adds pod `name` through weir-cni ADD; it must get 198.18.1.`n` and fd00:18::`n`.
    pub fn add_pod_cni(&mut self, name: &str, n: u8) -> Result<&Pod> {
        let ns = pod_netns(&self.tag, name)?;
        // Addresses and host side come from the result.
        let pod = Pod {
            name: name.into(),
            ns,
            ip4: Ipv4Addr::UNSPECIFIED,
            ip6: Ipv6Addr::UNSPECIFIED,
            host_if: String::new(),
            via_cni: true,
        };
        let out = self.cni_call(&pod, "ADD")?;
        // From here on the node's drop runs DEL.
        self.pods.push(pod);
        let pod = self.pods.last_mut().expect("just pushed");
        take_result(pod, &out)?;
        let want = (pod_ip4(n), pod_ip6(n));
        if (pod.ip4, pod.ip6) != want {
            bail!(
                "weir-cni ADD {name}: got addresses {} and {}, expected {} and {}",
                pod.ip4,
                pod.ip6,
                want.0,
                want.1
            );
        }
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Adds pod `name` with 198.18.1.`n` and fd00:18::`n`.
    pub fn add_pod(&mut self, name: &str, n: u8) -> Result<&Pod> {
        let ns = pod_netns(&self.tag, name)?;
        let host_if = format!("w{}{}", &self.tag[..self.tag.len().min(8)], n);
        let (ip4, ip6) = (pod_ip4(n), pod_ip6(n));
        let pod = Pod {
            name: name.into(),
            ns,
            ip4,
            ip6,
            host_if,
            via_cni: false,
        };
        self.wire(&pod)?;
        self.pods.push(pod);
        Ok(self.pods.last().expect("just pushed"))
    }

    /// Deletes the pod's veth and creates it again under the same names (what a runtime does
    /// when it restarts a pod's sandbox): the host side is a new device.
    /// A pod made by weir-cni goes through DEL and ADD, as a runtime would; it may come back
    /// with other addresses (IPAM does not hand a released address out again at once).
    pub fn rewire_pod(&mut self, name: &str) -> Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        if self.pods[i].via_cni {
            self.cni_call(&self.pods[i], "DEL")?;
            let out = self.cni_call(&self.pods[i], "ADD")?;
            return take_result(&mut self.pods[i], &out);
        }
        let pod = &self.pods[i];
        self.ns.ip(&["link", "del", &pod.host_if])?;
        self.wire(pod)
    }

    /// The veth pair, addresses and routes of a pod, as a routed CNI sets them up.
    fn wire(&self, pod: &Pod) -> Result<()> {
        let (ns, host_if) = (&pod.ns, pod.host_if.as_str());
        let (ip4, ip6) = (pod.ip4, pod.ip6);
        self.ns.ip(&[
            "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.ns
            .sysctl(&format!("net.ipv6.conf.{host_if}.accept_dad"), "0")?;
        self.ns.ip(&["link", "set", host_if, "up"])?;
        self.ns
            .ip(&["addr", "add", &format!("{GATEWAY4}/32"), "dev", host_if])?;
        self.ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{GATEWAY6}/64"),
            "dev",
            host_if,
            "nodad",
        ])?;
        self.ns
            .ip(&["route", "add", &format!("{ip4}/32"), "dev", host_if])?;
        self.ns
            .ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", host_if])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip4}/32"), "dev", "eth0"])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        ns.ip(&["route", "add", GATEWAY4, "dev", "eth0", "scope", "link"])?;
        // Only the test ranges are routed: nothing can leave for any other address.
        ns.ip(&[
            "route",
            "add",
            "198.18.0.0/15",
            "via",
            GATEWAY4,
            "dev",
            "eth0",
        ])?;
        ns.ip(&[
            "-6", "route", "add", "fd00::/8", "via", GATEWAY6, "dev", "eth0",
        ])?;
        Ok(())
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }
}

/// A shared link-layer segment: a bridge in its own namespace `weir-<tag>-lan`, which other
/// namespaces join through a veth each (the uplinks of nodes, an outside client).
#[derive(Debug)]
pub struct Lan {
    pub ns: Netns,
    ports: u32,
    /// Checksums in software on the links joined from now on (see `software_checksums`).
    software_checksums: bool,
}

impl Lan {
    pub fn create(tag: &str) -> Result<Self> {
        let ns = Netns::create(&format!("weir-{tag}-lan"))?;
        ns.ip(&["link", "add", "br0", "type", "bridge"])?;
        ns.ip(&["link", "set", "br0", "up"])?;
        Ok(Lan {
            ns,
            ports: 0,
            software_checksums: false,
        })
    }

    /// Turns checksum offloads off on both ends of every link joined from now on: a sender
    /// computes its L4 checksums in full (a forwarded CHECKSUM_PARTIAL packet is completed
    /// on the way out), and every receiver checks them instead of trusting the veth. A
    /// rewrite that leaves a wrong checksum then loses the packet, as a real NIC would.
    pub fn software_checksums(&mut self) {
        self.software_checksums = true;
    }

    /// Gives `ns` a device `dev` on the segment with addresses `addrs` (CIDR notation).
    pub fn join(&mut self, ns: &Netns, dev: &str, addrs: &[&str]) -> Result<()> {
        let port = format!("p{}", self.ports);
        self.ports += 1;
        self.ns.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", dev, "netns", &ns.name,
        ])?;
        self.ns.ip(&["link", "set", &port, "master", "br0", "up"])?;
        ns.sysctl(&format!("net.ipv6.conf.{dev}.accept_dad"), "0")?;
        if self.software_checksums {
            offloads_off(&self.ns, &port)?;
            offloads_off(ns, dev)?;
        }
        ns.ip(&["link", "set", dev, "up"])?;
        for a in addrs {
            if a.contains(':') {
                ns.ip(&["-6", "addr", "add", a, "dev", dev, "nodad"])?;
            } else {
                ns.ip(&["addr", "add", a, "dev", dev])?;
            }
        }
        Ok(())
    }
}

/// `ethtool -K dev tx off rx off` in `ns`.
fn offloads_off(ns: &Netns, dev: &str) -> Result<()> {
    let out = ns
        .command("ethtool")?
        .args(["-K", dev, "tx", "off", "rx", "off"])
        .output()
        .context("run `ethtool` (`cargo xtask setup` installs it)")?;
    if !out.status.success() {
        bail!(
            "ethtool -K {dev} tx off rx off in {}: {}",
            ns.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A cgroup (v2) created for one run, removed on drop once empty.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

/// Where cgroup v2 is mounted: `/sys/fs/cgroup/unified` on hybrid hosts, else `/sys/fs/cgroup`.
pub fn cgroup2_root() -> Result<PathBuf> {
    for p in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let p = Path::new(p);
        if let Ok(st) = nix::sys::statfs::statfs(p) {
            if st.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC {
                return Ok(p.into());
            }
        }
    }
    bail!("no cgroup v2 hierarchy found at /sys/fs/cgroup/unified or /sys/fs/cgroup")
}

impl Cgroup {
    pub fn create(name: &str) -> Result<Self> {
        if !name.starts_with("weir-") {
            bail!("cgroup {name}: weir only creates cgroups named weir-*");
        }
        let path = cgroup2_root()?.join(name);
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// Makes `cmd`'s process join this cgroup before it execs.
    pub fn adopt(&self, cmd: &mut Command) -> Result<()> {
        let procs =
            std::ffi::CString::new(self.path.join("cgroup.procs").to_string_lossy().as_bytes())?;
        // SAFETY: open/write/close are async-signal-safe; the path was built before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let rc = libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
                if rc != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(())
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes of the run were killed first; a dying process may linger a moment.
        for _ in 0..50 {
            if fs::remove_dir(&self.path).is_ok() {
                return;
            }
            thread::sleep(std::time::Duration::from_millis(20));
        }
        eprintln!("weir: could not remove cgroup {}", self.path.display());
    }
}

/// A bpffs mounted for one run, unmounted on drop (which releases every pin under it).
#[derive(Debug)]
pub struct BpfMount {
    pub path: PathBuf,
}

impl BpfMount {
    pub fn create(path: &Path) -> Result<Self> {
        fs::create_dir_all(path).with_context(|| format!("create {}", path.display()))?;
        nix::mount::mount(
            Some("bpffs"),
            path,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mount a bpffs at {}", path.display()))?;
        Ok(BpfMount { path: path.into() })
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(&self.path, nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("weir: could not unmount {}: {e}", self.path.display());
        }
        let _ = fs::remove_dir(&self.path);
    }
}

/// A directory for one run's files, removed with its contents on drop. Declare it after
/// anything mounted inside it (fields drop in order), or the removal meets a busy mount.
#[derive(Debug)]
pub struct RunDir(pub PathBuf);

impl RunDir {
    pub fn create(path: &str) -> Result<Self> {
        fs::create_dir_all(path).with_context(|| format!("create {path}"))?;
        Ok(RunDir(path.into()))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("weir: could not remove {}: {e}", self.0.display());
        }
    }
}

/// A child process killed (and reaped) on drop.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("start {name}"))?;
        Ok(Proc {
            name: name.into(),
            child,
        })
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Pins the calling process (all threads started after this) to one CPU.
pub fn pin_to_cpu(cpu: usize) -> Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
        .with_context(|| format!("pin to CPU {cpu}"))
}

/// The tags this process handed out: what [`sweep_own`] removes.
static OWN_TAGS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Set by a process that removes what it made on SIGINT and SIGTERM itself.
static CALLER_HANDLES_SIGNALS: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Says that this process removes what it made on SIGINT and SIGTERM itself (the sandbox,
/// which stops gracefully and reports): [`tag`] then installs no sweeper. Call it before the
/// first tag.
pub fn caller_handles_signals() {
    CALLER_HANDLES_SIGNALS.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Installed by the first [`tag`] of a process, unless it handles the signals itself: a
/// thread that, on SIGINT or SIGTERM, removes what the process made ([`sweep_own`]) and exits
/// with 130. Tests and benchmarks get it this way: a signal kills them before their guards
/// run.
fn sweep_on_signal() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if CALLER_HANDLES_SIGNALS.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let signals = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ]);
        let mut signals = match signals {
            Ok(s) => s,
            Err(e) => {
                eprintln!("weir: what this process makes is not removed on a signal: {e}");
                return;
            }
        };
        thread::spawn(move || {
            // Written to stderr itself: a test harness would capture `eprintln!` of a thread
            // a test started, and the process exits before printing it.
            let say = |m: String| {
                use std::io::Write;
                let _ = std::io::stderr().write_all(m.as_bytes());
            };
            if let Some(sig) = signals.forever().next() {
                say(format!(
                    "weir: signal {sig}: removing what this process made\n"
                ));
                let gone = sweep_own();
                say(format!(
                    "weir: removed {} namespaces, mounts, directories and cgroups\n",
                    gone.len()
                ));
                std::process::exit(130);
            }
        });
    });
}

/// A short random tag for names, so parallel runs never collide. Remembered, so that a
/// process stopped by a signal can remove what it made ([`sweep_own`], which the first tag
/// arranges for, see [`caller_handles_signals`]).
pub fn tag() -> String {
    sweep_on_signal();
    let t = format!("{:05x}", rand::random::<u32>() & 0xfffff);
    if let Ok(mut own) = OWN_TAGS.lock() {
        own.push(t.clone());
    }
    t
}

/// Removes everything named after a tag this process handed out, for a process stopped by a
/// signal before its guards ran: the processes in its namespaces (killed), the namespaces,
/// bpffs mounts and directories under `/run/weir-*`, and its cgroups. Returns what it removed.
pub fn sweep_own() -> Vec<String> {
    let tags = OWN_TAGS.lock().map(|t| t.clone()).unwrap_or_default();
    let ours =
        |name: &str| name.starts_with("weir-") && tags.iter().any(|t| name.contains(t.as_str()));
    let mut gone = Vec::new();
    if let Ok(dir) = fs::read_dir("/run/netns") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !ours(&name) {
                continue;
            }
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &name]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
            let _ = ip(&["netns", "del", &name]);
            gone.push(name);
        }
    }
    if let Ok(mounts) = fs::read_to_string("/proc/self/mounts") {
        for m in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            let under_ours = m
                .strip_prefix("/run/")
                .and_then(|r| r.split('/').next())
                .is_some_and(ours);
            if under_ours {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
                gone.push(m.to_string());
            }
        }
    }
    if let Ok(dir) = fs::read_dir("/run") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if ours(&name) && fs::remove_dir_all(e.path()).is_ok() {
                gone.push(e.path().display().to_string());
            }
        }
    }
    if let Ok(root) = cgroup2_root() {
        if let Ok(dir) = fs::read_dir(&root) {
            for e in dir.flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                // Its processes were killed with the namespaces; a cgroup goes once empty.
                if ours(&name) {
                    for _ in 0..50 {
                        if fs::remove_dir(e.path()).is_ok() {
                            gone.push(e.path().display().to_string());
                            break;
                        }
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                }
            }
        }
    }
    gone
}
