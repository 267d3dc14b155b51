//! B8: nanoseconds per packet of the TC program with BPF_PROG_TEST_RUN, for an established flow,
//! its replies and new flows, with the conntrack map 10 % and 90 % full. The floor, in the same
//! run, is a packet that is no service's (one conntrack miss, one service miss).
use std::fmt::Write;

use anyhow::Result;
use weir_common::{MAX_CT, PROTO_TCP};
use weir_proxy::{
    program::{Desired, Frontend, ServiceSpec},
    testkit::{fill_ct, tcp, Harness, Tcp},
};

const PROG: &str = "tc_from_pod";

struct Row {
    case: &'static str,
    fill: u32,
    ns: f64,
    floor: f64,
}

fn measure(fill_pct: u32, repeat: u32, new_flows: u16) -> Result<Vec<Row>> {
    let mut h = Harness::new()?;
    let svc = ServiceSpec {
        name: "bench/b8:http".into(),
        backends: vec!["198.18.1.11:8080".parse()?],
        ..Default::default()
    };
    h.program(&Desired::from([(
        Frontend {
            ip: "198.19.0.10".parse()?,
            port: 80,
            proto: PROTO_TCP,
            scope: weir_common::SCOPE_ALL,
        },
        svc,
    )]));
    let n = (MAX_CT as u64 * fill_pct as u64 / 100) as usize;
    fill_ct(&h, n)?;
    let floor = h.time(
        PROG,
        &tcp("198.18.1.10", 40000, "198.18.1.12", 8080, Tcp::Ack),
        repeat,
    );
    h.run(
        PROG,
        &tcp("198.18.1.10", 40000, "198.19.0.10", 80, Tcp::Syn),
    );
    let est = h.time(
        PROG,
        &tcp("198.18.1.10", 40000, "198.19.0.10", 80, Tcp::Ack),
        repeat,
    );
    let reply = h.time(
        PROG,
        &tcp("198.18.1.11", 8080, "198.18.1.10", 40000, Tcp::Ack),
        repeat,
    );
    // New flows: every packet a flow conntrack has not seen, so one run each.
    let mut total = 0.0;
    for i in 0..new_flows {
        total += h.time(
            PROG,
            &tcp("198.18.3.10", 1000 + i, "198.19.0.10", 80, Tcp::Syn),
            1,
        );
    }
    let new = total / new_flows as f64;
    Ok(vec![
        Row {
            case: "not a service (floor)",
            fill: fill_pct,
            ns: floor,
            floor,
        },
        Row {
            case: "established flow, DNAT",
            fill: fill_pct,
            ns: est,
            floor,
        },
        Row {
            case: "established flow, reply reverse NAT",
            fill: fill_pct,
            ns: reply,
            floor,
        },
        Row {
            case: "new flow (SYN): select, 2 conntrack inserts, DNAT",
            fill: fill_pct,
            ns: new,
            floor,
        },
    ])
}

pub fn run(quick: bool) -> Result<String> {
    let (repeat, new_flows) = if quick {
        (100_000, 2_000)
    } else {
        (2_000_000, 20_000)
    };
    let mut rows = Vec::new();
    for fill in [10, 90] {
        eprintln!(
            "b8: conntrack {fill}% full ({} entries)...",
            MAX_CT as u64 * fill as u64 / 100
        );
        rows.extend(measure(fill, repeat, new_flows)?);
    }
    let mut o = String::new();
    let _ = writeln!(
        o,
        "## B8: per-packet cost of the TC program (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(o, "Machine: {}\n", crate::results::machine());
    let _ = writeln!(
        o,
        "`tc_from_pod` of the production object, maps filled by the agent's programmer; mean ns per run as the kernel \
         times it, {repeat} repeats per established case, {new_flows} distinct SYNs for new flows (one run each, so they \
         include the test-run timer's per-run overhead). Conntrack: an LRU hash of {MAX_CT} entries. The floor is a pod-to-pod \
         packet: parse, one conntrack miss, one service miss.\n"
    );
    let _ = writeln!(
        o,
        "| case | conntrack full | ns/packet | × floor |\n|---|---|---|---|"
    );
    for r in &rows {
        let _ = writeln!(
            o,
            "| {} | {} % | {:.1} | {:.2} |",
            r.case,
            r.fill,
            r.ns,
            r.ns / r.floor
        );
    }
    let est_max = rows
        .iter()
        .filter(|r| r.case.starts_with("established"))
        .map(|r| r.ns)
        .fold(0.0, f64::max);
    let _ = writeln!(
        o,
        "\nTarget: established flow under 100 ns per packet: {} (worst established case {est_max:.1} ns).",
        if est_max < 100.0 { "met" } else { "NOT met" }
    );
    Ok(o)
}
