//! `weir`: the node agent and its tools. The command line is in `cli/`, one file per
//! subcommand; what they run is the `weir_proxy` library.
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
