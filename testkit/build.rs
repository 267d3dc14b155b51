//! Finds the benchmark-only eBPF object that weir-proxy's build script built (see its `links`
//! metadata), for `harness::BENCH_OBJECT`.
fn main() {
    let dir = std::env::var("DEP_WEIR_EBPF_OBJECT_DIR")
        .expect("weir-proxy's build script says where the eBPF objects are");
    println!("cargo:rustc-env=WEIR_BENCH_OBJECT={dir}/weir-ebpf-bench");
    println!("cargo:rerun-if-env-changed=DEP_WEIR_EBPF_OBJECT_DIR");
}
