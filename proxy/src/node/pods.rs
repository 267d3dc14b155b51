//! The node's pod veths, from the agent's side: found by polling the node's interfaces or named
//! by weir-cni, each gets the pod programs (or none, with `--pod-programs none`) and is recorded
//! for the programs' hand-off into pods; a device that goes is forgotten and its link released.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::error::{Context, Result};
use tracing::{info, warn};
use weir_cni_proto::{Reply, Request};

use super::netns::interfaces;
use crate::datapath::{Datapath, HostRouting, PodPrograms};

/// A device by (name, index): one re-created under an old name is a new device.
type Dev = (String, u32);

/// The pod veths and the loaded programs they get.
pub struct PodVeths {
    dp: Datapath,
    /// Devices whose name starts with one of these are pod veths.
    prefixes: Vec<String>,
    /// Pod veths handled (programs attached, or none needed, and recorded).
    attached: BTreeSet<Dev>,
    /// When each present device was first seen. With weir-cni asking (`cni`), a new pod device
    /// is left to its ADD, which is about to ask for it: the poll attaches only devices nobody
    /// asked for within `settle` (made without the plugin). Without it, and on the first poll
    /// (devices made while the agent was away), it attaches at once.
    first_seen: BTreeMap<Dev, Instant>,
    first_poll: bool,
    cni: bool,
}

impl PodVeths {
    pub fn new(dp: Datapath, prefixes: Vec<String>, cni: bool) -> Self {
        PodVeths {
            dp,
            prefixes,
            attached: BTreeSet::new(),
            first_seen: BTreeMap::new(),
            first_poll: true,
            cni,
        }
    }

    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    /// Looks at the node's interfaces: forgets pod veths that are gone, handles new ones that
    /// have waited `settle` for weir-cni. The first poll also forgets what an earlier run
    /// recorded of devices gone meanwhile, and finishes an upgrade's conntrack migration (every
    /// program of the earlier run is replaced by then).
    pub fn poll(&mut self, settle: Duration) {
        let present = interfaces();
        self.first_seen.retain(|dev, _| present.contains(dev));
        for dev in &present {
            self.first_seen
                .entry(dev.clone())
                .or_insert_with(Instant::now);
        }
        if self.attached.iter().any(|dev| !present.contains(dev)) {
            self.forget(|dev| !present.contains(dev));
            match self.dp.pins().prune_tc() {
                Ok(gone) => {
                    for pin in gone {
                        info!(pin = %pin.display(), "released the link of a device that is gone");
                    }
                }
                Err(e) => warn!("prune links: {e:#}"),
            }
        }
        for dev in &present {
            let settled = !self.cni
                || self.first_poll
                || self
                    .first_seen
                    .get(dev)
                    .is_some_and(|t| t.elapsed() >= settle);
            if settled && !self.attached.contains(dev) && self.is_pod_veth(&dev.0) {
                if let Err(e) = self.attach(dev.clone(), "poll") {
                    warn!(dev = %dev.0, "{e:#}");
                }
            }
        }
        if self.first_poll {
            self.first_poll = false;
            let keep = match self.dp.host_routing() {
                HostRouting::Bpf => self.attached.iter().map(|(_, index)| *index).collect(),
                HostRouting::Kernel => Default::default(),
            };
            if let Err(e) = self.dp.retain_pod_devs(&keep) {
                warn!("{e:#}");
            }
            match self.dp.finish_ct_migration() {
                Ok(0) => {}
                Ok(n) => info!(flows = n, "conntrack entries of an earlier layout copied"),
                Err(e) => warn!("{e:#}"),
            }
        }
    }

    fn is_pod_veth(&self, ifname: &str) -> bool {
        self.prefixes.iter().any(|p| ifname.starts_with(p.as_str()))
    }

    /// Attaches the pod programs to a pod device, found by polling or named by weir-cni.
    fn attach(&mut self, dev: Dev, by: &str) -> Result<()> {
        let started = Instant::now();
        self.dp
            .attach_pod_tc(&dev.0)
            .with_context(|| format!("attach the pod programs to {}", dev.0))?;
        let took_us = started.elapsed().as_micros() as u64;
        // With either setting of pod programs, translated packets to the pod are handed
        // straight into it (unless --host-routing kernel, where this records nothing).
        if let Err(e) = self.dp.add_pod_dev(&dev.0, dev.1) {
            warn!(dev = %dev.0, "packets to this pod take the node's stack: {e:#}");
        }
        if self.dp.pod_programs() == PodPrograms::None {
            info!(dev = %dev.0, index = dev.1, by, took_us, "pod veth without programs (socket LB)");
        } else {
            info!(dev = %dev.0, index = dev.1, by, took_us, "attached tc_from_pod");
        }
        self.attached.insert(dev);
        Ok(())
    }

