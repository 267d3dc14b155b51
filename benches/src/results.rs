//! `benches/RESULTS.md`: one section per benchmark, each with the machine it ran on; a run
//! rewrites only its own section.
use std::{fs, path::PathBuf, process::Command};

use anyhow::{Context, Result};

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("RESULTS.md")
}

pub fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    // The machine's, not this thread's (the per-packet benchmark keeps its thread to one CPU).
    let cores = fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.lines().filter(|l| l.starts_with("processor")).count())
        .unwrap_or(0);
    let mem_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let kernel = Command::new("uname")
        .arg("-r")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cores} vCPU {cpu}, {mem_gib:.0} GiB, Linux {kernel}, {date}")
}

/// Replaces the section between `<!-- {id} -->` and `<!-- /{id} -->` (appending it if new).
pub fn write_section(id: &str, body: &str) -> Result<()> {
    let p = path();
    let mut text = fs::read_to_string(&p).unwrap_or_else(|_| {
        "# Benchmark results\n\nWritten by `cargo xtask bench`; each section says the machine it ran on. Ratios compare runs made side by side in the same session.\n".into()
    });
    let (open, close) = (format!("<!-- {id} -->"), format!("<!-- /{id} -->"));
    let section = format!("{open}\n{}\n{close}", body.trim_end());
    match (text.find(&open), text.find(&close)) {
        (Some(a), Some(b)) if b > a => text.replace_range(a..b + close.len(), &section),
        _ => {
            text.push('\n');
            text.push_str(&section);
            text.push('\n');
        }
    }
    fs::write(&p, text).with_context(|| format!("write {}", p.display()))
}
