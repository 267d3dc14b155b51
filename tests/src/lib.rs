//! The privileged tests share the kit in `weir_testkit`; see `tests/`.
pub use weir_testkit::*;
