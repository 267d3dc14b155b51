//! Connected UDP sockets that the socket hooks sent to a backend which has since gone.
//!
//! `connect` on a UDP socket to a service address is balanced once, in the hook: from then on
//! the socket is connected to the backend itself, and no packet of it passes anything weir
//! could rewrite. When that backend leaves the service, the socket would keep talking to it
//! (or to nothing) for as long as the application keeps it. So the agent aborts such sockets
//! the way `ss -K` does (sock_diag `SOCK_DESTROY`, `CONFIG_INET_DIAG_DESTROY`): the application
//! gets `ECONNABORTED`, connects again, and the hook picks a live backend. Cilium does the same
//! (`TerminateUDPConnectionsToBackend`).
//!
//! Only sockets the hooks connected to that backend are touched, told by their cookie in
//! `LB_SKREV` (written by `connect`): a socket an application connected to the pod's address
//! by itself is left alone. Sockets live in the pods' network namespaces: the agent looks in
//! its own and in each one pinned under the pod namespace directory (`/var/run/netns`, where
//! container runtimes pin them).
use std::{
    collections::BTreeSet,
    fs, io,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
};

use crate::error::{Context, Result};
use aya::maps::{HashMap, MapData};
use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_sock_diag::{
    constants::{AF_INET, AF_INET6, IPPROTO_UDP},
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    SockDiagDestroy, SockDiagMessage,
};
use netlink_sys::{protocols::NETLINK_SOCK_DIAG, Socket};
use tracing::{debug, info, warn};
use weir_common::{map_names, SockKey, SockValue};

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Network namespaces looked in (the agent's own included).
    pub namespaces: usize,
    /// Sockets aborted.
    pub destroyed: usize,
    /// Namespaces or sockets that could not be handled, with why.
    pub errors: Vec<String>,
}

/// The sockets' reverse map, from its pin: which socket the hooks connected to which backend.
pub struct SockRev(HashMap<MapData, SockKey, SockValue>);

impl SockRev {
    pub fn open(maps_dir: &Path) -> Result<SockRev> {
        Ok(SockRev(crate::datapath::open_typed(
            maps_dir,
            map_names::SOCK_REV,
        )?))
    }

    /// Whether the hooks connected the socket `cookie` to `backend` through `frontend`;
    /// forgets it if so.
    fn take(&mut self, cookie: u64, frontend: SocketAddr, backend: SocketAddr) -> bool {
        let key = SockKey {
            cookie,
            addr: crate::datapath::addr::to_addr(backend.ip()),
            port: backend.port().to_be(),
            _pad: [0; 6],
        };
        let through = |v: &SockValue| {
            crate::datapath::addr::to_ip(&v.addr) == frontend.ip()
                && u16::from_be(v.port) == frontend.port()
        };
        if !self.0.get(&key, 0).is_ok_and(|v| through(&v)) {
            return false;
        }
        let _ = self.0.remove(&key);
        true
    }
}

/// Runs the passes on a thread of its own: they enter namespaces (setns is per thread) and
/// they should not hold up programming.
pub struct Terminator {
    tx: mpsc::Sender<Vec<Gone>>,
}

impl Terminator {
    pub fn start(maps_dir: &Path, pod_netns_dir: Option<PathBuf>) -> Result<Terminator> {
        let mut rev = SockRev::open(maps_dir)?;
        let (tx, rx) = mpsc::channel::<Vec<Gone>>();
        thread::Builder::new()
            .name("weir-sockterm".into())
            .spawn(move || {
                while let Ok(mut gone) = rx.recv() {
                    // Batches that queued meanwhile go in the same pass.
                    gone.extend(rx.try_iter().flatten());
                    let o = terminate(&gone, &mut rev, pod_netns_dir.as_deref());
                    for e in &o.errors {
                        warn!("aborting UDP sockets of removed backends: {e}");
                    }
                    info!(
                        backends = gone.len(),
                        namespaces = o.namespaces,
                        udp_sockets_aborted = o.destroyed,
                        "UDP sockets connected to removed backends aborted"
                    );
                }
            })
            .context("start the socket terminator thread")?;
        Ok(Terminator { tx })
    }

    /// Queues UDP backends that left (nothing happens for an empty list).
    pub fn submit(&self, gone: Vec<Gone>) {
        if !gone.is_empty() {
            let _ = self.tx.send(gone);
        }
    }
}

/// A UDP backend that left a frontend: (frontend, backend).
pub type Gone = (SocketAddr, SocketAddr);

/// Aborts, in the calling thread's namespace and in each one pinned under `pod_netns_dir`,
/// the connected UDP sockets the hooks sent to one of `gone`.
pub fn terminate(gone: &[Gone], rev: &mut SockRev, pod_netns_dir: Option<&Path>) -> Outcome {
    let gone: BTreeSet<Gone> = gone.iter().copied().collect();
    let mut o = Outcome::default();
    let mut visit = |what: &str, sock: io::Result<Socket>, o: &mut Outcome| {
        o.namespaces += 1;
        match sock.and_then(|s| in_namespace(&s, &gone, rev)) {
            Ok((n, failed)) => {
                o.destroyed += n;
                o.errors
                    .extend(failed.into_iter().map(|e| format!("{what}: {e}")));
            }
            Err(e) => o.errors.push(format!("{what}: {e}")),
        }
    };
    visit("own namespace", diag_socket(), &mut o);
    let Some(dir) = pod_netns_dir else {
        return o;
    };
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            debug!(dir = %dir.display(), "no pod namespaces to look in: {e}");
            return o;
        }
    };
    for e in entries.flatten() {
        let path = e.path();
        visit(&path.display().to_string(), diag_socket_in(&path), &mut o);
    }
    o
}

