//! The per-Service health checks kube-proxy serves for load balancers: on the
//! `healthCheckNodePort` of each Service with `externalTrafficPolicy: Local`, `GET /` answers
//! 200 while this node has a ready endpoint of the Service and 503 when it has none, with
//! kube-proxy's JSON body and headers, so that a cloud load balancer sends traffic only to
//! nodes that can serve it.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinHandle,
};
use tracing::{info, warn};

type Table = BTreeMap<u16, (String, usize)>;

/// The listeners, one per port, and what each answers.
#[derive(Default)]
pub struct HealthChecks {
    table: Arc<Mutex<Table>>,
    servers: BTreeMap<u16, JoinHandle<()>>,
}

impl HealthChecks {
    /// Serves exactly `want` from now on: new ports get a listener on every address, ports no
    /// longer wanted lose theirs, the others answer the new counts. A port that cannot be
    /// bound is reported and tried again at the next call.
    pub fn serve(&mut self, want: &Table) {
        if let Ok(mut t) = self.table.lock() {
            *t = want.clone();
        }
        self.servers.retain(|port, task| {
            let keep = want.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "health check closed");
            }
            keep
        });
        for (port, (svc, _)) in want {
            if self.servers.contains_key(port) {
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
            let listener = match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .and_then(tokio::net::TcpListener::from_std)
            {
                Ok(l) => l,
                Err(e) => {
                    warn!(port, service = %svc, "health check: bind {addr}: {e}");
                    continue;
                }
            };
            info!(port, service = %svc, "serving the health check");
            let (table, port) = (self.table.clone(), *port);
            self.servers.insert(
                port,
                tokio::spawn(async move {
                    loop {
                        let Ok((conn, _)) = listener.accept().await else {
                            continue;
                        };
                        let table = table.clone();
                        tokio::spawn(async move {
                            let _ = answer(conn, port, &table).await;
                        });
                    }
                }),
            );
        }
    }
}

impl Drop for HealthChecks {
    fn drop(&mut self) {
        for t in self.servers.values() {
            t.abort();
        }
    }
}

/// One HTTP exchange: whatever the request, the port's state.
async fn answer(
    mut conn: tokio::net::TcpStream,
    port: u16,
    table: &Mutex<Table>,
) -> std::io::Result<()> {
    let mut buf = [0u8; 1024];
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.read(&mut buf)).await;
    let (svc, n) = table
        .lock()
        .ok()
        .and_then(|t| t.get(&port).cloned())
        .unwrap_or_default();
    let (ns, name) = svc.split_once('/').unwrap_or(("", svc.as_str()));
    let body = serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": n,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let status = if n > 0 {
        "200 OK"
    } else {
        "503 Service Unavailable"
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
         X-Load-Balancing-Endpoint-Weight: {n}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(resp.as_bytes()).await?;
    conn.shutdown().await
}
