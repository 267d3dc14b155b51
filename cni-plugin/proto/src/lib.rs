//! What `weir-cni` and the weir agent say to each other, and nothing else: both link this
//! crate, neither links the other.
//!
//! - The agent's local socket ([`DEFAULT_AGENT_SOCKET`]): one JSON [`Request`] per line, one
//!   JSON [`Reply`] per line. ADD returns only after the agent says the pod's veth is ready
//!   (its programs attached, or none needed), so no packet of the pod crosses the veth before.
//! - The podCIDRs file ([`DEFAULT_POD_CIDRS_FILE`], [`PodCidrs`]): the agent writes its Node's
//!   `spec.podCIDRs` there; weir-cni's IPAM allocates from them when no range is configured.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Where the agent listens for weir-cni by default.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/weir/cni.sock";
/// Where the agent writes the node's podCIDRs by default.
pub const DEFAULT_POD_CIDRS_FILE: &str = "/run/weir/pod-cidrs.json";
/// The longest request line the agent reads: anything longer is not a request.
pub const MAX_LINE: usize = 4096;

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

    /// The reply as it goes on the wire: one JSON line.
    pub fn to_line(&self) -> String {
        // A struct of a bool and a string always serializes.
        let mut line = serde_json::to_string(self).unwrap_or_else(|_| "{\"ok\":false}".into());
        line.push('\n');
        line
    }
}

impl Request {
    /// Reads a request from one line of the wire; the error says what was wrong with it.
    pub fn from_line(line: &str) -> Result<Request, String> {
        serde_json::from_str(line.trim_end()).map_err(|e| format!("bad request {line:?}: {e}"))
    }
}

/// Sends one request and waits for its reply; `Err` carries the agent's error, or why it could
/// not be asked.
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

/// The podCIDRs file: `{"podCIDRs": ["…", "…"]}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct PodCidrs {
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_keep_their_wire_form() {
        let r = Request::Attach {
            ifname: "weir1234".into(),
            ifindex: 7,
        };
        let line = serde_json::to_string(&r).expect("serialize");
        assert_eq!(line, r#"{"op":"attach","ifname":"weir1234","ifindex":7}"#);
        assert_eq!(Request::from_line(&format!("{line}\n")), Ok(r));
        assert_eq!(Reply::ok().to_line(), "{\"ok\":true}\n");
        assert_eq!(
            Reply::err("no device").to_line(),
            "{\"ok\":false,\"error\":\"no device\"}\n"
        );
        assert!(Request::from_line("{\"op\":\"explode\"}")
            .unwrap_err()
            .contains("bad request"));
        let p: PodCidrs = serde_json::from_str(r#"{"podCIDRs":["198.18.1.0/24"]}"#).expect("parse");
        assert_eq!(p.pod_cidrs, ["198.18.1.0/24"]);
    }
}
