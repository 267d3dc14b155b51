//! `weir agent`: loads the data path, programs services from the source, follows it.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{
    loader::{ensure_bpffs, Datapath, PinDir, TcRole},
    maps::AyaMaps,
    model,
    program::Programmer,
};

#[derive(Clone, Debug)]
pub struct Config {
    /// Multi-document YAML of Services and EndpointSlices.
    pub source: PathBuf,
    /// A bpffs mount; weir pins under `<bpffs>/weir`.
    pub bpffs: PathBuf,
    /// cgroup v2 directory for the socket-level hooks; None turns socket LB off.
    pub cgroup: Option<PathBuf>,
    /// Interfaces whose name starts with one of these are pod host-side veths.
    pub pod_if_prefixes: Vec<String>,
    pub netdevs: Vec<String>,
    /// Touched once the first sync is programmed.
    pub ready_file: Option<PathBuf>,
    pub once: bool,
}

pub fn pin_dir(bpffs: &Path) -> PinDir {
    PinDir(bpffs.join("weir"))
}

/// The interfaces of the agent's network namespace, by (name, index).
fn interfaces() -> BTreeSet<(String, u32)> {
    nix::net::if_::if_nameindex()
        .map(|l| {
            l.iter()
                .map(|i| (i.name().to_string_lossy().into_owned(), i.index()))
                .collect()
        })
        .unwrap_or_default()
}

fn stamp(p: &Path) -> Option<(SystemTime, u64)> {
    fs::metadata(p)
        .ok()
        .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
}

/// Reads the source and programs it. Problems with single objects are logged and skipped.
fn sync(cfg: &Config, programmer: &mut Programmer, maps: &mut AyaMaps) -> Result<()> {
    let text = fs::read_to_string(&cfg.source)
        .with_context(|| format!("read source {}", cfg.source.display()))?;
    let started = std::time::Instant::now();
    let (objs, mut problems) = model::parse_yaml(&text);
    let m = model::build(&objs);
    problems.extend(m.problems);
    for p in &problems {
        warn!(object = %p.object, "skipped: {}", p.message);
    }
    for s in &m.skipped {
        info!(service = %s.service, reason = %s.reason, "not programmed");
    }
    let st = programmer.apply(&m.desired, maps);
    for e in &st.errors {
        warn!("{e}");
    }
    info!(
        frontends = m.desired.len(),
        changed = st.services_changed,
        removed = st.services_removed,
        backends_added = st.backends_added,
        backends_removed = st.backends_removed,
        writes = st.writes,
        took_us = started.elapsed().as_micros() as u64,
        "programmed"
    );
    Ok(())
}

pub async fn run(cfg: Config) -> Result<()> {
    ensure_bpffs(&cfg.bpffs)?;
    let mut dp = Datapath::load(pin_dir(&cfg.bpffs))?;
    if let Some(cg) = &cfg.cgroup {
        dp.attach_cgroup(cg)?;
        info!(cgroup = %cg.display(), "socket load balancing attached");
    }
    for dev in &cfg.netdevs {
        dp.attach_tc(dev, TcRole::FromNetdev)?;
        info!(dev = %dev, "attached tc_from_netdev");
    }
    let mut maps = AyaMaps::open(&dp.pins().maps())?;
    let mut programmer = Programmer::adopt(&maps)?;
    let adopted = programmer.programmed_frontends().count();
    if adopted > 0 {
        info!(
            frontends = adopted,
            "adopted what a previous run programmed"
        );
    }
    // Pod devices by (name, index): one re-created under an old name is a new device.
    let mut attached: BTreeSet<(String, u32)> = BTreeSet::new();
    let mut last = None;
    let mut ready = false;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let present = interfaces();
        if attached.iter().any(|dev| !present.contains(dev)) {
            attached.retain(|dev| present.contains(dev));
            match dp.pins().prune_tc() {
                Ok(gone) => {
                    for pin in gone {
                        info!(pin = %pin.display(), "released the link of a device that is gone");
                    }
                }
                Err(e) => warn!("prune links: {e:#}"),
            }
        }
        for dev in present {
            let ifname = &dev.0;
            if !attached.contains(&dev)
                && cfg
                    .pod_if_prefixes
                    .iter()
                    .any(|p| ifname.starts_with(p.as_str()))
            {
                match dp.attach_tc(ifname, TcRole::FromPod) {
                    Ok(()) => {
                        info!(dev = %ifname, index = dev.1, "attached tc_from_pod");
                        attached.insert(dev);
                    }
                    Err(e) => warn!(dev = %ifname, "attach failed: {e:#}"),
                }
            }
        }
        let now = stamp(&cfg.source);
        if now != last {
            match sync(&cfg, &mut programmer, &mut maps) {
                Ok(()) => last = now,
                Err(e) => warn!("{e:#}"),
            }
            if !ready {
                ready = true;
                if let Some(f) = &cfg.ready_file {
                    fs::write(f, b"ready\n").with_context(|| format!("write {}", f.display()))?;
                }
            }
        }
        if cfg.once {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    // Links and maps stay pinned: the data path keeps serving while the agent is away.
    info!("stopping; the data path stays programmed");
    Ok(())
}
