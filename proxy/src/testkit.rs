//! Test and benchmark kit (feature `testkit`): the production eBPF object loaded for real, its
//! maps filled through the agent's own programmer and map writer, and packets run through the
//! programs with BPF_PROG_TEST_RUN. Run with `cargo xtask test` (root).
use std::{net::Ipv4Addr, path::PathBuf};

use crate::{
    loader::{Datapath, PinDir},
    maps::{open_typed, AyaMaps, Conntrack},
    program::{ApplyStats, Desired, Programmer},
    topo::{enter, tag, BpfMount, Netns, RunDir},
};
use anyhow::{Context, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use etherparse::PacketBuilder;
use weir_common::{map_names, CtKey, CtValue, STAT_COUNT};

pub const POD_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x10];
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT.
pub const OK: u32 = 0;
pub const SHOT: u32 = 2;
pub const REDIRECT: u32 = 7;

/// The fixture namespace's routing table: the node's uplink `up0` (the node at `NODE4` and
/// `NODE6`, other nodes' pods in `REMOTE_PODS4` and `REMOTE_PODS6` behind it, and external
/// clients on its subnets), and `pods0`, behind which the pods of this node live (198.18.1.0/24,
/// fd00:18::/64). Packets run with `run` enter on `lo`, with `run_on` on the device named.
pub const UPLINK: &str = "up0";
pub const NODE4: &str = "198.18.0.1";
pub const NODE6: &str = "fd00:17::1";
pub const REMOTE_POD4: &str = "198.18.2.5";
pub const REMOTE_POD6: &str = "fd00:2::5";
pub const EXTERNAL4: &str = "198.18.0.99";
pub const EXTERNAL6: &str = "fd00:17::99";

// Field order is drop order: programs and maps before the bpffs they are pinned on.
pub struct Harness {
    pub dp: Datapath,
    pub maps: AyaMaps,
    pub programmer: Programmer,
    _bpffs: BpfMount,
    _dir: RunDir,
    /// The namespace the programs run in (see `UPLINK`); this thread is in it while the
    /// harness lives.
    pub ns: Netns,
    home: std::fs::File,
    flow_cache: bool,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Err(e) = nix::sched::setns(&self.home, nix::sched::CloneFlags::CLONE_NEWNET) {
            eprintln!("weir: could not leave the fixture namespace: {e}");
        }
    }
}

impl Harness {
    pub fn new() -> Result<Self> {
        Self::new_with(|_| Ok(()))
    }

    /// A harness whose object is loaded as for a kernel of which the loader knows nothing
    /// (`kernel_facts`): L4 checksums are updated, and the clock read, by helper calls.
    pub fn without_kernel_facts() -> Result<Self> {
        Self::new_inner(|_| Ok(()), Default::default())
    }

    /// A harness whose maps directory `prepare` fills first, as an earlier run would have.
    pub fn new_with(prepare: impl FnOnce(&std::path::Path) -> Result<()>) -> Result<Self> {
        Self::new_inner(prepare, crate::kernel_facts::facts())
    }

