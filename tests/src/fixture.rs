//! The packet fixtures' runner: the production eBPF object, maps filled through the agent's
//! programmer and map writer, frames run through the TC programs with BPF_PROG_TEST_RUN. Each
//! step checks the verdict, the exact output bytes (checksums included: the expected frames are
//! built from scratch, the programs update checksums incrementally) and the exact counter
//! deltas. Fixtures are tables (`fixtures!`), one per feature file.
use std::net::SocketAddr;

use weir_common::{Stat, PROTO_TCP, PROTO_UDP};
use weir_proxy::model::{Desired, Frontend, ServiceSpec};

use crate::*;

pub(crate) const TC_FROM_POD: &str = "tc_from_pod";
pub(crate) const TC_FROM_NETDEV: &str = "tc_from_netdev";
pub(crate) const TC_TO_POD: &str = "tc_to_pod";
pub(crate) const TC_TO_NETDEV: &str = "tc_to_netdev";

pub(crate) const CLI4: &str = "198.18.1.10";
pub(crate) const CLI6: &str = "fd00:18::a";
pub(crate) const VIP4: &str = "198.19.0.10";
pub(crate) const VIP6: &str = "fd00:19::10";
pub(crate) const EMPTY4: &str = "198.19.0.13";
pub(crate) const EMPTY6: &str = "fd00:19::13";
pub(crate) const BE4: &str = "198.18.1.11";
pub(crate) const BE6: &str = "fd00:18::b";

pub(crate) fn fe(ip: &str, port: u16, proto: u8) -> Frontend {
    Frontend {
        ip: ip.parse().unwrap(),
        port,
        proto,
        scope: weir_common::SCOPE_ALL,
    }
}

pub(crate) fn svc(backends: &[&str]) -> ServiceSpec {
    ServiceSpec {
        name: "demo/fixture".into(),
        backends: backends
            .iter()
            .map(|b| b.parse::<SocketAddr>().unwrap())
            .collect(),
        ..Default::default()
    }
}

/// The services every fixture starts with.
pub(crate) fn services() -> Desired {
    Desired::from([
        (fe(VIP4, 80, PROTO_TCP), svc(&["198.18.1.11:8080"])),
        (fe(VIP4, 53, PROTO_UDP), svc(&["198.18.1.11:5353"])),
        (fe(VIP6, 80, PROTO_TCP), svc(&["[fd00:18::b]:8080"])),
        (fe(VIP6, 53, PROTO_UDP), svc(&["[fd00:18::b]:5353"])),
        (fe(EMPTY4, 80, PROTO_TCP), svc(&[])),
        (fe(EMPTY4, 53, PROTO_UDP), svc(&[])),
        (fe(EMPTY6, 80, PROTO_TCP), svc(&[])),
    ])
}

pub(crate) enum Out {
    /// The frame leaves as it came.
    Same,
    Exact(Vec<u8>),
}

pub(crate) struct Step {
    pub(crate) prog: &'static str,
    pub(crate) input: Vec<u8>,
    pub(crate) verdict: u32,
    pub(crate) out: Out,
    pub(crate) stats: &'static [(Stat, u64)],
}

pub(crate) fn step(input: Vec<u8>, verdict: u32, out: Out, stats: &'static [(Stat, u64)]) -> Step {
    Step {
        prog: TC_FROM_POD,
        input,
        verdict,
        out,
        stats,
    }
}

pub(crate) fn hexdiff(got: &[u8], want: &[u8]) -> String {
    let mut s = format!("got {} bytes, want {}\n", got.len(), want.len());
    for i in 0..got.len().max(want.len()) {
        let (g, w) = (got.get(i), want.get(i));
        if g != w {
            s += &format!("  byte {i}: got {g:02x?} want {w:02x?}\n");
        }
    }
    s
}

/// Runs the steps on fresh maps programmed with `desired`; returns the harness for extra checks.
pub(crate) fn run_case(name: &str, desired: Desired, steps: Vec<Step>) -> Harness {
    let mut h = Harness::new().expect("load the production object");
    h.program(&desired);
    run_steps(&mut h, name, steps);
    h
}

/// Runs the steps on the harness as it is, checking each.
pub(crate) fn run_steps(h: &mut Harness, name: &str, steps: Vec<Step>) {
    for (i, s) in steps.into_iter().enumerate() {
        let before = h.stats();
        // The uplink program sees packets entering on the uplink.
        let ingress = if s.prog == TC_FROM_NETDEV {
            h.ifindex(UPLINK)
        } else {
            1
        };
        let (verdict, out) = h.run_on(s.prog, &s.input, ingress);
        let after = h.stats();
        assert_eq!(verdict, s.verdict, "{name} step {i}: verdict");
        let want = match &s.out {
            Out::Same => &s.input,
            Out::Exact(w) => w,
        };
        assert!(
            out == *want,
            "{name} step {i}: output frame\n{}",
            hexdiff(&out, want)
        );
        let mut expected = vec![0u64; before.len()];
        for (stat, n) in s.stats {
            // Without the flow cache, its packets take conntrack: the same frames and
            // verdicts, with no hit counted.
            if *stat != Stat::FlowCacheHit || h.flow_cache() {
                expected[*stat as usize] += n;
            }
        }
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let names = |v: &[u64]| -> Vec<(&str, u64)> {
            v.iter()
                .enumerate()
                .filter(|(_, n)| **n > 0)
                .map(|(i, n)| (weir_common::STAT_NAMES[i], *n))
                .collect()
        };
        assert_eq!(names(&delta), names(&expected), "{name} step {i}: counters");
    }
}

