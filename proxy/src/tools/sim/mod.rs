//! A simulated node: a node namespace with a client pod and backend pods, a bpffs and a cgroup
//! of its own, the real agent programming real eBPF programs, and echo servers in the
//! backends. The sandbox, the integration tests and the benchmarks all build on it. Dropping it
//! removes everything it made, in order: processes, cgroup, bpffs, namespaces, run directory.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

pub mod guards;
pub mod topo;

use self::{
    guards::{BpfMount, Cgroup, Proc, RunDir},
    topo::{Cni, Node},
};
use super::{loadtest::Report, status};

pub const ECHO_PORT: u16 = 8080;
pub const CLIENT: &str = "cli";
/// The simulated node's name: the agent reads this Node's podCIDRs from the source.
pub const NODE_NAME: &str = "sim-node";

#[derive(Clone, Debug)]
pub struct Options {
    /// The `weir` binary to run as agent, echo server and load generator.
    pub weir_bin: PathBuf,
    pub backends: usize,
    /// Attach the socket-level hooks to the client's cgroup.
    pub socket_lb: bool,
    pub services_yaml: String,
    /// A name prefix of the tag, to tell runs apart (`sbx`, `t`, `b`).
    pub prefix: String,
}

// Field order is drop order.
pub struct Sim {
    pub tag: String,
    /// Node uplinks the agent attaches `tc_from_netdev` to when it (re)starts; none at first.
    pub netdevs: Vec<String>,
    /// More arguments for the agent when it (re)starts.
    pub agent_args: Vec<String>,
    agent: Option<Proc>,
    echo: Vec<Proc>,
    pub cgroup: Cgroup,
    pub bpffs: BpfMount,
    pub node: Node,
    dir: RunDir,
    pub opts: Options,
}

impl Sim {
    pub fn start(opts: Options) -> Result<Sim> {
        if !nix::unistd::geteuid().is_root() {
            bail!("a simulated node needs root (network namespaces, eBPF, mounts)");
        }
        let tag = format!("{}{}", opts.prefix, guards::tag());
        let dir = RunDir::create(&format!("/run/weir-{tag}"))?;
        let node = Node::create(&tag)?;
        let bpffs = BpfMount::create(&dir.0.join("bpffs"))?;
        let cgroup = Cgroup::create(&format!("weir-{tag}"))?;
        let mut sim = Sim {
            tag,
            netdevs: Vec::new(),
            agent_args: Vec::new(),
            agent: None,
            echo: Vec::new(),
            cgroup,
            bpffs,
            node,
            dir,
            opts,
        };
        sim.write_services(&sim.opts.services_yaml.clone())?;
        // The agent first: weir-cni ADD waits for it to attach the pod's program.
        sim.start_agent()?;
        sim.node.cni = Some(Cni::sim(
            sim.opts.weir_bin.with_file_name("weir-cni"),
            sim.dir(),
            &sim.cni_socket(),
            10,
        ));
        sim.node.add_pod_cni(CLIENT, 10)?;
        for i in 1..=sim.opts.backends {
            sim.node.add_pod_cni(&format!("be-{i}"), 10 + i as u8)?;
        }
        sim.link_pod_netns()?;
        for i in 1..=sim.opts.backends {
            sim.start_echo(i)?;
        }
        Ok(sim)
    }

    pub fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// The agent's `--pod-netns-dir`: links to this node's pod namespaces only, so that the
    /// agent looks in no namespace of the machine but these.
    pub fn pod_netns_dir(&self) -> PathBuf {
        self.dir().join("netns")
    }

    /// Links every pod's namespace into [`Sim::pod_netns_dir`].
    pub fn link_pod_netns(&self) -> Result<()> {
        let dir = self.pod_netns_dir();
        fs::create_dir_all(&dir)?;
        for pod in &self.node.pods {
            let link = dir.join(&pod.ns.name);
            if !link.exists() {
                std::os::unix::fs::symlink(pod.ns.path(), &link)
                    .with_context(|| format!("link {}", link.display()))?;
            }
        }
        Ok(())
    }

    pub fn services_path(&self) -> PathBuf {
        self.dir().join("services.yaml")
    }

    pub fn maps_dir(&self) -> PathBuf {
        crate::datapath::pin_dir(&self.bpffs.path).maps()
    }

    /// Replaces the services file atomically (the agent notices within 200 ms).
    pub fn write_services(&self, yaml: &str) -> Result<()> {
        let tmp = self.dir().join("services.yaml.tmp");
        fs::write(&tmp, yaml)?;
        fs::rename(&tmp, self.services_path())?;
        Ok(())
    }

    pub fn start_echo(&mut self, i: usize) -> Result<()> {
        let pod = self
            .node
            .pod(&format!("be-{i}"))
            .context("no such backend pod")?;
        let mut cmd = pod.ns.command(&self.opts.weir_bin)?;
        cmd.args([
            "echo-server",
            "--name",
            &pod.name,
            "--port",
            &ECHO_PORT.to_string(),
        ])
        .stdout(Stdio::null());
        let p = Proc::spawn(&format!("echo {}", pod.name), cmd)?;
        self.echo.push(p);
        Ok(())
    }

