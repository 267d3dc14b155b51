//! The per-Service health checks kube-proxy serves for load balancers: on the
//! `healthCheckNodePort` of each Service with `externalTrafficPolicy: Local`, `GET /` answers
//! 200 while this node has a ready endpoint of the Service and the proxy is healthy (its
//! `/livez`: no change waiting past the health timeout), and 503 otherwise, with kube-proxy's
//! JSON body and headers, so that a cloud load balancer sends traffic only to nodes that can
//! serve it.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use http::{header::HeaderValue, StatusCode};
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{
    server::{respond, spawn},
    Observed,
};

type Table = BTreeMap<u16, (String, usize)>;

/// The listeners, one per port, and what each answers.
pub struct HealthChecks {
    table: Arc<Mutex<Table>>,
    servers: BTreeMap<u16, JoinHandle<()>>,
    /// The proxy's health, which every answer carries.
    obs: Arc<Observed>,
}

impl HealthChecks {
    pub fn new(obs: Arc<Observed>) -> Self {
        HealthChecks {
            table: Arc::default(),
            servers: BTreeMap::new(),
            obs,
        }
    }

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
            let (table, port, obs) = (self.table.clone(), *port, self.obs.clone());
            let refused = obs.metrics.admin_refused("healthcheck");
            let answer = move |_: &_| {
                let (svc, n) = table
                    .lock()
                    .ok()
                    .and_then(|t| t.get(&port).cloned())
                    .unwrap_or_default();
                let (healthy, _, _) = obs.health.check(SystemTime::now());
                answer(&svc, n, healthy)
            };
            self.servers.insert(
                port,
                spawn(listener, "health check", Arc::new(answer), refused),
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

/// The answer to any request on a Service's health check port: its state on this node, and
/// whether the proxy is healthy (kube-proxy answers 503 while it is not, whatever the endpoints,
/// so that load balancers drain the node).
fn answer(
    svc: &str,
    local_endpoints: usize,
    proxy_healthy: bool,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let (ns, name) = svc.split_once('/').unwrap_or(("", svc));
    let body = serde_json::json!({
        "service": {"namespace": ns, "name": name},
        "localEndpoints": local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    })
    .to_string();
    let code = if local_endpoints > 0 && proxy_healthy {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unhealthy_proxy_drains_the_node_whatever_its_endpoints() {
        let body = |r: http::Response<http_body_util::Full<bytes::Bytes>>| {
            use http_body_util::BodyExt;
            let (parts, b) = r.into_parts();
            let bytes = futures_util::FutureExt::now_or_never(b.collect())
                .expect("a full body is ready")
                .expect("infallible")
                .to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
            (parts.status, v)
        };
        let (code, v) = body(answer("demo/lb", 2, true));
        assert_eq!(code, StatusCode::OK);
        assert_eq!(v["serviceProxyHealthy"], true);
        assert_eq!(v["localEndpoints"], 2);
        let (code, v) = body(answer("demo/lb", 2, false));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["serviceProxyHealthy"], false);
        let (code, _) = body(answer("demo/lb", 0, true));
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    }
}
