//! `agent-memory` (B2M in RESULTS.md): the agent's resident memory once it has programmed 10 000
//! services of 10 endpoints each (100 000 endpoints), through the Kubernetes API (a fake API server over HTTP, the
//! agent's watches and stores) and from a file (no stores: the floor of what the model and the
//! data path keep), side by side in one run, three agents each. kube-proxy's figure at the
//! same size is the reference's (`../shared/reference/measured-here.md`: 182 MB at 10 000), not
//! measured in this run.
use std::{fmt::Write as _, path::Path};

use anyhow::Result;
use weir_testkit::{tag, RunDir};

use crate::{programming, results};

pub fn run(weir: &Path, quick: bool) -> Result<String> {
    // One size: the fake API server keeps what it served in this process, and at 100 000
    // services three agents' worth of it does not fit a 24 GiB machine.
    let sizes: &[usize] = if quick { &[1_000] } else { &[10_000] };
    let dir = RunDir::create(&format!("/run/weir-b2m{}", tag()))?;
    let mut rows = Vec::new();
    for &n in sizes {
        let svcs = programming::services(n);
        for kube in [true, false] {
            let mut rss = Vec::new();
            let mut hwm = Vec::new();
            for run in 0..3 {
                eprintln!(
                    "agent-memory: {n} services from {}, run {}/3...",
                    if kube { "the API" } else { "a file" },
                    run + 1
                );
                let (r, h) = programming::agent_rss(weir, &svcs, &dir.0, kube)?;
                rss.push(r);
                hwm.push(h);
                let _ = std::fs::remove_file(dir.0.join(format!("rss-{kube}.ready")));
            }
            rss.sort();
            hwm.sort();
            rows.push((n, kube, rss, hwm));
        }
    }
    let mib = |k: u64| k as f64 / 1024.0;
    let mut o = String::new();
    let _ = writeln!(o, "## B2M: agent memory after programming N services\n");
    let _ = writeln!(o, "Machine: {}\n", results::machine());
    let _ = writeln!(
        o,
        "N services of one port and 10 endpoints each (N × 10 endpoints), programmed by `weir agent` in a \
         namespace: through a fake Kubernetes API server over HTTP (the agent's watches and stores), and from a \
         file (no stores). VmRSS 500 ms after the agent reported ready; three agents each, median (min–max).\n"
    );
    let _ = writeln!(
        o,
        "| N | source | VmRSS MiB median (min–max) | peak VmHWM MiB median |\n|---|---|---|---|"
    );
    for (n, kube, rss, hwm) in &rows {
        let _ = writeln!(
            o,
            "| {n} | {} | {:.1} ({:.1}–{:.1}) | {:.1} |",
            if *kube { "Kubernetes API" } else { "file" },
            mib(rss[1]),
            mib(rss[0]),
            mib(rss[2]),
            mib(hwm[1])
        );
    }
    if let Some((_, _, rss, _)) = rows.iter().find(|(n, kube, _, _)| *n == 10_000 && *kube) {
        let _ = writeln!(
            o,
            "\nTarget (issue 22): with the API source at 10 000 services / 100 000 endpoints, ≤ 100 MiB: {} \
             ({:.1} MiB; kube-proxy, from the reference: 182 MB).",
            if mib(rss[1]) <= 100.0 { "met" } else { "NOT met" },
            mib(rss[1])
        );
    }
    Ok(o)
}
