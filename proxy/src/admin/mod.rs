//! What the agent tells its operators and load balancers, as kube-proxy does: `/healthz` and
//! `/livez` (default `0.0.0.0:10256`), Prometheus `/metrics` (default `127.0.0.1:10249`), and
//! the healthCheckNodePort of each Service with `externalTrafficPolicy: Local`. One HTTP stack
//! (`http`) serves them all.
use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use crate::error::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tracing::info;

pub mod health;
pub mod healthcheck;
pub mod metrics;
pub mod server;

pub use health::{health_response, Health};
pub use metrics::{Metrics, TRIGGER_TIME_ANNOTATION};

use self::server::respond;

/// What the HTTP servers answer from.
pub struct Observed {
    pub health: Health,
    pub metrics: Metrics,
}

fn route(o: &Observed, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let now = SystemTime::now();
    match req.uri().path() {
        p @ ("/healthz" | "/livez") => {
            let (code, body) = health_response(&o.health, p == "/healthz", now);
            if p == "/healthz" {
                o.metrics
                    .healthz
                    .get_or_create(&vec![("code".into(), code.as_u16().to_string())])
                    .inc();
            }
            respond(code, "application/json", body)
        }
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            o.metrics.render(),
        ),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Serves `/healthz`, `/livez` and `/metrics` on `addr` until the runtime stops. Binds now,
/// so that a port already taken is an error at start.
/// `server` names it in `weir_admin_connections_refused`.
pub async fn serve(
    addr: SocketAddr,
    what: &'static str,
    server: &'static str,
    o: Arc<Observed>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listen for {what} on {addr}"))?;
    info!(%addr, "serving {what}");
    let refused = o.metrics.admin_refused(server);
    server::spawn(listener, what, Arc::new(move |req| route(&o, req)), refused);
    Ok(())
}
