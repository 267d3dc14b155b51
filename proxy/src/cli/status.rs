//! `weir status`.
use std::path::PathBuf;

use anyhow::Result;
use weir_proxy::{datapath::pin_dir, tools::status};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    #[arg(long)]
    json: bool,
    /// Conntrack entries to list.
    #[arg(long, default_value_t = 20)]
    conntrack: usize,
    /// The agent's per-Service report (see `weir agent --state-file`).
    #[arg(long, default_value = super::DEFAULT_STATE_FILE)]
    state_file: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let mut st = status::read(&pin_dir(&a.bpffs).maps(), a.conntrack)?;
    st.by_service = status::read_reports(&a.state_file)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print!("{}", status::render(&st));
    }
    Ok(())
}