    fn new_inner(
        prepare: impl FnOnce(&std::path::Path) -> Result<()>,
        facts: crate::kernel_facts::Facts,
    ) -> Result<Self> {
        let dir = RunDir::create(&format!("/run/weir-fx{}", tag()))?;
        let bpffs = BpfMount::create(&dir.0.join("bpffs"))?;
        let pins = PinDir(bpffs.path.join("weir"));
        std::fs::create_dir_all(pins.maps())?;
        prepare(&pins.maps())?;
        // The flow cache takes packets whose checksum kind the programs can read.
        let flow_cache = facts.skb.is_some();
        // Test runs run on the calling CPU, whose flow cache slots they use and fill: on one
        // CPU, which packets find their flow there is the same on every run.
        let mut one = nix::sched::CpuSet::new();
        one.set(0)?;
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one)
            .context("keep this thread on CPU 0")?;
        let dp = Datapath::load_with(pins.clone(), facts)?;
        // No earlier programs are attached here: nothing can add to an old layout's map.
        dp.finish_ct_migration()?;
        let maps = AyaMaps::open(&pins.maps())?;
        let programmer = Programmer::adopt(&maps)?;
        let home = std::fs::File::open("/proc/thread-self/ns/net").context("open own namespace")?;
        let ns = Netns::create(&format!("weir-fx{}", tag()))?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for (dev, cmds) in [
            (
                UPLINK,
                vec![
                    vec!["addr", "add", "198.18.0.1/24"],
                    vec!["-6", "addr", "add", "fd00:17::1/64", "nodad"],
                    vec!["route", "add", "198.18.2.0/24", "via", "198.18.0.2"],
                    vec!["-6", "route", "add", "fd00:2::/64", "via", "fd00:17::2"],
                ],
            ),
            (
                "pods0",
                vec![
                    vec!["route", "add", "198.18.1.0/24"],
                    vec!["-6", "route", "add", "fd00:18::/64"],
                ],
            ),
        ] {
            // Veth pairs (no dummy module here); the peers stay unused.
            let peer = format!("{dev}p");
            ns.ip(&["link", "add", dev, "type", "veth", "peer", "name", &peer])?;
            ns.ip(&["link", "set", &peer, "up"])?;
            ns.ip(&["link", "set", dev, "up"])?;
            for mut c in cmds {
                c.extend(["dev", dev]);
                ns.ip(&c)?;
            }
        }
        enter(&ns.path())?;
        Ok(Harness {
            dp,
            maps,
            programmer,
            _bpffs: bpffs,
            _dir: dir,
            ns,
            home,
            flow_cache,
        })
    }

    /// Puts `pods0`'s peer in a namespace of its own, as a pod's eth0 is (the returned one:
    /// keep it while the harness runs), and gives `pods0` a permanent neighbour entry for each
    /// (address, MAC) pair: the shape of a pod veth the agent records (`add_pod_dev`).
    pub fn pods_in_a_namespace(&self, neighbours: &[(&str, &str)]) -> Result<Netns> {
        let pod = Netns::create(&format!("weir-fxpod{}", tag()))?;
        self.ns.ip(&["link", "set", "pods0p", "netns", &pod.name])?;
        pod.ip(&["link", "set", "pods0p", "up"])?;
        for (addr, mac) in neighbours {
            self.ns.ip(&[
                "neigh",
                "replace",
                addr,
                "lladdr",
                mac,
                "dev",
                "pods0",
                "nud",
                "permanent",
            ])?;
        }
        Ok(pod)
    }

    /// The index of a device of the fixture namespace.
    pub fn ifindex(&self, dev: &str) -> u32 {
        nix::net::if_::if_nametoindex(dev).unwrap_or_else(|e| panic!("no device {dev}: {e}"))
    }

    /// The run directory (under /run) holding the bpffs this harness mounted.
    pub fn run_dir(&self) -> &std::path::Path {
        &self._dir.0
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.dp.pins().maps()
    }

    /// Programs `desired` through the agent's programmer; every frontend must succeed.
    pub fn program(&mut self, desired: &Desired) -> ApplyStats {
        let st = self.programmer.apply(desired, &mut self.maps);
        assert!(st.errors.is_empty(), "programming failed: {:?}", st.errors);
        st
    }

    /// Whether the programs may translate packets from the flow cache (`flow_cache_hit`):
    /// not where the loader knows nothing of the kernel (see `without_kernel_facts`).
    pub fn flow_cache(&self) -> bool {
        self.flow_cache
    }

    /// Puts `tc_flow_write` into its program array (`on`, as the loader does), or takes it
    /// out: the programs' tail call to it then fails, and every packet goes through conntrack
    /// (B8 times both).
    pub fn set_flow_cache_writer(&mut self, on: bool) -> Result<()> {
        let ebpf = self.dp.ebpf_mut();
        let writer = if on {
            let p: &SchedClassifier = ebpf
                .program(weir_common::prog_names::TC_FLOW_WRITE)
                .context("program tc_flow_write")?
                .try_into()?;
            Some(p.fd()?.try_clone()?)
        } else {
            None
        };
        let mut jump: aya::maps::ProgramArray<_> = ebpf
            .map_mut("FLOW_WRITE")
            .context("map FLOW_WRITE")?
            .try_into()?;
        match writer {
            Some(fd) => jump.set(0, &fd, 0).context("set FLOW_WRITE")?,
            None => jump.clear_index(&0).context("clear FLOW_WRITE")?,
        }
        self.flow_cache = on;
        Ok(())
    }

    /// Loads a classifier of the object that the agent does not load (`tc_noop`).
    pub fn load_classifier(&mut self, prog: &str) -> Result<()> {
        self.classifier(prog)
            .load()
            .with_context(|| format!("load {prog}"))
    }

    fn classifier(&mut self, prog: &str) -> &mut SchedClassifier {
        self.dp
            .ebpf_mut()
            .program_mut(prog)
            .expect("program in object")
            .try_into()
            .expect("a classifier")
    }

    /// Runs `frame` through `prog` once, entering on `lo`: the verdict and the frame it
    /// leaves.
    pub fn run(&mut self, prog: &str, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_on(prog, frame, 1)
    }

    /// Runs `frame` through `prog` once, entering on device `ifindex`.
    pub fn run_on(&mut self, prog: &str, frame: &[u8], ifindex: u32) -> (u32, Vec<u8>) {
        // `struct __sk_buff` up to `ifindex` (offset 40); every other field zero.
        let mut ctx = [0u8; 44];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let p = self.classifier(prog);
        let mut out = vec![0u8; frame.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.data_out = Some(&mut out);
        if ifindex > 1 {
            opts.ctx_in = Some(&ctx);
        }
        let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }

    /// Runs `frame` `repeat` times and returns the kernel's mean ns per run.
    pub fn time(&mut self, prog: &str, frame: &[u8], repeat: u32) -> f64 {
        let p = self.classifier(prog);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
        r.duration.as_nanos() as f64
    }

    /// Runs `frame` `repeat` times with `skb->mark` set to `mark`: the kernel's mean ns per
    /// run and the last run's verdict.
    pub fn time_marked(&mut self, prog: &str, frame: &[u8], repeat: u32, mark: u32) -> (f64, u32) {
        // `struct __sk_buff` up to `mark` (offset 8); every other field zero.
        let mut ctx = [0u8; 12];
        ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let p = self.classifier(prog);
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.ctx_in = Some(&ctx);
        opts.repeat = repeat;
        let r = p.test_run(opts).expect("BPF_PROG_TEST_RUN");
        (r.duration.as_nanos() as f64, r.return_value)
    }

    /// Counters summed over CPUs.
    pub fn stats(&self) -> Vec<u64> {
        let m: PerCpuArray<MapData, u64> =
            open_typed(&self.maps_dir(), map_names::STATS).expect("stats map");
        (0..STAT_COUNT)
            .map(|i| m.get(&i, 0).expect("read").iter().sum())
            .collect()
    }

    /// The conntrack maps of both families (see [`Conntrack`]).
    pub fn ct_map(&self) -> Conntrack {
        Conntrack::open(&self.maps_dir()).expect("ct maps")
    }

    pub fn ct(&self) -> Vec<(CtKey, CtValue)> {
        self.ct_map().entries().expect("read ct")
    }

    pub fn clear_ct(&self) {
        let keys: Vec<CtKey> = self.ct().into_iter().map(|(k, _)| k).collect();
        self.ct_map().delete(&keys).expect("remove ct entries");
    }
}

