//! `per-packet` (B8 in RESULTS.md): nanoseconds per packet of the TC program with BPF_PROG_TEST_RUN, for an established flow,
//! its replies and new flows, with the conntrack map 10 % and 90 % full. The floor, in the same
//! run, is a packet that is no service's (one conntrack miss, one service miss).
use std::fmt::Write;

use anyhow::{bail, Context, Result};
use weir_common::{
    CtKey, CtValue, Stat, CT_DIR_FORWARD, CT_DIR_REPLY, CT_F_KERNEL_ROUTE, MAX_CT, PROTO_TCP,
};
use weir_proxy::{
    datapath::addr::to_addr,
    model::{Desired, Frontend, ServiceSpec},
};
use weir_testkit::{fill_ct, tcp, with_ttl, Harness, Tcp};

const PROG: &str = "tc_from_pod";
const NOOP: &str = "tc_noop";
const TC_ACT_REDIRECT: u32 = 7;

struct Row {
    case: &'static str,
    fill: u32,
    ns: f64,
    floor: f64,
    /// An empty program's ns in the same run: what the test run costs around any program.
    empty: f64,
}

/// Runs of a routed case per test run: each decrements the TTL of a frame that starts at 255.
const ROUTED_BATCH: u32 = 250;

/// Rounds over all cases (see `measure`): a case's figure is its least round's mean.
const ROUNDS: u32 = 10;

/// One timed case.
struct Case {
    label: &'static str,
    prog: &'static str,
    frame: Vec<u8>,
    /// The counter each run must move.
    stat: Option<Stat>,
    /// Routed into the pod: timed in test runs of `ROUTED_BATCH` from a frame with TTL 255
    /// (each run decrements it), each run counted as `routed_to_pod`.
    into_pod: bool,
    /// From the flow cache (`Some(true)`: at least 99 % of the runs counted as
    /// `flow_cache_hit`), through conntrack with the cache's writer out (`Some(false)`: none).
    cached: Option<bool>,
    /// `skb->mark` (the pod veth a bound program redirects to), the redirect verdict checked.
    mark: Option<u32>,
    least: f64,
    ran: u64,
    hits: u64,
}

impl Case {
    fn new(label: &'static str, prog: &'static str, frame: Vec<u8>, stat: Option<Stat>) -> Self {
        Case {
            label,
            prog,
            frame,
            stat,
            into_pod: false,
            cached: None,
            mark: None,
            least: f64::INFINITY,
            ran: 0,
            hits: 0,
        }
    }

    fn into_pod(mut self) -> Self {
        self.into_pod = true;
        self.frame = with_ttl(self.frame, 255);
        self
    }

    fn cached(mut self, cached: Option<bool>) -> Self {
        self.cached = cached;
        self
    }

    fn marked(mut self, ifindex: u32) -> Self {
        self.mark = Some(ifindex);
        self
    }

    /// Times `runs` runs (whole batches of the routed ones) and checks that each took the
    /// case's path: its counters, its verdict.
    fn time(&mut self, h: &mut Harness, runs: u32) -> Result<()> {
        let before = h.stats();
        let (ns, ran) = if self.into_pod {
            let batches = (runs / ROUTED_BATCH).max(1);
            let mut total = 0.0;
            for _ in 0..batches {
                total += h.time(self.prog, &self.frame, ROUTED_BATCH);
            }
            (total / batches as f64, batches * ROUTED_BATCH)
        } else if let Some(mark) = self.mark {
            let (ns, verdict) = h.time_marked(self.prog, &self.frame, runs, mark);
            if verdict != TC_ACT_REDIRECT {
                bail!(
                    "b8: {} returned {verdict}, not the redirect: it measured another path",
                    self.prog
                );
            }
            (ns, runs)
        } else {
            (h.time(self.prog, &self.frame, runs), runs)
        };
        let after = h.stats();
        let moved = |s: Stat| after[s as usize] - before[s as usize];
        if let Some(stat) = self.stat {
            if moved(stat) != ran as u64 {
                bail!(
                    "b8: {}: {} of {ran} runs counted as {stat:?}: the case measures another path",
                    self.label,
                    moved(stat)
                );
            }
        }
        if self.into_pod && moved(Stat::RoutedToPod) != ran as u64 {
            bail!(
                "b8: {}: {} of {ran} runs routed into the pod",
                self.label,
                moved(Stat::RoutedToPod)
            );
        }
        let hits = moved(Stat::FlowCacheHit);
        if self.cached == Some(false) && hits != 0 {
            bail!(
                "b8: {}: {hits} runs from the flow cache with its writer out",
                self.label
            );
        }
        self.ran += ran as u64;
        self.hits += hits;
        self.least = self.least.min(ns);
        Ok(())
    }

