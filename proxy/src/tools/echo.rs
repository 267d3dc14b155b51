//! A small TCP+UDP echo server that answers with its own name, so a client can tell which
//! backend served it. Protocol: a request is `<seq>` (a line on TCP, a datagram on UDP); the
//! answer is `<name> <seq>`.
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UdpSocket},
};

/// Serves TCP and UDP on `port` of `ip` (`::`: every address, IPv4 and IPv6) until the task
/// is dropped. A UDP reply leaves from the address the socket is bound to, or, bound to every
/// address, from the one the route to the client gives.
pub async fn serve(name: String, ip: IpAddr, port: u16) -> Result<()> {
    let addr = SocketAddr::new(ip, port);
    let tcp = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind TCP {addr}"))?;
    let udp = UdpSocket::bind(addr)
        .await
        .with_context(|| format!("bind UDP {addr}"))?;
    let udp_name = name.clone();
    let udp_task = tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                continue;
            };
            let reply = format!("{udp_name} {}", String::from_utf8_lossy(&buf[..n]).trim());
            let _ = udp.send_to(reply.as_bytes(), from).await;
        }
    });
    loop {
        let (sock, _) = match tcp.accept().await {
            Ok(s) => s,
            Err(_) => continue,
        };
        let name = name.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            let (r, mut w) = sock.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if w.write_all(format!("{name} {line}\n").as_bytes())
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        if udp_task.is_finished() {
            anyhow::bail!("UDP server stopped");
        }
    }
}
