//! weir's node agent and the `weir` command, as a library so tests and benches drive the same
//! code.
pub mod addr;
pub mod loader;
pub mod maglev;
pub mod maps;
pub mod program;
