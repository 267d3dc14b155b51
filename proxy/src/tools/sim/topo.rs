//! Simulated nodes and pods in network namespaces, as the sandbox (and the tests and
//! benchmarks) build them.
//!
//! Everything made here is owned by a guard that removes it on drop: namespaces are named
//! `weir-<tag>-…`. Nothing touches the machine's own network namespace: links are created
//! inside the node namespace, and the only addresses used are 198.18.0.0/15 and fd00::/8, with
//! no default route anywhere.
use std::{
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
};

use anyhow::{bail, Context, Result};

use crate::node::netns::enter;

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

/// What a runtime reads of a CNI ADD result (the CNI specification's fields).
#[derive(serde::Deserialize)]
struct AddResult {
    #[serde(default)]
    interfaces: Vec<AddInterface>,
    #[serde(default)]
    ips: Vec<AddIp>,
}

#[derive(serde::Deserialize)]
struct AddInterface {
    name: String,
}

#[derive(serde::Deserialize)]
struct AddIp {
    address: String,
}

/// Takes the host side and the addresses from a weir-cni ADD result.
fn take_result(pod: &mut Pod, out: &str) -> Result<()> {
    let res: AddResult = serde_json::from_str(out)
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
pub fn pod_netns(tag: &str, name: &str) -> Result<Netns> {
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

    /// Starts one command in `node`'s namespace, its configuration written to its stdin, and
    /// returns at once (stdout and stderr piped): what a runtime that may kill it does.
    pub fn spawn(
        &self,
        node: &Netns,
        command: &str,
        container_id: &str,
        netns: Option<&Path>,
        ifname: &str,
        conf: &serde_json::Value,
    ) -> Result<std::process::Child> {
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
        // A plugin may stop reading (a configuration over its limit, or killed): it answers
        // all the same.
        match child
            .stdin
            .take()
            .context("stdin")?
            .write_all(conf.to_string().as_bytes())
        {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
            _ => {}
        }
        Ok(child)
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
        let child = self.spawn(node, command, container_id, netns, ifname, conf)?;
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

    /// Deletes the pod's veth and creates it again under the same names, through DEL and ADD,
    /// as a runtime does when it restarts a pod's sandbox: the host side is a new device. It
    /// may come back with other addresses (IPAM does not hand a released address out again at
    /// once).
    pub fn rewire_pod(&mut self, name: &str) -> Result<()> {
        let i = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))?;
        if !self.pods[i].via_cni {
            bail!("pod {name} was not made by weir-cni: rewire it as it was made");
        }
        self.cni_call(&self.pods[i], "DEL")?;
        let out = self.cni_call(&self.pods[i], "ADD")?;
        take_result(&mut self.pods[i], &out)
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }
}
