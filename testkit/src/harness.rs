//! The BPF_PROG_TEST_RUN harness: the production eBPF object loaded for real, its maps filled
//! through the agent's own programmer and map writer, and packets run through the programs.
use std::path::PathBuf;

use anyhow::{Context, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfLoader,
};
use weir_common::{map_names, CtKey, CtValue, STAT_COUNT};
use weir_proxy::{
    datapath::{
        kernel_facts::{self, Facts},
        open_typed, pin_dir, ApplyStats, AyaMaps, Conntrack, Datapath, Programmer,
    },
    model::Desired,
    node::netns::enter,
    tools::sim::{
        guards::{tag, BpfMount, RunDir},
        topo::Netns,
    },
};

/// The benchmark-only programs (`ebpf/src/bench/`), an object the agent never loads (empty when
/// built with `AYA_BUILD_SKIP=1`).
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("WEIR_BENCH_OBJECT"));

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
    /// The benchmark-only object, once [`Harness::load_classifier`] loaded it.
    bench: Option<Ebpf>,
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
        Self::new_inner(prepare, kernel_facts::facts())
    }

    fn new_inner(
        prepare: impl FnOnce(&std::path::Path) -> Result<()>,
        facts: Facts,
    ) -> Result<Self> {
        let dir = RunDir::create(&format!("/run/weir-fx{}", tag()))?;
        let bpffs = BpfMount::create(&dir.0.join("bpffs"))?;
        let pins = pin_dir(&bpffs.path);
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
            bench: None,
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
    /// (the per-packet benchmark times both).
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
            .map_mut(weir_common::map_names::FLOW_WRITE)
            .context("map FLOW_WRITE")?
            .try_into()?;
        match writer {
            Some(fd) => jump.set(0, &fd, 0).context("set FLOW_WRITE")?,
            None => jump.clear_index(&0).context("clear FLOW_WRITE")?,
        }
        self.flow_cache = on;
        Ok(())
    }

    /// Loads a classifier of the benchmark-only object (`tc_noop`, `tc_bound_*`), which the
    /// agent never loads; the object shares the agent's pinned maps.
    pub fn load_classifier(&mut self, prog: &str) -> Result<()> {
        if self.bench.is_none() {
            if BENCH_OBJECT.is_empty() {
                anyhow::bail!("built with AYA_BUILD_SKIP=1: no benchmark object");
            }
            let maps_dir = self.maps_dir();
            self.bench = Some(
                EbpfLoader::new()
                    .default_map_pin_directory(&maps_dir)
                    .load(BENCH_OBJECT)
                    .context("load the benchmark-only object")?,
            );
        }
        self.classifier(prog)
            .load()
            .with_context(|| format!("load {prog}"))
    }

    /// A classifier of the agent's object, else of the benchmark-only one.
    fn classifier(&mut self, prog: &str) -> &mut SchedClassifier {
        let in_agent = self.dp.ebpf_mut().program(prog).is_some();
        let ebpf = match (&mut self.bench, in_agent) {
            (Some(bench), false) => bench,
            _ => self.dp.ebpf_mut(),
        };
        ebpf.program_mut(prog)
            .unwrap_or_else(|| panic!("no program {prog} in either object"))
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
