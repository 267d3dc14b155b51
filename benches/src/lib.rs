//! Benchmarks B1 and B8 (see benches/README.md).
