//! Builds the eBPF objects with aya-build: `weir-ebpf`, which the agent loads, and
//! `weir-ebpf-bench`, the benchmark-only programs (weir-testkit takes it, through the
//! `links` metadata `object_dir`). `AYA_BUILD_SKIP=1` skips it (fast `cargo check` and
//! clippy); the agent then refuses to start with a message saying so.
use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    // The stable toolchain builds `core` for the BPF target when it may use -Z build-std; this
    // enables that for the eBPF build only (it is the child cargo that inherits it).
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "1") };
    let toolchain = std::env::var("WEIR_EBPF_TOOLCHAIN").unwrap_or_else(|_| "stable".into());
    println!("cargo:rerun-if-env-changed=WEIR_EBPF_TOOLCHAIN");
    let skip = std::env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    if skip {
        // Leave empty objects so include_bytes! has a file; the loaders detect it.
        for name in ["weir-ebpf", "weir-ebpf-bench"] {
            let obj = out.join(name);
            if !obj.exists() {
                std::fs::write(&obj, []).expect("write placeholder object");
            }
        }
    }
    println!("cargo:object_dir={}", out.display());
    aya_build::build_ebpf(
        [Package {
            name: "weir-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
