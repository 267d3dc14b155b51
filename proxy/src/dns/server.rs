//! The DNS server's sockets: bound on the listen addresses and served on a thread of their
//! own; `weir dns` runs it alone with its zone from a file.
use std::{fs, path::Path, sync::Arc, time::Duration};

use crate::error::{fail, Context, Error, Result};
use tracing::{info, warn};
use weir_dns::Handler;

use super::{handler, update, Options};
use crate::{k8s::file::stamp, model};

/// Binds UDP and TCP on every listen address and answers there from `h` in the background.
pub async fn serve(opts: &Options, h: Arc<Handler>) -> Result<()> {
    opts.zone_config()?;
    if opts.listen.is_empty() {
        fail!("DNS: no address to listen on");
    }
    for a in &opts.listen {
        let udp = tokio::net::UdpSocket::bind(a)
            .await
            .with_context(|| format!("DNS: bind UDP {a}"))?;
        let tcp = tokio::net::TcpListener::bind(a)
            .await
            .with_context(|| format!("DNS: bind TCP {a}"))?;
        let (h1, h2) = (h.clone(), h.clone());
        let a = *a;
        tokio::spawn(async move {
            if let Err(e) = weir_dns::server::serve_udp(Arc::new(udp), h1).await {
                warn!(listen = %a, "DNS over UDP stopped: {e}");
            }
        });
        tokio::spawn(async move {
            if let Err(e) = weir_dns::server::serve_tcp(tcp, h2).await {
                warn!(listen = %a, "DNS over TCP stopped: {e}");
            }
        });
        info!(listen = %a, "serving cluster DNS (UDP and TCP)");
    }
    // Upstreams that forward back here (a loop) are found now, and followed.
    tokio::spawn(h.watch_loops());
    Ok(())
}

/// Serves `h` on a thread of its own (with its own runtime), so that a long sync of the
/// agent never holds a query up; returns once the sockets are bound.
pub fn serve_on_own_thread(opts: &Options, h: Arc<Handler>) -> Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let opts = opts.clone();
    std::thread::Builder::new()
        .name("weir-dns".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(Error::invalid(format!("DNS: start a runtime: {e}"))));
                    return;
                }
            };
            rt.block_on(async move {
                let bound = serve(&opts, h).await;
                let failed = bound.is_err();
                let _ = tx.send(bound);
                if !failed {
                    std::future::pending::<()>().await;
                }
            });
        })
        .context("DNS: start its thread")?;
    rx.recv()
        .map_err(|_| Error::invalid("DNS: its thread ended before binding its sockets"))?
}

/// `weir dns`: the server alone, its zone from a YAML file, rebuilt when the file changes;
/// its counters on `metrics` (Prometheus text at any path) when given.
pub async fn run_standalone(
    source: &Path,
    opts: Options,
    metrics: Option<std::net::SocketAddr>,
) -> Result<()> {
    let h = Arc::new(handler(&opts)?);
    serve(&opts, h.clone()).await?;
    if let Some(addr) = metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listen for DNS metrics on {addr}"))?;
        let stats = h.clone();
        crate::admin::server::spawn(
            listener,
            "DNS metrics",
            Arc::new(move |_req| {
                crate::admin::server::respond(
                    http::StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    stats.stats.render(),
                )
            }),
            Default::default(),
        );
        info!(%addr, "serving DNS metrics");
    }
    if opts.upstreams.is_empty() {
        warn!("no upstream resolvers: names outside the cluster zone get SERVFAIL");
    }
    let mut last = None;
    loop {
        let stamp = stamp(source);
        if stamp != last {
            last = stamp;
            match fs::read_to_string(source)
                .with_context(|| format!("read {}", source.display()))
                .and_then(|text| {
                    model::parse_stream(&text)
                        .map_err(|p| Error::invalid(format!("{}: {p}", source.display())))
                }) {
                Ok((objs, problems)) => {
                    for p in problems {
                        warn!("{p}");
                    }
                    let n = update(&h, &opts, &objs)?;
                    let services = objs.services.len();
                    drop(objs);
                    // The parse's garbage back to the system: the zone is what stays.
                    // SAFETY: malloc_trim only releases free heap memory.
                    unsafe { libc::malloc_trim(0) };
                    info!(
                        services,
                        records = n,
                        "zone rebuilt from {}",
                        source.display()
                    );
                }
                Err(e) => warn!("{e:#}; the zone served stays"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
