//! The plugin's side of the agent's local socket: one JSON request per line, one reply.
//!
//! ADD returns only after the agent confirms that the per-packet program is attached to the
//! pod's host-side veth. The runtime starts the pod's containers after ADD returns, so no
//! packet of the pod can cross the veth before the program is there.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Request {
    /// Attach the pod programs to this device; `ifindex` tells a re-created device apart.
    Attach { ifname: String, ifindex: u32 },
    /// The device is going away; release its link.
    Detach { ifname: String },
    /// Is the program attached to this device?
    Check { ifname: String, ifindex: u32 },
    /// Is the agent ready (first sync programmed)?
    Ping,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply {
            ok: true,
            error: String::new(),
        }
    }

    pub fn err(e: impl std::fmt::Display) -> Reply {
        Reply {
            ok: false,
            error: e.to_string(),
        }
    }
}

/// Sends one request and waits for its reply.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<(), String> {
    let talk = || -> std::io::Result<String> {
        let mut s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut line = serde_json::to_string(req).map_err(std::io::Error::other)?;
        line.push('\n');
        s.write_all(line.as_bytes())?;
        let mut reply = String::new();
        BufReader::new(s).read_line(&mut reply)?;
        Ok(reply)
    };
    let reply = talk().map_err(|e| format!("agent socket {}: {e}", socket.display()))?;
    let reply: Reply = serde_json::from_str(&reply).map_err(|e| {
        format!(
            "agent socket {}: bad reply {reply:?}: {e}",
            socket.display()
        )
    })?;
    if reply.ok {
        Ok(())
    } else {
        Err(reply.error)
    }
}
