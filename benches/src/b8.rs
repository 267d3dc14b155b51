//! B8: nanoseconds per packet of the TC program with BPF_PROG_TEST_RUN, for an established flow,
//! its replies and new flows, with the conntrack map 10 % and 90 % full. The floor, in the same
//! run, is a packet that is no service's (one conntrack miss, one service miss).
use std::fmt::Write;

use anyhow::{bail, Result};
use weir_common::{CtKey, CtValue, Stat, CT_DIR_FORWARD, CT_DIR_REPLY, MAX_CT, PROTO_TCP};
use weir_proxy::{
    addr::to_addr,
    program::{Desired, Frontend, ServiceSpec},
    testkit::{fill_ct, tcp, with_ttl, Harness, Tcp},
};

const PROG: &str = "tc_from_pod";

struct Row {
    case: &'static str,
    fill: u32,
    ns: f64,
    floor: f64,
}

/// Runs of a routed case per test run: each decrements the TTL of a frame that starts at 255.
const ROUTED_BATCH: u32 = 250;

fn measure(fill_pct: u32, runs: u32, new_flows: u16) -> Result<Vec<Row>> {
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
    // A repeated run sees the frame its previous run rewrote. So that every run of an
    // established case does that case's work, the rewritten frame gets a conntrack entry that
    // rewrites it back (client → backend is sent on to the VIP, VIP → client back to the
    // backend's address): the runs ping-pong between two entries of the same kind. Every run
    // must be counted under `stat`, or the figure is of another path and the benchmark fails.
    let timed_on = |h: &mut Harness, prog: &str, frame: Vec<u8>, repeat: u32, stat: Stat| {
        let before = h.stats()[stat as usize];
        let ns = h.time(prog, &frame, repeat);
        let counted = h.stats()[stat as usize] - before;
        if counted != repeat as u64 {
            bail!("b8: {counted} of {repeat} runs counted as {stat:?}: the case measures another path");
        }
        Ok(ns)
    };
    let timed = |h: &mut Harness, frame: Vec<u8>, repeat: u32, stat: Stat| {
        timed_on(h, PROG, frame, repeat, stat)
    };
    let floor = timed(
        &mut h,
        tcp("198.18.1.10", 40000, "198.18.1.12", 8080, Tcp::Ack),
        runs,
        Stat::PassNoService,
    )?;
    h.run(
        PROG,
        &tcp("198.18.1.10", 40000, "198.19.0.10", 80, Tcp::Syn),
    );
    let (cli, vip, be) = (
        to_addr("198.18.1.10".parse()?),
        to_addr("198.19.0.10".parse()?),
        to_addr("198.18.1.11".parse()?),
    );
    let mut ct = h.ct_map();
    let key = |src, sport: u16, dst, dport: u16| CtKey {
        src,
        dst,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: PROTO_TCP,
        _pad: [0; 3],
    };
    let back = |nat_addr, nat_port: u16, dir| CtValue {
        nat_addr,
        nat_port: nat_port.to_be(),
        dir,
        expires_ns: u64::MAX,
        ..Default::default()
    };
    ct.insert(key(cli, 40000, be, 8080), back(vip, 80, CT_DIR_FORWARD), 0)?;
    ct.insert(key(vip, 80, cli, 40000), back(be, 8080, CT_DIR_REPLY), 0)?;
    let est = timed(
        &mut h,
        tcp("198.18.1.10", 40000, "198.19.0.10", 80, Tcp::Ack),
        runs,
        Stat::DnatEstablished,
    )?;
    // The same flow's packet as an uplink's program sees it (an external client's, to a
    // NodePort): its established path is `tc_from_pod`'s, timed on its own program.
    let est_uplink = timed_on(
        &mut h,
        "tc_from_netdev",
        tcp("198.18.1.10", 40000, "198.19.0.10", 80, Tcp::Ack),
        runs,
        Stat::DnatEstablished,
    )?;
    // A routed packet's TTL is decremented, on every run of the ping-pong: the reply runs in
    // batches of ROUTED_BATCH from a frame with TTL 255, every run routed (checked), none
    // left to the kernel for an exhausted TTL.
    let batches = runs / ROUTED_BATCH;
    let routed_before = h.stats()[Stat::Routed as usize];
    let frame = with_ttl(
        tcp("198.18.1.11", 8080, "198.18.1.10", 40000, Tcp::Ack),
        255,
    );
    let mut total = 0.0;
    for _ in 0..batches {
        total += timed(&mut h, frame.clone(), ROUTED_BATCH, Stat::RevNat)?;
    }
    let routed = h.stats()[Stat::Routed as usize] - routed_before;
    if routed != (batches * ROUTED_BATCH) as u64 {
        bail!("b8: {routed} of {} replies routed", batches * ROUTED_BATCH);
    }
    let reply = total / batches as f64;
    // The same reply leaving by an uplink (an external client's flow served by a pod whose
    // veth carries no program): `tc_to_netdev` translates it, routed already.
    let egress = timed_on(
        &mut h,
        "tc_to_netdev",
        tcp("198.18.1.11", 8080, "198.18.1.10", 40000, Tcp::Ack),
        runs,
        Stat::RevNat,
    )?;
    // New flows: every packet a flow conntrack has not seen, so one run each.
    let mut total = 0.0;
    for i in 0..new_flows {
        total += timed(
            &mut h,
            tcp("198.18.3.10", 1000 + i, "198.19.0.10", 80, Tcp::Syn),
            1,
            Stat::DnatNew,
        )?;
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
            case: "established flow, DNAT on an uplink's ingress (tc_from_netdev)",
            fill: fill_pct,
            ns: est_uplink,
            floor,
        },
        Row {
            case: "established flow, reply reverse NAT, routed",
            fill: fill_pct,
            ns: reply,
            floor,
        },
        Row {
            case: "established flow, reply reverse NAT on an uplink's egress (tc_to_netdev)",
            fill: fill_pct,
            ns: egress,
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
    let (runs, new_flows) = if quick {
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
        rows.extend(measure(fill, runs, new_flows)?);
    }
    let mut o = String::new();
    let _ = writeln!(
        o,
        "## B8: per-packet cost of the TC program (BPF_PROG_TEST_RUN)\n"
    );
    let _ = writeln!(o, "Machine: {}\n", crate::results::machine());
    let _ = writeln!(
        o,
        "`tc_from_pod` of the production object (and `tc_to_netdev` where the row says so), maps filled by the agent's \
         programmer, in a namespace with routes to the pods (replies are routed by `tc_from_pod`: FIB lookup, TTL \
         decrement and neighbour redirect; `tc_to_netdev` sees them routed already); mean ns per \
         run as the kernel times it, {runs} repeats per established case (the rewritten frame has an entry that \
         rewrites it back, so every repeat does the case's work; the routed reply in test runs of {ROUTED_BATCH} from \
         a frame with TTL 255, as each run decrements it) and {new_flows} distinct SYNs for new flows (one run each, so they include the \
         test-run timer's per-run overhead: two clock reads). Every run is checked, by its counter, to have taken its \
         case's path. Conntrack: an LRU hash of {MAX_CT} entries. The floor is a pod-to-pod packet: parse, one conntrack \
         miss, one service miss.\n"
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
