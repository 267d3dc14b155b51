//! What one run makes besides namespaces, each owned by a guard that removes it on drop (a
//! cgroup, a bpffs mount, a directory, a process), and the tags that name it all, so that a run
//! stopped by a signal before its guards ran removes it too.
use std::{
    fs,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
};

use anyhow::{bail, Context, Result};

use super::topo::ip;
use crate::node::netns::cgroup2_root;

/// A cgroup (v2) created for one run, removed on drop once empty.
#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
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