    /// The flow cache took the cached case's runs: all but those that filled a slot (the
    /// first of each tuple on the CPU, which the harness keeps to, and one a second as slots
    /// age out).
    fn check(&self) -> Result<()> {
        if self.cached == Some(true) && self.hits < self.ran * 99 / 100 {
            bail!(
                "b8: {}: {} of {} runs from the flow cache: the case measures another path",
                self.label,
                self.hits,
                self.ran
            );
        }
        Ok(())
    }
}

fn measure(fill_pct: u32, runs: u32, new_flows: u16) -> Result<Vec<Row>> {
    let mut h = Harness::new()?;
    let svc = |backend: &str| -> Result<ServiceSpec> {
        Ok(ServiceSpec {
            name: "bench/b8:http".into(),
            backends: vec![backend.parse()?],
            ..Default::default()
        })
    };
    let fe = |ip: &str| -> Result<Frontend> {
        Ok(Frontend {
            ip: ip.parse()?,
            port: 80,
            proto: PROTO_TCP,
            scope: weir_common::SCOPE_ALL,
        })
    };
    // The probed service's endpoint is a pod of the node; the second's is behind the uplink
    // (another node's pod), whose packets the kernel forwards.
    h.program(&Desired::from([
        (fe("198.19.0.10")?, svc("198.18.1.11:8080")?),
        (fe("198.19.0.20")?, svc("198.18.2.5:8080")?),
    ]));
    // The pods' veth as the agent has it: its peer in a namespace of its own, recorded as a
    // pod's, the pods' neighbour entries resolved.
    // The ping-pong of the DNAT cases (below) sends every other run to the VIP: a route takes
    // it into the pod as well, so that every run does the same work.
    h.ns.ip(&["route", "add", "198.19.0.10/32", "dev", "pods0"])?;
    let pod = h.pods_in_a_namespace(&[
        ("198.18.1.10", "02:00:00:00:01:0a"),
        ("198.18.1.11", "02:00:00:00:01:0b"),
        ("198.19.0.10", "02:00:00:00:01:0b"),
    ])?;
    let pods0 = h.ifindex("pods0");
    h.dp.add_pod_dev("pods0", pods0)?;
    let n = (MAX_CT as u64 * fill_pct as u64 / 100) as usize;
    fill_ct(&h, n)?;
    // The flows of the established cases: their first packets, through the programs.
    h.run(
        PROG,
        &tcp("198.18.1.10", 40000, "198.19.0.10", 80, Tcp::Syn),
    );
    h.run(
        PROG,
        &tcp("198.18.1.10", 40001, "198.19.0.20", 80, Tcp::Syn),
    );
    let (cli, vip, be, vip2, remote) = (
        to_addr("198.18.1.10".parse()?),
        to_addr("198.19.0.10".parse()?),
        to_addr("198.18.1.11".parse()?),
        to_addr("198.19.0.20".parse()?),
        to_addr("198.18.2.5".parse()?),
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
    let back = |nat_addr, nat_port: u16, dir, flags| CtValue {
        nat_addr,
        nat_port: nat_port.to_be(),
        dir,
        flags,
        expires_ns: u64::MAX,
        ..Default::default()
    };
    ct.insert(
        &key(cli, 40000, be, 8080),
        &back(vip, 80, CT_DIR_FORWARD, 0),
        0,
    )?;
    ct.insert(
        &key(vip, 80, cli, 40000),
        &back(be, 8080, CT_DIR_REPLY, 0),
        0,
    )?;
    ct.insert(
        &key(cli, 40001, remote, 8080),
        &back(vip2, 80, CT_DIR_FORWARD, CT_F_KERNEL_ROUTE),
        0,
    )?;
    // A repeated run sees the frame its previous run rewrote. So that every run of an
    // established case does that case's work, the rewritten frame gets a conntrack entry that
    // rewrites it back (client → backend is sent on to the VIP, VIP → client back to the
    // backend's address): the runs ping-pong between two entries of the same kind.
    let syn_free = |src, sport, dst, dport| tcp(src, sport, dst, dport, Tcp::Ack);
    let dnat = || syn_free("198.18.1.10", 40000, "198.19.0.10", 80);
    let reply = || syn_free("198.18.1.11", 8080, "198.18.1.10", 40000);
    let remote = || syn_free("198.18.1.10", 40001, "198.19.0.20", 80);
    use Stat::{DnatEstablished as Dnat, PassNoService, RevNat};
    let mut cases = vec![
        Case::new(
            "an empty program (the test run's own cost)",
            NOOP,
            dnat(),
            None,
        ),
        Case::new(
            "not a service (floor)",
            PROG,
            syn_free("198.18.1.10", 40000, "198.18.1.12", 8080),
            Some(PassNoService),
        ),
    ];
    for cached in [true, false] {
        let c = Some(cached);
        let label = |with: &'static str, without: &'static str| if cached { with } else { without };
        cases.extend([
            Case::new(
                label(
                    "established flow, DNAT, into the pod (redirect_peer)",
                    "the same through conntrack: DNAT, into the pod",
                ),
                PROG,
                dnat(),
                Some(Dnat),
            )
            .into_pod()
            .cached(c),
            // The same flow's packet as an uplink's program sees it (an external client's, to
            // a NodePort): its established path is `tc_from_pod`'s, timed on its own program.
            Case::new(
                label(
                    "established flow, DNAT on an uplink's ingress (tc_from_netdev), into the pod",
                    "the same through conntrack: DNAT on an uplink's ingress, into the pod",
                ),
                "tc_from_netdev",
                dnat(),
                Some(Dnat),
            )
            .into_pod()
            .cached(c),
            // To an endpoint behind the uplink: translated, and left to the kernel's forwarding
            // (the flow's first lookup said so), as kube-proxy's DNAT is.
            Case::new(
                label(
                    "established flow, DNAT to an endpoint behind the uplink (kernel forwards)",
                    "the same through conntrack: DNAT, the kernel forwards",
                ),
                PROG,
                remote(),
                Some(Dnat),
            )
            .cached(c),
            Case::new(
                label(
                    "established flow, reply reverse NAT, into the client pod",
                    "the same through conntrack: reply, into the client pod",
                ),
                PROG,
                reply(),
                Some(RevNat),
            )
            .into_pod()
            .cached(c),
            // The same reply leaving by an uplink (an external client's flow served by a pod
            // whose veth carries no program): `tc_to_netdev` translates it, routed already.
            Case::new(
                label(
                    "established flow, reply reverse NAT on an uplink's egress (tc_to_netdev)",
                    "the same through conntrack: reply, tc_to_netdev",
                ),
                "tc_to_netdev",
                reply(),
                Some(RevNat),
            )
            .cached(c),
        ]);
    }
    // The kernel's part of the packet into the pod alone, with today's conntrack path's
    // primitives and with the cache's (see `ebpf/src/bench/bound.rs`): each run must end in the
    // redirect, or it measured an early return.
    for prog in ["tc_bound_ct_store", "tc_bound_percpu_direct"] {
        h.load_classifier(prog)?;
    }
    cases.extend([
        Case::new(
            "bound: conntrack lookup + bpf_skb_store_bytes + redirect_peer, no logic",
            "tc_bound_ct_store",
            dnat(),
            None,
        )
        .marked(pods0),
        Case::new(
            "bound: per-CPU array lookup + direct writes + redirect_peer, no logic",
            "tc_bound_percpu_direct",
            dnat(),
            None,
        )
        .marked(pods0),
    ]);
    h.load_classifier(NOOP)?;
    // In rounds: each round times every case once for `runs / ROUNDS` runs (the conntrack
    // cases with the flow cache's writer taken out of its program array), and a case's figure
    // is its least round's mean. Another guest's work on the host slows this one's for
    // seconds at a time, by up to half: spread over the whole run, each case meets quiet
    // rounds too.
    let part = runs / ROUNDS;
    for _ in 0..ROUNDS {
        for cached in [true, false] {
            h.set_flow_cache_writer(cached)?;
            for c in cases
                .iter_mut()
                .filter(|c| c.cached.unwrap_or(true) == cached)
            {
                c.time(&mut h, part)?;
            }
        }
    }
    h.set_flow_cache_writer(true)?;
    for c in &cases {
        c.check()?;
    }
    // New flows: every packet a flow conntrack has not seen, so one run each; their mean.
    let mut total = 0.0;
    for i in 0..new_flows {
        let mut c = Case::new(
            "",
            PROG,
            tcp("198.18.3.10", 1000 + i, "198.19.0.10", 80, Tcp::Syn),
            Some(Stat::DnatNew),
        );
        c.time(&mut h, 1)?;
        total += c.least;
    }
    let new = total / new_flows as f64;
    drop(pod);
    let (empty, floor) = (cases[0].least, cases[1].least);
    let row = |case, ns| Row {
        case,
        fill: fill_pct,
        ns,
        floor,
        empty,
    };
    let mut rows: Vec<Row> = cases.iter().map(|c| row(c.label, c.least)).collect();
    // New flows before the bounds.
    let at = rows.len() - 2;
    rows.insert(
        at,
        row(
            "new flow (SYN): select, route, 2 conntrack inserts, DNAT",
            new,
        ),
    );
    Ok(rows)
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
        "`tc_from_pod` of the production object (and `tc_from_netdev`, `tc_to_netdev` where the row says so), maps \
         filled by the agent's programmer, in a namespace with routes to the pods, whose veth (its peer in a namespace \
         of its own) the agent has recorded as a pod's. Packets to a pod of the node are routed by the program: FIB \
         lookup with the neighbour entry, TTL decrement, Ethernet addresses, `bpf_redirect_peer` into the pod (in a \
         test run the redirect is only the verdict; on a real device it replaces a pass through the veth's queue and \
         the node's forwarding). `tc_to_netdev` sees replies routed already. An established flow's packets after \
         its first on a CPU are translated from the flow cache (a per-CPU slot, written into the packet by \
         `tc_flow_write`, reached by tail call): the *established flow* rows; the *through conntrack* rows are the \
         same cases with the writer taken out of its program array (a flow's first packet on a CPU, and what the \
         cache does not take: IPv6, SYN/FIN/RST, routes through the neighbour table). Ns per run as the kernel \
         times it: {runs} runs per case, in {ROUNDS} rounds over all cases, the least round's mean (another guest's \
         work on the host slows this one's for seconds at a time, by up to half); the rewritten frame has an entry that \
         rewrites it back, so every repeat does the case's work; routed cases in test runs of {ROUTED_BATCH} from \
         a frame with TTL 255, as each run decrements it. {new_flows} distinct SYNs for new flows (one run each, so \
         they include the test-run timer's per-run overhead: two clock reads; their mean). Every run is checked, by \
         its counters, to have taken its case's path (at least 99 % of the cached cases' runs counted as \
         `flow_cache_hit`, none of the others). Conntrack: an LRU hash of {MAX_CT} entries. The floor is a \
         pod-to-pod packet: parse, one conntrack miss, one service miss. The empty program (`tc_noop`, which returns \
         at once) is timed the same way: what the test run costs per run around any program; the next column takes \
         it off. The *bound* rows are programs that do only the kernel's part of an established packet into a pod \
         (`ebpf/src/bench/bound.rs`, an object the agent never loads): with today's conntrack path's primitives, and with the cache's.\n"
    );
    let _ = writeln!(
        o,
        "| case | conntrack full | ns/packet | ns above the empty program | × floor |\n|---|---|---|---|---|"
    );
    for r in &rows {
        let _ = writeln!(
            o,
            "| {} | {} % | {:.1} | {:.1} | {:.2} |",
            r.case,
            r.fill,
            r.ns,
            r.ns - r.empty,
            r.ns / r.floor
        );
    }
    let worst = rows
        .iter()
        .filter(|r| r.case.starts_with("established"))
        .max_by(|a, b| a.ns.total_cmp(&b.ns))
        .context("b8: no established case")?;
    let est_max = worst.ns;
    let _ = writeln!(
        o,
        "\nTarget: established flow under 100 ns per packet: {} (worst established case, from the flow cache, \
         {est_max:.1} ns as the kernel times it, {:.1} ns above the empty program).",
        if est_max < 100.0 { "met" } else { "NOT met" },
        est_max - worst.empty
    );
    Ok(o)
}
