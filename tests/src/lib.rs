//! The privileged tests share the kit in `weir_proxy::testkit`; see `tests/`.
pub use weir_proxy::testkit::*;
