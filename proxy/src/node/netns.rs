//! The node's namespaces and cgroups as the agent uses them: entering a pod's network namespace
//! (to abort its sockets), finding the cgroup v2 hierarchy, the interfaces present.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use crate::error::{fail, Context, Result};

/// Moves the calling thread into the network namespace at `path` (setns is per thread).
pub fn enter(path: &Path) -> Result<()> {
    let f = fs::File::open(path).with_context(|| format!("open namespace {}", path.display()))?;
    nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter namespace {}", path.display()))
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
    fail!("no cgroup v2 hierarchy found at /sys/fs/cgroup/unified or /sys/fs/cgroup")
}

/// A cgroup v2 root has no `cgroup.type` (every other cgroup has one), wherever it is mounted.
pub fn is_cgroup_root(cg: &Path) -> bool {
    cg.is_dir() && !cg.join("cgroup.type").exists()
}

/// The interfaces of the calling thread's network namespace, by (name, index).
pub fn interfaces() -> BTreeSet<(String, u32)> {
    nix::net::if_::if_nameindex()
        .map(|l| {
            l.iter()
                .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_cgroup_v2_root_has_no_type() {
        let Ok(root) = super::cgroup2_root() else {
            return; // no cgroup v2 here: nothing to tell apart
        };
        assert!(super::is_cgroup_root(&root), "{}", root.display());
        let child = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .find(|e| e.path().join("cgroup.procs").exists());
        if let Some(c) = child {
            assert!(!super::is_cgroup_root(&c.path()), "{}", c.path().display());
        }
        assert!(!super::is_cgroup_root(std::path::Path::new("/nonexistent")));
    }
}
