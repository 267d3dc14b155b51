//! The agent's one HTTP server stack (hyper): kube-proxy's health and metrics ports and the
//! healthCheckNodePorts all answer through it.
use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use tokio::{net::TcpListener, sync::Semaphore, task::JoinHandle};
use tracing::warn;

/// What a server answers a request with.
pub type Handler = Arc<dyn Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Send + Sync>;

/// A response with `body` of type `ctype`, as kube-proxy's servers give it.
pub fn respond(code: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(ctype),
    );
    r.headers_mut().insert(
        "X-Content-Type-Options",
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

/// Connections one admin server serves at once: a connection past them is closed at once (and
/// counted), so that idle or slow clients cannot take the agent's file descriptors.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client may take to send a request's headers (the first one and each next on a
/// kept-alive connection) before its connection is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers every request on `listener` with `handler` until the task is aborted, at most
/// [`MAX_CONNECTIONS`] connections at once, each given [`HEADER_TIMEOUT`] per request's
/// headers; `refused` counts the connections closed for being past the limit. An accept error
/// (out of file descriptors, say) is logged and retried after a pause, never spun on.
pub fn spawn(
    listener: TcpListener,
    what: &'static str,
    handler: Handler,
    refused: Counter,
) -> JoinHandle<()> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!("{what}: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                refused.inc();
                drop(stream);
                continue;
            };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let r = handler(&req);
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                drop(slot);
            });
        }
    })
}
