//! The sync worker: a thread of its own that takes the source's changes to the data path (the
//! file source's reads, the model build, the map writes), so that a long sync (a cold one of
//! 100 000 Services, say) never holds up the agent's loop, its admin servers or weir-cni's
//! socket. The loop triggers it; it reports each sync it made.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{mpsc, Arc},
    thread,
    time::SystemTime,
};

use anyhow::Context;
use tracing::{error, warn};

use crate::{
    admin::Observed,
    datapath::{AyaMaps, Programmer},
    dns::ZoneFeed,
    error::Result,
    k8s::{
        file::{self, Stamp},
        KubeSource, Reconciler,
    },
    node::sockterm::Terminator,
};

/// Where the worker reads the objects from.
pub enum Objects {
    /// A YAML file, synced whole each time it changes.
    File(PathBuf),
    /// The Kubernetes API's stores, synced by what the watches changed.
    Kube(KubeSource),
}

/// Everything a sync touches, moved onto the worker's thread.
pub struct Parts {
    pub objects: Objects,
    /// Apply a file source that holds no Service (it withdraws every Service).
    pub allow_empty_source: bool,
    pub reconciler: Reconciler,
    pub programmer: Programmer,
    pub maps: AyaMaps,
    pub obs: Arc<Observed>,
    /// The DNS zone is rebuilt from the same objects after each sync.
    pub dns_feed: Option<ZoneFeed>,
    /// UDP backends the sync released go to the socket terminator.
    pub terminator: Option<Terminator>,
}

/// What one sync did, for the agent's loop.
#[derive(Debug)]
pub struct Done {
    /// healthCheckNodePort → (Service, this node's ready endpoints) to serve from now on; None
    /// when the sync failed (what is served stays).
    pub health_checks: Option<BTreeMap<u16, (String, usize)>>,
}

/// The worker's handle: triggers a sync.
pub struct SyncWorker {
    tx: mpsc::Sender<()>,
}

impl SyncWorker {
    /// Starts the worker; each sync it makes is reported on `done`.
    pub fn spawn(
        parts: Parts,
        done: tokio::sync::mpsc::UnboundedSender<Done>,
    ) -> anyhow::Result<SyncWorker> {
        let (tx, rx) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("weir-sync".into())
            .spawn(move || run(parts, rx, done))
            .context("start the sync thread")?;
        Ok(SyncWorker { tx })
    }

    /// Asks for a sync: of the file, if it changed since the last; of what the watches
    /// changed, once every kind is listed. Triggers that arrive during a sync make one more.
    pub fn trigger(&self) {
        let _ = self.tx.send(());
    }
}

fn run(mut p: Parts, rx: mpsc::Receiver<()>, done: tokio::sync::mpsc::UnboundedSender<Done>) {
    // The file's version last applied (or refused for what it holds), the one seen at the
    // trigger before, and the one whose read last failed.
    let (mut last, mut seen, mut unreadable): (Stamp, Stamp, Stamp) = (None, None, None);
    while rx.recv().is_ok() {
        // One sync serves every trigger that queued meanwhile.
        while rx.try_recv().is_ok() {}
        let health_checks = match &p.objects {
            Objects::File(path) => {
                let path = path.clone();
                let now = file::stamp(&path);
                if now == last {
                    continue;
                }
                p.obs.health.queued(SystemTime::now());
                // Applied only once it has stopped changing, the same at two triggers in a row
                // (a poll interval apart): a file written in steps is never applied half
                // written.
                if now != seen {
                    seen = now;
                    continue;
                }
                match sync_file(&mut p, &path) {
                    // The kernel's refusal (out of file descriptors, say) is no verdict on the
                    // file: tried again at the next trigger.
                    Err(e) if e.errno().is_some() => {
                        if unreadable != now {
                            warn!("{e}; tried again until it works");
                            unreadable = now;
                        }
                        p.obs.metrics.source_refused("unreadable").inc();
                        continue;
                    }
                    // What the file holds is wrong: reported once, and it stays pending (so
                    // /healthz fails after the health timeout) until fixed.
                    Err(e) => {
                        last = now;
                        warn!("{e}");
                        None
                    }
                    Ok(r) => {
                        last = now;
                        r
                    }
                }
            }
            Objects::Kube(k) => {
                if !k.progress.synced() {
                    continue;
                }
                if let Err(e) = p.reconciler.step(k, &mut p.programmer, &mut p.maps, &p.obs) {
                    warn!("{e:#}");
                }
                // The zone from the same stores, rebuilt on the DNS thread.
                if let Some(feed) = &p.dns_feed {
                    let k = k.clone();
                    feed.rebuild(Box::new(move || k.objects()));
                }
                Some(p.reconciler.health_checks())
            }
        };
        // A sync's garbage back to the system: this thread's heap arena keeps what it freed
        // otherwise, and a cold sync frees most of what it built.
        // SAFETY: malloc_trim only releases free heap memory.
        unsafe { libc::malloc_trim(0) };
        let gone = p.programmer.take_udp_backends_gone();
        if let Some(t) = &p.terminator {
            t.submit(gone);
        }
        if done.send(Done { health_checks }).is_err() {
            return;
        }
    }
}

/// Reads the file source and programs it, unless it holds no Service (refused, but with
/// `allow_empty_source`): the healthCheckNodePorts to serve then, or None where it was
/// refused for what it holds.
fn sync_file(p: &mut Parts, path: &Path) -> Result<Option<BTreeMap<u16, (String, usize)>>> {
    let (objs, problems) = file::read(path).inspect_err(|e| {
        if e.errno().is_none() {
            p.obs.metrics.source_refused("invalid").inc();
        }
    })?;
    if objs.services.is_empty() && !p.allow_empty_source {
        p.obs.metrics.source_refused("empty").inc();
        error!(
            source = %path.display(),
            "the source holds no Service: refused, what is programmed stays (--allow-empty-source applies it)"
        );
        return Ok(None);
    }
    if let Some(feed) = &p.dns_feed {
        let snapshot = objs.clone();
        feed.rebuild(Box::new(move || snapshot));
    }
    let r = p
        .reconciler
        .sync_all(&objs, problems, &mut p.programmer, &mut p.maps, &p.obs)?;
    Ok(Some(r.health_checks))
}