#[derive(Clone, Copy, Debug)]
pub enum Tcp {
    Syn,
    Ack,
    Fin,
    Rst,
}

/// An Ethernet frame from the pod to the host with a TCP segment.
pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: Tcp) -> Vec<u8> {
    let b = ip_builder(src, dst);
    let t = b.tcp(sport, dport, 1000, 64240);
    let t = match flags {
        Tcp::Syn => t.syn(),
        Tcp::Ack => t.ack(1),
        Tcp::Fin => t.fin().ack(1),
        Tcp::Rst => t.rst(),
    };
    let payload: &[u8] = if matches!(flags, Tcp::Ack) {
        b"42\n"
    } else {
        b""
    };
    let mut v = Vec::new();
    t.write(&mut v, payload).expect("build TCP frame");
    v
}

/// A SYN from an IPv4 address with 4 bytes of IP options (four no-ops).
pub fn tcp_syn_with_ip_options(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    let (Ok(s), Ok(d)) = (src.parse::<Ipv4Addr>(), dst.parse::<Ipv4Addr>()) else {
        panic!("bad IPv4 addresses {src} {dst}");
    };
    let mut ip =
        etherparse::Ipv4Header::new(0, 64, etherparse::IpNumber::TCP, s.octets(), d.octets())
            .expect("an IPv4 header");
    ip.options = etherparse::Ipv4Options::try_from(&[1u8, 1, 1, 1][..]).expect("IPv4 options");
    let mut v = Vec::new();
    PacketBuilder::ethernet2(POD_MAC, HOST_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .tcp(sport, dport, 1000, 64240)
        .syn()
        .write(&mut v, b"")
        .expect("build TCP frame");
    v
}

pub fn udp(src: &str, sport: u16, dst: &str, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    ip_builder(src, dst)
        .udp(sport, dport)
        .write(&mut v, payload)
        .expect("build UDP frame");
    v
}

fn ip_builder(src: &str, dst: &str) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(POD_MAC, HOST_MAC);
    match (
        src.parse::<std::net::IpAddr>(),
        dst.parse::<std::net::IpAddr>(),
    ) {
        (Ok(std::net::IpAddr::V4(s)), Ok(std::net::IpAddr::V4(d))) => {
            eth.ipv4(s.octets(), d.octets(), 64)
        }
        (Ok(std::net::IpAddr::V6(s)), Ok(std::net::IpAddr::V6(d))) => {
            eth.ipv6(s.octets(), d.octets(), 64)
        }
        _ => panic!("bad addresses {src} {dst}"),
    }
}

