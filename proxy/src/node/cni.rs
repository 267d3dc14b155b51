//! The agent's side of weir-cni's socket (`weir_cni_proto`): one request per connection, one
//! line each way, each client on a task of its own (a slow one holds up nobody else).
use std::{
    fs,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use crate::error::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::warn;
use weir_cni_proto::{Reply, Request, MAX_LINE};

use super::pods::PodsWorker;

/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Listens on `path`, replacing a socket an earlier agent left.
pub fn listen(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // A socket left by an earlier agent: nobody answers on it any more.
    let _ = fs::remove_file(path);
    UnixListener::bind(path).with_context(|| format!("listen on {}", path.display()))
}

/// Serves weir-cni on `listener` until the runtime stops: each connection on a task of its own,
/// answered by `pods`; `ready` says whether the first sync is programmed.
pub fn serve(listener: UnixListener, pods: PodsWorker, ready: Arc<AtomicBool>) {
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("weir-cni socket: accept: {e}");
                    // Out of file descriptors, say: try again later, never spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (pods, ready) = (pods.clone(), ready.load(Ordering::Acquire));
            tokio::spawn(async move {
                if let Err(e) = serve_one(stream, &pods, ready).await {
                    warn!("weir-cni socket: {e:#}");
                }
            });
        }
    });
}

/// Reads one request from `stream`, has `pods` answer it, and writes the reply.
async fn serve_one(stream: UnixStream, pods: &PodsWorker, ready: bool) -> Result<()> {
    let mut s = BufReader::new(stream);
    let mut line = String::new();
    // A request is a short line: no more than that is read.
    let mut request = (&mut s).take(MAX_LINE as u64);
    tokio::time::timeout(REQUEST_TIMEOUT, request.read_line(&mut line))
        .await
        .context("weir-cni request timed out")??;
    let reply = match Request::from_line(&line) {
        Ok(req) => pods.ask(req, ready).await,
        Err(e) => Reply::err(e),
    };
    s.get_mut().write_all(reply.to_line().as_bytes()).await?;
    Ok(())
}
