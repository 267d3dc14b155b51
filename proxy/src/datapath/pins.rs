//! The pin layout under `<bpffs>/weir/`: `maps/<MAP>` and `links/<program>@<target>`. Pins are
//! what outlives the agent: a restarted agent adopts the maps and links they hold.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use crate::error::{Context, Result};

use super::programs::TcRole;

/// Where weir pins under a bpffs mount.
pub fn pin_dir(bpffs: &Path) -> PinDir {
    PinDir(bpffs.join("weir"))
}

/// Separates a device's name from its index in a TC link's pin name. Not `.`: bpffs refuses
/// names with a dot (reserved for its own files).
const TC_PIN_SEP: char = '#';

/// A pin directory (see the module).
#[derive(Clone, Debug)]
pub struct PinDir(pub PathBuf);

impl PinDir {
    pub fn maps(&self) -> PathBuf {
        self.0.join("maps")
    }
    pub fn links(&self) -> PathBuf {
        self.0.join("links")
    }
    pub(super) fn link(&self, program: &str, target: &str) -> PathBuf {
        self.links()
            .join(format!("{program}@{}", target.replace('/', "_")))
    }

    pub(super) fn cgroup_target(cgroup: &Path) -> String {
        format!("cgroup-{}", cgroup.display())
    }

    /// The pin of `role`'s link on `ifname`. The device's index is part of the name: a device
    /// deleted and created again under the same name is another device, and must not be taken
    /// for the one a pinned link points at.
    pub(super) fn tc_link(&self, ifname: &str, role: TcRole) -> Result<PathBuf> {
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
pub(super) fn unpin(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("unpin {}", path.display()))
        }
        _ => Ok(()),
    }
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
