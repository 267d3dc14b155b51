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

use http::{header::HeaderValue, StatusCode};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::server::{respond, spawn};

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
            let answer = move |_: &_| {
                let (svc, n) = table
                    .lock()
                    .ok()
                    .and_then(|t| t.get(&port).cloned())
                    .unwrap_or_default();
                answer(&svc, n)
            };
            self.servers
                .insert(port, spawn(listener, "health check", Arc::new(answer)));
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

/// The answer to any request on a Service's health check port: its state on this node.
fn answer(svc: &str, local_endpoints: usize) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let (ns, name) = svc.split_once('/').unwrap_or(("", svc));
    let body = serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string();
    let code = if local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut r = respond(code, "application/json", body);
    let h = r.headers_mut();
    h.insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(local_endpoints),
    );
    // One exchange per connection, as a load balancer's probe makes it.
    h.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    r
}
