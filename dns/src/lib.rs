//! The cluster DNS zone and server that `weir agent` embeds.
//!
//! Not built yet: the work is tracked by the cluster DNS issue. This crate exists so that the
//! workspace has the layout of `DESIGN.md` and its boundary (no dependency on `weir-proxy`).
