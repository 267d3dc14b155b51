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
    // Ctrl-C or SIGTERM: the guards of a running benchmark would not run; the first name
    // a benchmark takes (`topo::tag`) arranges for what this run made to be removed then.
    let weir = weir_testkit::weir_bin()?;
    let quick = cli.quick;
    type Bench<'a> = (&'a str, &'a str, Box<dyn Fn() -> Result<String> + 'a>);
    let benches: [Bench; 5] = [
        ("b8", "B8", Box::new(|| b8::run(quick))),
        ("b6", "B6", Box::new(|| b6::run(&weir, quick))),
        ("b2", "B2", Box::new(|| b2::run(&weir, quick))),
        ("b5", "B5", Box::new(|| b5::run(&weir, quick))),
        ("b1", "B1", Box::new(|| b1::run(&weir, quick))),
    ];
    if cli.which != "all" && !benches.iter().any(|(name, _, _)| *name == cli.which) {
        anyhow::bail!("no benchmark {:?}: b1, b2, b5, b6, b8 or all", cli.which);
    }
    for (name, section, run) in &benches {
        if cli.which == "all" || cli.which == *name {
            let s = run()?;
            print!("{s}");
            results::write_section(section, &s)?;
        }
    }
    Ok(())
}
