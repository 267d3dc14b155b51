//! `weir-bench`: side-by-side benchmarks. Run through `cargo xtask bench` (root; it builds the
//! release `weir` and passes it in WEIR_BIN).
mod b1;
mod b2;
mod b5;
mod b6;
mod b8;
mod kube_rules;
mod results;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "weir's benchmarks; each rewrites its section of benches/RESULTS.md",
    after_help = "Examples:\n  cargo xtask bench\n  cargo xtask bench -- b8\n  cargo xtask bench -- b6\n  cargo xtask bench -- b2 --quick\n  cargo xtask bench -- b5\n  cargo xtask bench -- b1 --quick"
)]
struct Cli {
    /// Which: b1, b2, b5, b6, b8 or all.
    #[arg(default_value = "all")]
    which: String,
    /// Fewer sizes and shorter runs (a smoke run; results are still written).
    #[arg(long)]
    quick: bool,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let weir = weir_proxy::testkit::weir_bin()?;
    if matches!(cli.which.as_str(), "b8" | "all") {
        let s = b8::run(cli.quick)?;
        print!("{s}");
        results::write_section("B8", &s)?;
    }
    if matches!(cli.which.as_str(), "b6" | "all") {
        let s = b6::run(&weir, cli.quick)?;
        print!("{s}");
        results::write_section("B6", &s)?;
    }
    if matches!(cli.which.as_str(), "b2" | "all") {
        let s = b2::run(&weir, cli.quick)?;
        print!("{s}");
        results::write_section("B2", &s)?;
    }
    if matches!(cli.which.as_str(), "b5" | "all") {
        let s = b5::run(&weir, cli.quick)?;
        print!("{s}");
        results::write_section("B5", &s)?;
    }
    if matches!(cli.which.as_str(), "b1" | "all") {
        let s = b1::run(&weir, cli.quick)?;
        print!("{s}");
        results::write_section("B1", &s)?;
    }
    Ok(())
}