    /// Stops the echo server of backend `i` (1-based).
    pub fn stop_echo(&mut self, i: usize) {
        let name = format!("echo be-{i}");
        self.echo.retain(|p| p.name != name);
    }

    /// Where the agent writes the podCIDRs of the Node called [`NODE_NAME`] in the source.
    pub fn pod_cidrs_file(&self) -> PathBuf {
        self.dir().join("pod-cidrs.json")
    }

    pub fn cni_socket(&self) -> PathBuf {
        self.dir().join("cni.sock")
    }

    pub fn agent_log(&self) -> PathBuf {
        self.dir().join("agent.log")
    }

    /// Starts the agent in the node namespace and waits until its first sync is programmed.
    pub fn start_agent(&mut self) -> Result<()> {
        let ready = self.dir().join("agent.ready");
        let _ = fs::remove_file(&ready);
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log())?;
        let mut cmd = self.node.ns.command(&self.opts.weir_bin)?;
        cmd.arg("agent")
            .arg("--source")
            .arg(format!("file:{}", self.services_path().display()))
            .arg("--bpffs")
            .arg(&self.bpffs.path)
            .arg("--cni-socket")
            .arg(self.cni_socket())
            .arg("--pod-cidrs-file")
            .arg(self.pod_cidrs_file())
            .arg("--node-name")
            .arg(NODE_NAME)
            .arg("--state-file")
            .arg(self.state_file())
            .arg("--pod-netns-dir")
            .arg(self.pod_netns_dir())
            .arg("--ready-file")
            .arg(&ready)
            .env(
                "RUST_LOG",
                std::env::var("WEIR_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log.try_clone()?)
            .stderr(log);
        for dev in &self.netdevs {
            cmd.arg("--netdev").arg(dev);
        }
        cmd.args(&self.agent_args);
        if self.opts.socket_lb {
            cmd.arg("--cgroup").arg(&self.cgroup.path);
        } else {
            cmd.arg("--no-socket-lb");
        }
        self.agent = Some(Proc::spawn("agent", cmd)?);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready.exists() {
            if let Some(a) = self.agent.as_mut() {
                if let Ok(Some(st)) = a.child.try_wait() {
                    bail!("agent exited ({st}):\n{}", self.agent_log_tail());
                }
            }
            if Instant::now() > deadline {
                bail!("agent not ready after 30s:\n{}", self.agent_log_tail());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(|a| a.child.id())
    }

    /// Kills the agent (SIGKILL: no chance to clean anything up, like a crash or an OOM kill).
    pub fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    pub fn agent_log_tail(&self) -> String {
        let text = fs::read_to_string(self.agent_log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// A command running `weir` in the client pod; `socket_lb` puts it in the hooked cgroup.
    pub fn client_command(&self, socket_lb: bool) -> Result<Command> {
        let pod = self.node.pod(CLIENT).context("no client pod")?;
        let mut cmd = pod.ns.command(&self.opts.weir_bin)?;
        if socket_lb {
            self.cgroup.adopt(&mut cmd)?;
        }
        Ok(cmd)
    }

    /// Runs `weir loadtest <args> --json` in the client pod and returns its report.
    pub fn loadtest(&self, args: &[&str], socket_lb: bool, progress: bool) -> Result<Report> {
        self.loadtest_spawn(args, socket_lb, progress)?.wait()
    }

    /// Starts `weir loadtest <args> --json` in the client pod; `wait` collects the report.
    pub fn loadtest_spawn(
        &self,
        args: &[&str],
        socket_lb: bool,
        progress: bool,
    ) -> Result<Running> {
        let mut cmd = self.client_command(socket_lb)?;
        cmd.arg("loadtest").args(args).arg("--json");
        if !progress {
            cmd.arg("--quiet");
        }
        cmd.stdout(Stdio::piped()).stderr(if progress {
            Stdio::inherit()
        } else {
            Stdio::piped()
        });
        let child = cmd
            .spawn()
            .context("start weir loadtest in the client pod")?;
        Ok(Running {
            child: Some(child),
            args: args.join(" "),
        })
    }

    pub fn status(&self) -> Result<status::Status> {
        let mut st = status::read(&self.maps_dir(), 64)?;
        st.by_service = status::read_reports(&self.state_file())?;
        Ok(st)
    }

    /// The agent's per-Service report.
    pub fn state_file(&self) -> PathBuf {
        self.dir().join("services.json")
    }

    /// Waits until the programmed services satisfy `f` (the agent applies edits within
    /// ~200 ms).
    pub fn wait_programmed(&self, what: &str, f: impl Fn(&status::Status) -> bool) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(s) = self.status() {
                if f(&s) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "not programmed after 10s: {what}\n{}",
                    self.agent_log_tail()
                );
            }
            thread::sleep(Duration::from_millis(25));
        }
    }
}

/// A `weir loadtest` running in the client pod; killed if dropped before `wait`.
pub struct Running {
    child: Option<std::process::Child>,
    args: String,
}

impl Running {
    pub fn wait(mut self) -> Result<Report> {
        let child = self.child.take().context("already waited")?;
        let out = child.wait_with_output().context("wait for weir loadtest")?;
        if !out.status.success() {
            bail!(
                "weir loadtest {} failed: {}",
                self.args,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "parse the loadtest report: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
