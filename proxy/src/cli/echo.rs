//! `weir echo-server`.
use anyhow::Result;
use weir_proxy::tools::{echo, pin_to_cpu};

use super::runtime;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long)]
    name: String,
    /// The address to listen on (`::`: every address, both families).
    #[arg(long, default_value = "::")]
    address: std::net::IpAddr,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Pin the server to this CPU.
    #[arg(long)]
    cpu: Option<usize>,
}

pub fn run(a: Args) -> Result<()> {
    if let Some(c) = a.cpu {
        pin_to_cpu(c)?;
    }
    runtime()?.block_on(echo::serve(a.name, a.address, a.port))
}