    /// Forgets the pod veths that `gone` says are gone (two map calls each: this is on
    /// weir-cni's DEL).
    fn forget(&mut self, gone: impl Fn(&Dev) -> bool) {
        for dev in self.attached.iter().filter(|d| gone(d)) {
            if let Err(e) = self.dp.forget_pod_dev(dev.1) {
                warn!(dev = %dev.0, "{e:#}");
            }
        }
        self.attached.retain(|d| !gone(d));
    }

    /// Answers one request of weir-cni; `ready`: the first sync is programmed.
    pub fn answer(&mut self, req: Request, ready: bool) -> Reply {
        match req {
            Request::Ping if ready => Reply::ok(),
            Request::Ping => Reply::err("the first sync is not programmed yet"),
            Request::Attach { ifname, ifindex } => {
                let dev = (ifname.clone(), ifindex);
                if !interfaces().contains(&dev) {
                    return Reply::err(format!("no device {ifname} with index {ifindex}"));
                }
                if self.attached.contains(&dev) {
                    return Reply::ok();
                }
                match self.attach(dev, "weir-cni") {
                    Ok(()) => Reply::ok(),
                    Err(e) => Reply::err(format!("{e:#}")),
                }
            }
            Request::Check { ifname, ifindex } => {
                if !interfaces().contains(&(ifname.clone(), ifindex)) {
                    return Reply::err(format!("no device {ifname} with index {ifindex}"));
                }
                match self.dp.pod_tc_attached(&ifname) {
                    Ok(true) => Reply::ok(),
                    Ok(false) if self.dp.pod_programs() == PodPrograms::None => Reply::err(format!(
                        "tc_from_pod or tc_to_pod of an earlier run is still on {ifname} (index {ifindex}); this agent puts none on pod veths"
                    )),
                    Ok(false) => Reply::err(format!(
                        "this agent's tc_from_pod and tc_to_pod do not both run on {ifname} (index {ifindex})"
                    )),
                    Err(e) => Reply::err(format!("{e:#}")),
                }
            }
            Request::Detach { ifname } => {
                // weir-cni deletes the device before it says so: its pin is one of a device
                // that is gone, which prune releases.
                self.forget(|(n, _)| *n == ifname);
                if let Err(e) = self.dp.pins().prune_tc() {
                    warn!("prune links: {e:#}");
                }
                Reply::ok()
            }
        }
    }
}

/// What the pod veths' thread is asked.
enum Cmd {
    /// Look at the node's interfaces (see [`PodVeths::poll`]).
    Poll,
    /// Answer weir-cni; `ready`: the first sync is programmed.
    Ask(Request, bool, tokio::sync::oneshot::Sender<Reply>),
}

/// The pod veths on a thread of their own: attaching programs is netlink and map work that must
/// not hold up the agent's loop, and one thread keeps weir-cni's requests and the polls in
/// order. Cloned for each weir-cni client.
#[derive(Clone)]
pub struct PodsWorker {
    tx: mpsc::Sender<Cmd>,
}

impl PodsWorker {
    /// Moves `pods` onto a thread of their own; a poll attaches devices that waited `settle`.
    pub fn spawn(mut pods: PodVeths, settle: Duration) -> Result<PodsWorker> {
        let (tx, rx) = mpsc::channel::<Cmd>();
        thread::Builder::new()
            .name("weir-pods".into())
            .spawn(move || {
                while let Ok(cmd) = rx.recv() {
                    match cmd {
                        Cmd::Poll => pods.poll(settle),
                        Cmd::Ask(req, ready, reply) => {
                            let _ = reply.send(pods.answer(req, ready));
                        }
                    }
                }
            })
            .context("start the pod veths' thread")?;
        Ok(PodsWorker { tx })
    }

    /// Asks for a poll of the node's interfaces.
    pub fn poll(&self) {
        let _ = self.tx.send(Cmd::Poll);
    }

    /// weir-cni's request, answered on the pod veths' thread.
    pub async fn ask(&self, req: Request, ready: bool) -> Reply {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.tx.send(Cmd::Ask(req, ready, tx)).is_err() {
            return Reply::err("the agent is stopping");
        }
        rx.await
            .unwrap_or_else(|_| Reply::err("the agent is stopping"))
    }
}
