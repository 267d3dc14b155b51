//! The server's sockets: UDP, and TCP (RFC 7766) within its limits.
use std::{
    io,
    sync::{atomic::Ordering, Arc},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream, UdpSocket},
    sync::Semaphore,
};
use tracing::warn;

use super::{Handler, Reply, MAX_TCP_CONNECTIONS, TCP_IDLE, TCP_MESSAGE_TIMEOUT};

/// Answers UDP queries on `sock` until the task is dropped; each query is its own task only
/// when it must be forwarded. A read error (a port unreachable of an earlier reply, say) is
/// not the end of the socket.
pub async fn serve_udp(sock: Arc<UdpSocket>, h: Arc<Handler>) -> io::Result<()> {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(e) => {
                warn!("DNS over UDP: receive: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let t0 = Instant::now();
        match h.respond(&buf[..n], true) {
            Reply::Message(m) => {
                if h.may_send(&m, peer.ip()) {
                    h.stats.replied(&m, t0.elapsed());
                    let _ = sock.send_to(&m, peer).await;
                }
            }
            Reply::Forward(name, t) => {
                let (sock, h, q) = (sock.clone(), h.clone(), buf[..n].to_vec());
                tokio::spawn(async move {
                    let m = h.forward(&q, name, t).await;
                    h.stats.replied(&m, t0.elapsed());
                    let _ = sock.send_to(&m, peer).await;
                });
            }
            Reply::Chase(c) => {
                let (sock, h) = (sock.clone(), h.clone());
                tokio::spawn(async move {
                    let m = h.chase(*c).await;
                    h.stats.replied(&m, t0.elapsed());
                    let _ = sock.send_to(&m, peer).await;
                });
            }
            Reply::Drop => {}
        }
    }
}

/// Answers TCP connections on `listener` (2-byte length-prefixed messages, several per
/// connection) until the task is dropped: at most `MAX_TCP_CONNECTIONS` at once (one past them
/// is closed at once). A failed accept (out of file descriptors, say) is counted, logged at
/// most every 10 s, and retried after a pause: it never ends the listener.
pub async fn serve_tcp(listener: TcpListener, h: Arc<Handler>) -> io::Result<()> {
    let slots = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    let mut logged: Option<Instant> = None;
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                h.stats.tcp_accept_errors.fetch_add(1, Ordering::Relaxed);
                if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    warn!("DNS over TCP: accept: {e}; retrying");
                    logged = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            h.stats.tcp_refused.fetch_add(1, Ordering::Relaxed);
            drop(conn);
            continue;
        };
        let h = h.clone();
        tokio::spawn(async move {
            h.stats.tcp_connections.fetch_add(1, Ordering::Relaxed);
            if let Err(TcpEnd::TimedOut) = tcp_connection(conn, &h).await {
                h.stats.tcp_timeouts.fetch_add(1, Ordering::Relaxed);
            }
            h.stats.tcp_connections.fetch_sub(1, Ordering::Relaxed);
            drop(slot);
        });
    }
}

/// Why a TCP connection ended early.
enum TcpEnd {
    TimedOut,
    Io,
}

impl From<io::Error> for TcpEnd {
    fn from(_: io::Error) -> Self {
        TcpEnd::Io
    }
}

/// Serves one connection: closed after `TCP_IDLE` without a message, or when a message (or the
/// taking of a reply) takes over `TCP_MESSAGE_TIMEOUT`. A message's buffer grows with what
/// arrives, not with the length it announces.
async fn tcp_connection(mut conn: TcpStream, h: &Handler) -> Result<(), TcpEnd> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, conn.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let len = u16::from_be_bytes(len) as usize;
        let mut q = Vec::with_capacity(len.min(512));
        let mut body = (&mut conn).take(len as u64);
        match tokio::time::timeout(TCP_MESSAGE_TIMEOUT, body.read_to_end(&mut q)).await {
            Ok(Ok(n)) if n == len => {}
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(TcpEnd::TimedOut),
        }
        let t0 = Instant::now();
        if let Some(m) = h.reply_to(&q, false).await {
            h.stats.replied(&m, t0.elapsed());
            let mut out = Vec::with_capacity(m.len() + 2);
            out.extend_from_slice(&(m.len() as u16).to_be_bytes());
            out.extend_from_slice(&m);
            match tokio::time::timeout(TCP_MESSAGE_TIMEOUT, conn.write_all(&out)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(TcpEnd::TimedOut),
            }
        }
    }
}
