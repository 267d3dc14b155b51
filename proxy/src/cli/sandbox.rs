//! `weir sandbox`.
use std::time::Duration;

use anyhow::Result;
use weir_proxy::tools::{sandbox, sim::topo::sweep};

use super::parse_duration;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Requests per second of each load run.
    #[arg(long, default_value_t = 300)]
    rate: u32,
    /// Length of each load run.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    duration: Duration,
    /// Only delete namespaces left by sandbox runs that were killed, then exit.
    #[arg(long)]
    cleanup: bool,
}

pub fn run(a: Args) -> Result<()> {
    if a.cleanup {
        let gone = sweep("sbx")?;
        println!(
            "removed {} leftover namespaces: {}",
            gone.len(),
            gone.join(" ")
        );
        return Ok(());
    }
    sandbox::run(sandbox::SandboxOptions {
        rate: a.rate,
        duration: a.duration,
    })
}
