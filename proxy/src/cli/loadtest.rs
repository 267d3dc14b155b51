//! `weir loadtest`.
use std::time::Duration;

use anyhow::Result;
use weir_proxy::tools::{loadtest, pin_to_cpu};

use super::parse_duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// host:port of the service (a ClusterIP or a name that resolves to one).
    target: String,
    #[arg(long, default_value_t = 100)]
    rate: u32,
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, value_enum, default_value = "tcp")]
    proto: loadtest::Proto,
    /// Workers: persistent connections, or requests in flight with --new-conn.
    #[arg(long, default_value_t = 16)]
    connections: usize,
    /// Open a new connection (TCP) or socket (UDP) for every request.
    #[arg(long)]
    new_conn: bool,
    /// UDP: use sendto on an unconnected socket.
    #[arg(long)]
    unconnected: bool,
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    timeout: Duration,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
    /// Closed loop: send each request as soon as the previous one is answered, for the
    /// whole duration (maximum rate; --rate is ignored).
    #[arg(long)]
    closed: bool,
    /// Pin the load generator to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(c) = a.cpu {
        pin_to_cpu(c)?;
    }
    let spec = loadtest::Spec {
        target: a.target,
        rate: a.rate,
        duration: a.duration,
        proto: a.proto,
        connections: a.connections,
        new_conn: a.new_conn,
        unconnected: a.unconnected,
        timeout: a.timeout,
        progress: !a.quiet,
        closed: a.closed,
    };
    let report = loadtest::run(spec)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(())
}