fn diag_socket() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_SOCK_DIAG)?;
    s.bind_auto()?;
    s.connect(&netlink_sys::SocketAddr::new(0, 0))?;
    Ok(s)
}

/// A sock_diag socket of the namespace pinned at `path`: made by a thread that entered it (a
/// socket stays in the namespace it was made in).
fn diag_socket_in(path: &Path) -> io::Result<Socket> {
    let path = path.to_path_buf();
    thread::spawn(move || {
        super::netns::enter(&path).map_err(|e| io::Error::other(format!("{e:#}")))?;
        diag_socket()
    })
    .join()
    .map_err(|_| io::Error::other("namespace thread panicked"))?
}

/// Aborts the sockets of one namespace; returns how many, and the sockets it failed to abort
/// (one failure does not leave the others on their backend).
fn in_namespace(
    s: &Socket,
    gone: &BTreeSet<Gone>,
    rev: &mut SockRev,
) -> io::Result<(usize, Vec<String>)> {
    let (mut n, mut failed) = (0, Vec::new());
    for family in [AF_INET, AF_INET6] {
        let want = |a: &IpAddr| a.is_ipv4() == (family == AF_INET);
        if !gone.iter().any(|(_, be)| want(&be.ip())) {
            continue;
        }
        for id in connected_udp(s, family)? {
            let peer = SocketAddr::new(id.destination_address, id.destination_port);
            let c = cookie(&id);
            if !gone
                .iter()
                .any(|&(fe, be)| be == peer && rev.take(c, fe, be))
            {
                continue;
            }
            match destroy(s, family, id) {
                Ok(()) => n += 1,
                // Closed meanwhile: nothing left to abort.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => failed.push(format!("abort the socket connected to {peer}: {e}")),
            }
        }
    }
    Ok((n, failed))
}

/// The socket cookie as `bpf_get_socket_cookie` gives it: two native-endian words, low first.
fn cookie(id: &SocketId) -> u64 {
    let c = id.cookie;
    let lo = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]);
    let hi = u32::from_ne_bytes([c[4], c[5], c[6], c[7]]);
    (u64::from(hi) << 32) | u64::from(lo)
}

fn request(family: u8, socket_id: SocketId) -> InetRequest {
    InetRequest {
        family,
        protocol: IPPROTO_UDP,
        extensions: ExtensionFlags::empty(),
        // A connected UDP socket is in TCP_ESTABLISHED.
        states: StateFlags::ESTABLISHED,
        socket_id,
    }
}

fn send<T: netlink_packet_core::NetlinkSerializable>(
    s: &Socket,
    flags: u16,
    payload: T,
) -> io::Result<()> {
    let mut h = NetlinkHeader::default();
    h.flags = flags;
    let mut msg = NetlinkMessage::new(h, NetlinkPayload::InnerMessage(payload));
    msg.finalize();
    let mut buf = vec![0; msg.buffer_len()];
    msg.serialize(&mut buf);
    s.send(&buf, 0)?;
    Ok(())
}

/// Reads replies until `Done` or an error/ack, handing each inner message to `f`.
fn receive(s: &Socket, mut f: impl FnMut(SockDiagMessage)) -> io::Result<()> {
    let mut buf = vec![0; 1 << 16];
    loop {
        let size = s.recv(&mut &mut buf[..], 0)?;
        let mut at = 0;
        while at < size {
            let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&buf[at..size])
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
            let len = msg.header.length as usize;
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => f(m),
                NetlinkPayload::Done(_) => return Ok(()),
                NetlinkPayload::Error(e) => {
                    return match e.code {
                        None => Ok(()),
                        Some(c) => Err(io::Error::from_raw_os_error(-c.get())),
                    }
                }
                _ => {}
            }
            if len == 0 {
                break;
            }
            at += len;
        }
    }
}

/// The connected UDP sockets of one family.
fn connected_udp(s: &Socket, family: u8) -> io::Result<Vec<SocketId>> {
    let id = if family == AF_INET {
        SocketId::new_v4()
    } else {
        SocketId::new_v6()
    };
    send(
        s,
        NLM_F_REQUEST | NLM_F_DUMP,
        SockDiagMessage::InetRequest(request(family, id)),
    )?;
    let mut out = Vec::new();
    receive(s, |m| {
        if let SockDiagMessage::InetResponse(r) = m {
            out.push(r.header.socket_id.clone());
        }
    })?;
    Ok(out)
}

fn destroy(s: &Socket, family: u8, id: SocketId) -> io::Result<()> {
    send(
        s,
        NLM_F_REQUEST | NLM_F_ACK,
        SockDiagDestroy::new(SockDiagMessage::InetRequest(request(family, id))),
    )?;
    receive(s, |_| {})
}
