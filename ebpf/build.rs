fn main() {
    // bpf-linker is what links the eBPF object; say so early instead of failing deep in rustc.
    if which::which("bpf-linker").is_err() {
        println!("cargo:warning=bpf-linker not found: run `cargo xtask setup`");
    }
    println!("cargo:rerun-if-changed=build.rs");
}
