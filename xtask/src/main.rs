//! `cargo xtask`: everything that is not plain cargo. Privileged steps (network namespaces, eBPF)
//! run here, so plain `cargo test` stays unprivileged.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

const BPF_LINKER_VERSION: &str = "0.10.4";
/// Debian packages the tests, the sandbox and the benchmarks use.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    // ethtool: checksum offloads off on a test LAN, so that every receiver checks checksums.
    "ethtool",
    "iptables",
    "nftables",
    // ptp, bridge, host-local, tuning: the reference plugins weir-cni is compared with.
    "containernetworking-plugins",
    // dig: DNS queries over real sockets in the DNS tests.
    "bind9-dnsutils",
    // B5: dnsperf, and the servers weir's DNS is measured beside (never started as services:
    // see `apt_install`).
    "dnsperf",
    "knot",
    "unbound",
];

#[derive(Parser)]
#[command(name = "cargo xtask", about = "weir's build, test and demo tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and tests need (bpf-linker, rust-src, Debian packages); quick when
    /// everything is there already.
    #[command(after_help = "Example:\n  cargo xtask setup")]
    Setup,
    /// Build the release `weir` binary (eBPF programs included).
    #[command(after_help = "Example:\n  cargo xtask build")]
    Build,
    /// Run every test: formatting, clippy, unit tests, then the privileged eBPF and namespace
    /// tests (as root).
    #[command(
        after_help = "Examples:\n  cargo xtask test\n  cargo xtask test -- lb4_clusterip   # only matching privileged tests"
    )]
    Test {
        /// Passed to the privileged test binary (a name filter, --nocapture, ...).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the sandbox: a simulated node, load through its services, a report.
    #[command(
        after_help = "Examples:\n  cargo xtask demo\n  cargo xtask demo -- --rate 1000 --duration 5s"
    )]
    Demo {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the benchmarks and rewrite benches/RESULTS.md.
    #[command(after_help = "Examples:\n  cargo xtask bench\n  cargo xtask bench -- per-packet")]
    Bench {
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// cargo fmt --check and cargo clippy -D warnings.
    Lint,
    /// Fuzz what weir parses from outside (DNS messages, source YAML and the model built from
    /// it, CNI configurations and environments, the agent's socket requests) with cargo-fuzz
    /// (libFuzzer, nightly, AddressSanitizer); installs cargo-fuzz and nightly when missing.
    /// Each target runs for the time given; its corpus stays in fuzz/corpus/TARGET, a crash in
    /// fuzz/artifacts/TARGET (the command fails then).
    #[command(after_help = "Examples:\n  \
        cargo xtask fuzz                         # every target, 60 s each\n  \
        cargo xtask fuzz dns_message --seconds 600\n  \
        cargo xtask fuzz --list\n\n\
        Targets: dns_message, source_yaml, cni_config, cni_env, agent_request.")]
    Fuzz {
        /// One target (default: all of them, one after the other).
        target: Option<String>,
        /// How long each target runs.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// List the targets and stop.
        #[arg(long)]
        list: bool,
    },
}

/// The fuzz targets (`fuzz/fuzz_targets/NAME.rs`).
const FUZZ_TARGETS: [&str; 5] = [
    "dns_message",
    "source_yaml",
    "cni_config",
    "cni_env",
    "agent_request",
];

/// `cargo xtask fuzz`: cargo-fuzz and nightly installed when missing, then each target for
/// `seconds`.
fn fuzz(target: Option<String>, seconds: u64) -> Result<()> {
    let targets: Vec<&str> = match &target {
        Some(t) if FUZZ_TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("no fuzz target {t:?}: {}", FUZZ_TARGETS.join(", ")),
        None => FUZZ_TARGETS.to_vec(),
    };
    let has = |args: &[&str]| {
        Command::new("rustup")
            .args(args)
            .output()
            .map(|o| o.status.success() && !o.stdout.is_empty())
            .unwrap_or(false)
    };
    if !has(&["run", "nightly", "rustc", "--version"]) {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let fuzz_ok = cargo()
        .args(["fuzz", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !fuzz_ok {
        run(cargo().args(["install", "cargo-fuzz", "--locked"]))?;
    }
    let dir = root().join("fuzz");
    for (i, t) in targets.iter().enumerate() {
        eprintln!(
            "xtask: fuzz target {}/{}: {t}, {seconds} s",
            i + 1,
            targets.len()
        );
        // The corpus grows in fuzz/corpus/TARGET; fuzz/seeds/TARGET (in the repository) starts
        // it with real inputs (the sandbox's services, DNS queries, a CNI configuration).
        let corpus = dir.join("corpus").join(t);
        std::fs::create_dir_all(&corpus)?;
        let mut cmd = Command::new("cargo");
        cmd.current_dir(&dir)
            .args(["+nightly", "fuzz", "run", t])
            .arg(&corpus);
        let seeds = dir.join("seeds").join(t);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        run(cmd
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg("-max_len=8192")
            .args(["-rss_limit_mb=4096", "-print_final_stats=1"])
            // The model needs no eBPF object: the fuzz build skips it.
            .env("AYA_BUILD_SKIP", "1"))
        .with_context(|| format!("fuzz target {t}: see fuzz/artifacts/{t} for the input"))?;
    }
    Ok(())
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .into()
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {:?}", cmd);
    let st = cmd
        .status()
        .with_context(|| format!("start {:?}", cmd.get_program()))?;
    if !st.success() {
        bail!("{:?} failed: {st}", cmd.get_program());
    }
    Ok(())
}

/// Runs a `cargo test` command, echoing its output, and adds its `test result:` counts.
fn run_tests(cmd: &mut Command, passed: &mut u64, failed: &mut u64) -> Result<()> {
    use std::io::{BufRead, BufReader};
    eprintln!("xtask: {:?}", cmd);
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("start {:?}", cmd.get_program()))?;
    let out = child.stdout.take().context("test output")?;
    for line in BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let num = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim().strip_suffix(word).map(|n| {
                            n.trim()
                                .trim_start_matches("ok.")
                                .trim_start_matches("FAILED.")
                                .trim()
                                .parse()
                                .unwrap_or(0)
                        })
                    })
                    .unwrap_or(0)
            };
            *passed += num("passed");
            *failed += num("failed");
        }
    }
    let st = child.wait()?;
    if !st.success() {
        println!("{passed} passed, {failed} failed");
        bail!("{:?} failed: {st}", cmd.get_program());
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Option<String> {
    cmd.output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn setup() -> Result<()> {
    let src = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "stable",
    ]));
    if !src.is_some_and(|s| s.lines().any(|l| l.starts_with("rust-src"))) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "stable",
        ]))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version"));
    if !linker.is_some_and(|v| v.contains(BPF_LINKER_VERSION)) {
        eprintln!("xtask: installing bpf-linker {BPF_LINKER_VERSION} (about a minute)");
        run(Command::new("cargo").args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
        ]))?;
    }
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]))
                .is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "Debian packages missing: {} (run as root, or install them)",
                missing.join(" ")
            );
        }
        run(Command::new("apt-get").arg("update").arg("-qq"))?;
        // Packages with daemons (knot, unbound) must not start them on this machine: a
        // policy-rc.d that denies every start, for the install only, unless one is there.
        let policy = std::path::Path::new("/usr/sbin/policy-rc.d");
        let ours = !policy.exists();
        if ours {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
            std::fs::set_permissions(policy, std::fs::Permissions::from_mode(0o755))?;
        }
        let installed = run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"));
        if ours {
            let _ = std::fs::remove_file(policy);
        }
        installed?;
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// Where cargo puts what it builds: `CARGO_TARGET_DIR`, else `target/` of the workspace.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|d| if d.is_absolute() { d } else { root().join(d) })
        .unwrap_or_else(|| root().join("target"))
}