/// `frame` as a router forwards it: the TTL (hop limit) one less, the IPv4 header checksum
/// recomputed. What the programs send when they route a packet themselves.
pub fn routed(frame: Vec<u8>) -> Vec<u8> {
    let ttl = match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => frame[22],
        _ => frame[21],
    };
    with_ttl(frame, ttl - 1)
}

/// `frame` with this TTL (hop limit), the IPv4 header checksum recomputed.
pub fn with_ttl(mut frame: Vec<u8>, ttl: u8) -> Vec<u8> {
    match u16::from_be_bytes([frame[12], frame[13]]) {
        0x0800 => {
            frame[22] = ttl;
            let ihl = ((frame[14] & 0x0f) as usize) * 4;
            frame[24] = 0;
            frame[25] = 0;
            let sum = ones_sum(&frame[14..14 + ihl]);
            frame[24..26].copy_from_slice(&(!sum).to_be_bytes());
        }
        0x86dd => frame[21] = ttl,
        other => panic!("with_ttl: ethertype {other:#x}"),
    }
    frame
}

/// The one's complement sum of `bytes` as 16-bit words (the Internet checksum before its
/// complement).
fn ones_sum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in bytes.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum of `bytes` folds to zero when the checksum field in them is right.
pub fn checksum_ok(bytes: &[u8]) -> bool {
    ones_sum(bytes) == 0xffff
}

/// The release weir binary xtask built (WEIR_BIN).
pub fn weir_bin() -> Result<PathBuf> {
    let p = std::env::var_os("WEIR_BIN")
        .context("WEIR_BIN is not set: run through `cargo xtask test` or `cargo xtask bench`")?;
    Ok(p.into())
}

/// Inserts `n` synthetic conntrack entries (distinct flows that no test packet matches), to
/// measure the programs against a conntrack map that is that full.
pub fn fill_ct(h: &Harness, n: usize) -> Result<()> {
    let mut m = h.ct_map();
    for i in 0..n as u32 {
        let k = CtKey {
            src: weir_common::Addr::from_v4([
                198,
                18,
                200 + ((i >> 16) % 50) as u8,
                (i >> 8) as u8,
            ]),
            dst: weir_common::Addr::from_v4([198, 19, 255, i as u8]),
            sport: ((i & 0xffff) as u16).to_be(),
            dport: 80u16.to_be(),
            proto: weir_common::PROTO_TCP,
            _pad: [0; 3],
        };
        let v = CtValue {
            expires_ns: u64::MAX,
            ..Default::default()
        };
        m.insert(&k, &v, 0)
            .with_context(|| format!("insert conntrack entry {i}"))?;
    }
    Ok(())
}
