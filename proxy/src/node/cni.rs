//! The agent's side of weir-cni's socket (`weir_cni_proto`): one request per connection, one
//! line each way.
use std::{fs, path::Path, time::Duration};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};
use weir_cni_proto::{Reply, Request};

use super::pods::PodVeths;

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

/// Reads one request from `stream`, answers it from `pods`, and writes the reply.
pub async fn serve_one(stream: UnixStream, pods: &mut PodVeths, ready: bool) -> Result<()> {
    let mut s = BufReader::new(stream);
    let mut line = String::new();
    tokio::time::timeout(REQUEST_TIMEOUT, s.read_line(&mut line))
        .await
        .context("weir-cni request timed out")??;
    let reply = match Request::from_line(&line) {
        Ok(req) => pods.answer(req, ready),
        Err(e) => Reply::err(e),
    };
    s.get_mut().write_all(reply.to_line().as_bytes()).await?;
    Ok(())
}
