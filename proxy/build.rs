//! Builds the eBPF object with aya-build. `AYA_BUILD_SKIP=1` skips it (fast `cargo check` and
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
    if skip {
        // Leave an empty object so include_bytes! has a file; the loader detects it.
        let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
        let obj = out.join("weir-ebpf");
        if !obj.exists() {
            std::fs::write(&obj, []).expect("write placeholder object");
        }
    }
    aya_build::build_ebpf(
        [Package {
            name: "weir-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf"),
            ..Default::default()
        }],
        Toolchain::Custom(&toolchain),
    )
}