fn build_release() -> Result<PathBuf> {
    // `weir` and `weir-cni` land side by side: the sandbox runs the plugin from there.
    run(cargo().args(["build", "--release", "-p", "weir-proxy", "-p", "weir-cni"]))?;
    Ok(target_dir().join("release/weir"))
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--check"]))?;
    // The eBPF object is not needed to lint the user-space code.
    run(cargo()
        .args(["clippy", "--all-targets", "--", "-D", "warnings"])
        .env("AYA_BUILD_SKIP", "1"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Setup => setup(),
        Cmd::Build => {
            setup()?;
            build_release().map(|_| ())
        }
        Cmd::Fuzz {
            target,
            seconds,
            list,
        } => {
            if list {
                for t in FUZZ_TARGETS {
                    println!("{t}");
                }
                return Ok(());
            }
            fuzz(target, seconds)
        }
        Cmd::Lint => {
            setup()?;
            lint()
        }
        Cmd::Test { args } => {
            setup()?;
            if !is_root() {
                bail!("cargo xtask test runs eBPF and network-namespace tests: run it as root");
            }
            lint()?;
            let weir = build_release()?;
            let (mut passed, mut failed) = (0, 0);
            // Unit tests: unprivileged (the privileged ones are #[ignore]d in a plain run).
            run_tests(cargo().args(["test", "--tests"]), &mut passed, &mut failed)?;
            // Privileged tests: real programs, real packets, real namespaces; one at a time so
            // that each owns its namespaces and the CPU it measures.
            run_tests(
                cargo()
                    .args(["test", "-p", "weir-tests", "--tests", "--"])
                    .args(["--include-ignored", "--test-threads=1"])
                    .args(&args)
                    .env("WEIR_BIN", &weir),
                &mut passed,
                &mut failed,
            )?;
            // Counted over every run above; the line CI reads.
            println!("{passed} passed, {failed} failed");
            Ok(())
        }
        Cmd::Demo { args } => {
            setup()?;
            if !is_root() {
                bail!("the sandbox creates network namespaces and loads eBPF programs: run it as root");
            }
            let weir = build_release()?;
            run(Command::new(weir).arg("sandbox").args(&args))
        }
        Cmd::Bench { args } => {
            setup()?;
            if !is_root() {
                bail!("the benchmarks create network namespaces and load eBPF programs: run them as root");
            }
            let weir = build_release()?;
            run(cargo()
                .args(["run", "--release", "-p", "weir-bench", "--"])
                .args(&args)
                .env("WEIR_BIN", &weir))
        }
    }
}
