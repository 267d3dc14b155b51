//! `weir-bench`: side-by-side benchmarks, each against a baseline in the same run. Run through
//! `cargo xtask bench` (root; it builds the release `weir` and passes it in WEIR_BIN).
mod cni;
mod dns;
mod dns_floods;
mod kube_rules;
mod memory;
mod per_packet;
mod programming;
mod results;
mod service_path;

use anyhow::Result;
use clap::Parser;

#[derive(Parser)]
#[command(
    about = "weir's benchmarks; each rewrites its section of benches/RESULTS.md",
    after_help = "Examples:\n  cargo xtask bench\n  cargo xtask bench -- per-packet\n  cargo xtask bench -- cni\n  cargo xtask bench -- programming --quick\n  cargo xtask bench -- dns\n  cargo xtask bench -- dns-floods\n  cargo xtask bench -- agent-memory\n  cargo xtask bench -- service-path --quick\n\nEach benchmark's section in RESULTS.md keeps its id (B1, B2, B2M, B5, B5F, B6, B8), which also works\nas its name here."
)]
struct Cli {
    /// Which: per-packet (B8), cni (B6), programming (B2), agent-memory (B2M), dns (B5),
    /// dns-floods (B5F), service-path (B1), or all.
    #[arg(default_value = "all")]
    which: String,
    /// Fewer sizes and shorter runs (a smoke run; results are still written).
    #[arg(long)]
    quick: bool,
}

/// A benchmark: its name, its section id in RESULTS.md, and how to run it.
type Bench<'a> = (&'a str, &'a str, Box<dyn Fn() -> Result<String> + 'a>);

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Ctrl-C or SIGTERM: the guards of a running benchmark would not run; the first name
    // a benchmark takes (`tag`) arranges for what this run made to be removed then.
    let weir = weir_testkit::weir_bin()?;
    let quick = cli.quick;
    let benches: [Bench; 7] = [
        ("per-packet", "B8", Box::new(|| per_packet::run(quick))),
        ("cni", "B6", Box::new(|| cni::run(&weir, quick))),
        (
            "programming",
            "B2",
            Box::new(|| programming::run(&weir, quick)),
        ),
        (
            "agent-memory",
            "B2M",
            Box::new(|| memory::run(&weir, quick)),
        ),
        ("dns", "B5", Box::new(|| dns::run(&weir, quick))),
        (
            "dns-floods",
            "B5F",
            Box::new(|| dns_floods::run(&weir, quick)),
        ),
        (
            "service-path",
            "B1",
            Box::new(|| service_path::run(&weir, quick)),
        ),
    ];
    let chosen = |name: &str, id: &str| {
        cli.which == "all" || cli.which == name || cli.which.eq_ignore_ascii_case(id)
    };
    if !benches.iter().any(|(name, id, _)| chosen(name, id)) {
        let names: Vec<&str> = benches.iter().map(|(name, _, _)| *name).collect();
        anyhow::bail!("no benchmark {:?}: {} or all", cli.which, names.join(", "));
    }
    for (name, id, run) in &benches {
        if chosen(name, id) {
            let s = run()?;
            print!("{s}");
            results::write_section(id, &s)?;
        }
    }
    Ok(())
}
