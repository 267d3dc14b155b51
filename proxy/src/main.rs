fn main() -> anyhow::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or("/tmp/weir-try/bpf".into()));
    weir_proxy::loader::ensure_bpffs(&dir)?;
    let _dp = weir_proxy::loader::Datapath::load(weir_proxy::loader::PinDir(dir.join("weir")))?;
    println!("loaded");
    Ok(())
}