/// The destination address and port of an output IPv4 frame.
pub(crate) fn dst4(frame: &[u8]) -> SocketAddr {
    let ip: [u8; 4] = frame[30..34].try_into().unwrap();
    SocketAddr::from((ip, u16::from_be_bytes([frame[36], frame[37]])))
}

/// Runs one frame entering on `dev`: the verdict, the frame that leaves and the counters that
/// moved.
pub(crate) fn step_on(
    h: &mut Harness,
    prog: &str,
    frame: &[u8],
    dev: &str,
) -> (u32, Vec<u8>, Vec<&'static str>) {
    let before = h.stats();
    let ingress = if dev == "lo" { 1 } else { h.ifindex(dev) };
    let (verdict, out) = h.run_on(prog, frame, ingress);
    let moved = h
        .stats()
        .iter()
        .zip(&before)
        .enumerate()
        .flat_map(|(i, (a, b))| std::iter::repeat_n(weir_common::STAT_NAMES[i], (a - b) as usize))
        .collect();
    (verdict, out, moved)
}

/// Runs `frame` through `prog` entering on `dev`, and checks the verdict, the exact frame that
/// leaves and the counters that moved.
pub(crate) fn expect(
    h: &mut Harness,
    what: &str,
    (prog, dev): (&str, &str),
    frame: Vec<u8>,
    (verdict, want): (u32, Vec<u8>),
    moved: &[&str],
) {
    let (v, out, got) = step_on(h, prog, &frame, dev);
    assert_eq!(v, verdict, "{what}: verdict");
    assert!(out == want, "{what}: frame\n{}", hexdiff(&out, &want));
    assert_eq!(got, moved, "{what}: counters");
}

pub(crate) fn on(
    prog: &'static str,
    input: Vec<u8>,
    out: Out,
    stats: &'static [(Stat, u64)],
) -> Step {
    Step {
        prog,
        ..step(input, OK, out, stats)
    }
}

pub(crate) fn with_zero_udp_checksum(mut f: Vec<u8>) -> Vec<u8> {
    f[14 + 20 + 6] = 0;
    f[14 + 20 + 7] = 0;
    f
}

/// A two-byte payload with which the UDP datagram `frame` builds has a checksum that comes out
/// 0, and so is sent as 0xffff.
pub(crate) fn zero_sum_payload(frame: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    (0..=u16::MAX)
        .map(|n| n.to_be_bytes().to_vec())
        .find(|p| {
            let f = frame(p);
            let l4 = if f[12..14] == [0x86, 0xdd] {
                14 + 40
            } else {
                14 + 20
            };
            f[l4 + 6..l4 + 8] == [0xff, 0xff]
        })
        .expect("one payload of 65 536 sums to zero")
}

/// The TCP source port of an Ethernet frame.
pub(crate) fn tcp_sport(frame: &[u8]) -> u16 {
    let l4 = if frame[12..14] == [0x86, 0xdd] {
        14 + 40
    } else {
        14 + 20
    };
    u16::from_be_bytes([frame[l4], frame[l4 + 1]])
}

pub(crate) fn nodeport(node: &str, backend: &str) -> Desired {
    Desired::from([(
        fe(node, 30080, PROTO_TCP),
        ServiceSpec {
            name: "demo/np:http".into(),
            backends: vec![SocketAddr::new(backend.parse().unwrap(), 8080)],
            ..Default::default()
        },
    )])
}

/// The node-local DNS lease as the agent writes it (`dns::Lease`): the node's server at
/// `NODE4`/`NODE6` port 53, valid for a minute, or withdrawn.
pub(crate) fn lease(h: &Harness, valid: bool) {
    let opts = weir_proxy::dns::Options {
        listen: vec![
            SocketAddr::new(NODE4.parse().unwrap(), 53),
            SocketAddr::new(NODE6.parse().unwrap(), 53),
        ],
        domain: "cluster.local".into(),
        ttl: 5,
        pods: Default::default(),
        upstreams: vec![],
        stubs: vec![],
        service: Some("kube-system/kube-dns".into()),
    };
    let mut l = weir_proxy::dns::Lease::open(&h.maps_dir(), &opts).unwrap();
    l.renew(if valid {
        std::time::Duration::from_secs(60)
    } else {
        std::time::Duration::ZERO
    })
    .unwrap();
}

/// Declares packet fixtures: each `name => (desired, steps)` is a test that runs its steps on
/// fresh maps programmed with `desired`; `cases()` lists them all again, for
/// `kernel_facts::every_case_with_helper_calls_only`.
macro_rules! fixtures {
    ($($name:ident => $body:expr;)*) => {
        $(
            #[test]
            #[ignore = "needs root: run with cargo xtask test"]
            fn $name() {
                let (desired, steps): (Desired, Vec<Step>) = $body;
                run_case(stringify!($name), desired, steps);
            }
        )*

        /// Every case of this file, by name.
        #[allow(dead_code)] // read by kernel_facts only
        pub(crate) fn cases() -> Vec<(&'static str, fn() -> (Desired, Vec<Step>))> {
            vec![$((stringify!($name), || $body)),*]
        }
    };
}
pub(crate) use fixtures;
