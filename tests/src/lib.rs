//! Privileged integration tests; run them with `cargo xtask test`.
